"""The factor-set screen's pane (key f): the project's cached factor sets and each module's
spectrum against the damping."""

from __future__ import annotations

from rich.console import Group
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.widgets import DataTable, Label, Static

from ...errors import InflqError
from ..screens.modals import ConfirmScreen
from .pane import Pane, RowTable


class FactorsPane(Pane):
    """The project's cached factor sets and, for the highlighted one, each module's spectrum against
    the damping a run would add (``inflq factors show``), with the histogram of log10(λ / damping)."""

    DEPENDS = frozenset({"project"})
    BINDINGS = [Binding("d", "delete", "Delete")]

    def compose(self) -> ComposeResult:
        yield Label("Factor sets, shared by all investigations: ↑↓ spectra · d delete · esc back", classes="hint")
        table = RowTable(id="factor-sets", cursor_type="row", zebra_stripes=True)
        table.add_columns("id", "estimator", "settings", "sequences", "size", "runs", "model")
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
        for r in rows:
            size = f"{r['size_bytes'] / 2**20:.1f} MiB" if r["size_bytes"] is not None else "missing"
            table.add_row(str(r["id"]), r["estimator"], r["settings"], str(r["num_sequences"]), size, str(r["runs"]),
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
        out.update(Group(t, note, Text.from_ansi(spectrum_plot(items, width, 14, color=False))))

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
