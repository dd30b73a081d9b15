"""Saved validations (command palette, or ctrl+l on the Validate screen; esc back): every
``inflq validate`` the project saved, newest first, and the highlighted one's table, as the CLI
prints them. Reads the catalog only: no model, no torch."""

from __future__ import annotations

import math

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Label, Static

from ... import catalog


def saved_validations(db) -> list[list[dict]]:
    """Every saved validation's rows (``catalog.validation_rows``), newest first. (Numbers of an
    investigation since deleted have no rows and are skipped.)"""
    latest = catalog.validation_rows(db)
    if not latest:
        return []
    out = []
    for n in range(latest[0]["validation"], 0, -1):
        rows = catalog.validation_rows(db, n)
        if rows:
            out.append(rows)
    return out


def method_of(rows: list[dict]) -> str:
    """``pbrf``, ``lds`` or ``loo`` (leave-one-out is saved with method ``lds``)."""
    return "loo" if rows[0]["settings"].get("method") == "loo" else rows[0].get("method") or "pbrf"


def pbrf_table(rows: list[dict]) -> Table:
    """A saved PBRF validation's correlations, as ``inflq validate`` prints them."""
    first, s = rows[0], rows[0]["settings"]
    n = len(s.get("sample") or []) or first["num_sequences"]
    eps = s.get("epsilon")
    title = f"validation {first['validation']}: {len(s.get('queries') or [])} queries × {n} sequences vs PBRF"
    if eps is not None:
        title += f" (ε={eps:.3g}, {s.get('pbrf_steps')} steps, {s.get('fit_sequences')} fitting sequences, {s.get('pbrf_seconds', 0):.0f} s)"
    t = Table("estimator", "pearson", "spearman", "fit s", "inverse-HVP s", title=title, title_justify="left", box=None, pad_edge=False)

    def num(x, form: str) -> str:
        return "—" if x is None or not math.isfinite(x) else format(x, form)

    for r in rows:
        t.add_row(r["estimator"], num(r["pearson"], ".3f"), num(r["spearman"], ".3f"), num(r["fit_seconds"], ".3f"), num(r["ihvp_seconds"], ".4f"))
    if s.get("recommended_damping") is not None:
        t.caption = f"recommended EK-FAC damping: {s['recommended_damping']:g} (estimator ekfac:damping={s['recommended_damping']:g})"
        t.caption_justify = "left"
    return t


class ValidationsScreen(Screen):
    """The project's saved validations; the highlighted one's table below (esc back)."""

    BINDINGS = [Binding("escape", "app.pop_screen", "Back")]

    def compose(self) -> ComposeResult:
        yield Header()
        yield Label("Saved validations (inflq validate), newest first: ↑↓ a validation's table · esc back", classes="hint")
        table = DataTable(id="validations", cursor_type="row", zebra_stripes=True)
        for label, key in (("id", "id"), ("method", "method"), ("investigation", "investigation"), ("estimators", "estimators"),
                           ("size", "size"), ("saved", "saved")):
            table.add_column(label, key=key)
        yield table
        with VerticalScroll(id="validation-detail-scroll"):
            yield Static("", id="validation-detail", classes="detail")
        yield Footer()

    def on_mount(self) -> None:
        self.reload()
        self.query_one("#validations", DataTable).focus()

    def reload(self) -> None:
        table = self.query_one("#validations", DataTable)
        table.clear()
        project = self.app.project  # type: ignore[attr-defined]
        detail = self.query_one("#validation-detail", Static)
        if project is None:
            detail.update("No project is open: press o to open one.")
            return
        self._saved = {rows[0]["validation"]: rows for rows in saved_validations(project.db)}
        names: dict[int, str] = {}
        for vid, rows in self._saved.items():
            first, method = rows[0], method_of(rows)
            inv = first["investigation_id"]
            if inv not in names:
                names[inv] = catalog.investigation(project.db, inv)["name"]
            unit = {"pbrf": "sequences", "lds": "subsets", "loo": "left out"}[method]
            n = first["settings"].get("subsets") if method != "pbrf" else (len(first["settings"].get("sample") or []) or first["num_sequences"])
            table.add_row(str(vid), method, names[inv], ", ".join(r["estimator"] for r in rows),
                          f"{first['num_queries']} q × {n} {unit}", (first["created_at"] or "").replace("T", " ")[:16], key=str(vid))
        if not self._saved:
            detail.update("No validation has been saved yet: ctrl+p → Validate estimators (or `inflq validate`).")
            return
        self.show(next(iter(self._saved)))

    @on(DataTable.RowHighlighted, "#validations")
    def _highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key.value is not None:
            self.show(int(event.row_key.value))

    def show(self, vid: int) -> None:
        """Validation ``vid``'s table (PBRF correlations, or LDS / leave-one-out scores)."""
        from .tools import lds_table

        rows = self._saved[vid]
        s = rows[0]["settings"]
        if method_of(rows) == "pbrf":
            shown = pbrf_table(rows)
        else:
            shown = lds_table(vid, rows, s, s.get("recommended_damping"))
        note = Text(f"the same as `inflq validate`'s table; settings: modules {len(s.get('modules') or [])}, seed {s.get('seed')}", style="dim")
        self.query_one("#validation-detail", Static).update(Group(shown, note))
