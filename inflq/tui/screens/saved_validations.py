"""Saved validations (command palette, or ctrl+l on the Validate screen; esc back): every
``inflq validate`` the project saved, newest first, and the highlighted one's table, as the CLI
prints them. Reads the catalog only: no model, no torch."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Label, Static

from ...validations import SavedValidation, get_validation, list_validations


def validation_table(v: SavedValidation) -> Table:
    """A saved validation's table, as ``inflq validate show`` prints it (``inflq.validations``: the
    one rendering of its title, columns and cells, with the recommended damping as its caption)."""
    from ...lds import recommendation, swept_estimator

    t = Table(*v.columns(), title=v.title(), title_justify="left", box=None, pad_edge=False)
    for cells in v.table():
        t.add_row(*cells)
    if v.recommended_damping is not None:
        t.caption = recommendation(v.recommended_damping, swept_estimator(v.settings, v.rows), "the PBRF" if v.method == "pbrf" else "retraining")
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
        self._saved = {v.id: v for v in reversed(list_validations(project))}  # newest first
        unit = {"pbrf": "sequences", "lds": "subsets", "loo": "left out"}
        for v in self._saved.values():
            table.add_row(str(v.id), v.method, v.investigation, ", ".join(v.estimators), f"{v.num_queries} q × {v.num_sequences} {unit[v.method]}",
                          (v.created_at or "").replace("T", " ")[:16], key=str(v.id))
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
        v = get_validation(self.app.project, vid)  # type: ignore[attr-defined]
        note = Text(f"the same as `inflq validate show`; settings: modules {len(v.settings.get('modules') or [])}, seed {v.settings.get('seed')}", style="dim")
        self.query_one("#validation-detail", Static).update(Group(validation_table(v), note))
