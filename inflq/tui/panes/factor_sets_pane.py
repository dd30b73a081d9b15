"""The factor-set screen's pane (key f): the project's cached factor sets and each module's
spectrum against the damping."""

from __future__ import annotations

import hashlib
import json

from rich.console import Group
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.widgets import DataTable, Label, Static

from ...errors import InflqError
from .. import render
from ..screens.modals import ConfirmScreen
from .pane import Pane, RowTable


def what_sets_apart(rows: list[dict]) -> dict[int, str]:
    """Per factor set, ``name=value`` for the fewest of its properties (settings, fitting
    sequences, tracked modules, seed) that tell every two listed sets apart, those with the most
    distinct values first: what a narrow table has room for (a property that follows from the
    others, such as the sampling rule from the Fisher, is left out). With one set, its settings."""

    def props(r: dict) -> dict[str, str]:
        out = {k: str(v) for k, v in json.loads(r["settings"]).items()}
        modules = json.loads(r.get("modules") or "[]")
        return out | {"sequences": str(r["num_sequences"]), "seed": str(r["seed"]),
                      "modules": f"{len(modules)}:{hashlib.sha1(json.dumps(modules).encode()).hexdigest()[:4]}"}

    table = {r["id"]: props(r) for r in rows}
    if len(table) < 2:
        return {fid: " ".join(f"{k}={v}" for k, v in p.items() if k not in ("sequences", "seed", "modules")) or "defaults" for fid, p in table.items()}
    keys = list(dict.fromkeys(k for p in table.values() for k in p))
    keys.sort(key=lambda k: -len({p.get(k, "—") for p in table.values()}))  # (stable: settings first on ties)

    def groups(chosen: list[str]) -> int:
        return len({tuple(p.get(k, "—") for k in chosen) for p in table.values()})

    chosen: list[str] = []
    for k in keys:
        if groups(chosen) == len(table):
            break
        if groups(chosen + [k]) > groups(chosen):
            chosen.append(k)
    return {fid: " ".join(f"{k}={p.get(k, '—')}" for k in chosen) or "(same settings)" for fid, p in table.items()}


class FactorsPane(Pane):
    """The project's cached factor sets and, for the highlighted one, each module's spectrum against
    the damping a run would add (``inflq factors show``), with the histogram of log10(λ / damping)."""

    DEPENDS = frozenset({"project"})
    BINDINGS = [Binding("d", "delete", "Delete")]
    APART_WIDTH = 32  # at 80 columns the table keeps its size, runs and model columns in view
    _rows: dict[int, dict] = {}

    def compose(self) -> ComposeResult:
        yield Label("Factor sets, shared by all investigations: ↑↓ spectra · d delete · esc back", classes="hint")
        table = RowTable(id="factor-sets", cursor_type="row", zebra_stripes=True)
        table.add_column("id", key="id")
        table.add_column("estimator", key="estimator")
        table.add_column("what sets it apart", key="apart")
        table.add_columns("size", "runs", "model")
        yield table
        with VerticalScroll(id="factor-detail-scroll"):
            yield Static("", id="factor-detail", classes="detail")

    def reload(self) -> None:
        from ...factor_sets import factor_sets

        table = self.query_one("#factor-sets", DataTable)
        table.clear()
        detail = self.query_one("#factor-detail", Static)
        if self.project is None:
            detail.update("No project is open: press o to open one.")
            return
        rows = factor_sets(self.project)
        self._rows = {r["id"]: r for r in rows}
        apart = what_sets_apart(rows)
        for r in rows:
            size = f"{r['size_bytes'] / 2**20:.1f} MiB" if r["size_bytes"] is not None else "missing"
            table.add_row(str(r["id"]), r["estimator"], render.snippet(apart[r["id"]], self.APART_WIDTH), size, str(r["runs"]),
                          "current" if r["current_model"] else "other", key=str(r["id"]))
        if not rows:
            detail.update("No factor sets yet: a run (tab 3) fits them, or `inflq factors fit` ahead of time.")
            return
        table.move_cursor(row=len(rows) - 1)
        self._detail(rows[-1]["id"])

    def _detail(self, fs_id: int) -> None:
        from ...factor_sets import spectra, spectrum_plot, spectrum_table

        out = self.query_one("#factor-detail", Static)
        try:
            items = spectra(self.project, fs_id)
        except InflqError as exc:
            out.update(str(exc))
            return
        t = spectrum_table(items, fs_id, box=None, pad_edge=False)
        width = max(40, (self.size.width or 80) - 4)
        note = Text("damping = 0.1 × mean λ per module (a run's default); eff. dim = Σ λ/(λ + damping)", style="dim")
        out.update(Group(self._settings_line(fs_id), t, note, Text.from_ansi(spectrum_plot(items, width, 14, color=False))))

    def _settings_line(self, fs_id: int) -> Text:
        """Everything the set was fitted with (the table shows only what differs between sets)."""
        r = self._rows.get(fs_id)
        if r is None:
            return Text("")
        line = Text("fitted with: ", style="bold")
        settings = ", ".join(f"{k}={v}" for k, v in json.loads(r["settings"]).items())
        line.append(f"{r['estimator']} ({settings or 'defaults'}), {r['num_sequences']} fitting sequences, "
                    f"{r['num_modules']} modules, seed {r['seed']}, "
                    f"{'the current model' if r['current_model'] else 'another model'}, used by {r['runs']} run{'s' if r['runs'] != 1 else ''}")
        return line

    @on(DataTable.RowHighlighted, "#factor-sets")
    def _highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key.value is not None:
            self._detail(int(event.row_key.value))

    def action_delete(self) -> None:
        table = self.query_one("#factor-sets", DataTable)
        if self.project is None or not table.row_count:
            return
        fs_id = int(table.coordinate_to_cell_key((table.cursor_row, 0)).row_key.value)
        from ...factor_sets import remove_factor_set
        
        def done(yes: bool | None) -> None:
            if yes:
                try:
                    remove_factor_set(self.project, fs_id)
                except InflqError as exc:
                    self.inflq.show_error(exc)
                    return
                self.notify(f"removed factor set {fs_id}; a run that needs it fits it again")
                self.reload()

        self.app.push_screen(ConfirmScreen(f"Remove factor set {fs_id}? Runs keep their scores; a later run refits what it needs."), done)
