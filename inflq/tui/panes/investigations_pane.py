"""Tab 1: the project's investigations (select, new, rename, delete) and the highlighted one's
queries, runs and result sets."""

from __future__ import annotations

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Label, Static

from ... import catalog, reading
from ...display import plural
from ...errors import InflqError
from .. import render
from ..screens.modals import ConfirmScreen, InputScreen
from .pane import Pane


class InvestigationsPane(Pane):
    DEPENDS = frozenset({"project", "investigation"})
    BINDINGS = [
        Binding("n", "new", "New"),
        Binding("r", "rename", "Rename"),
        Binding("d", "delete", "Delete"),
    ]

    def compose(self) -> ComposeResult:
        yield Label("Investigations: enter selects · n new · r rename · d delete", classes="hint")
        table = DataTable(id="investigations", cursor_type="row", zebra_stripes=True)
        table.add_columns("name", "queries", "result sets", "runs")
        yield table
        yield Static("", id="inv-detail", classes="detail")

    def reload(self) -> None:
        table = self.query_one("#investigations", DataTable)
        table.clear()
        if self.project is None:
            self.query_one("#inv-detail", Static).update("No project is open: press o to open one.")
            return
        runs = catalog.run_counts(self.project.db)
        current = 0
        for i, inv in enumerate(catalog.investigations(self.project.db)):
            table.add_row(inv["name"], str(inv["num_queries"]), str(inv["num_result_sets"]), str(runs.get(inv["id"], 0)), key=inv["name"])
            if inv["name"] == self.context.investigation:
                current = i
        if table.row_count:
            table.move_cursor(row=current)
        self._detail(self.context.investigation)

    def _selected(self) -> str | None:
        table = self.query_one("#investigations", DataTable)
        if not table.row_count:
            return None
        return table.coordinate_to_cell_key((table.cursor_row, 0)).row_key.value

    def _detail(self, name: str | None) -> None:
        out = self.query_one("#inv-detail", Static)
        if name is None or self.project is None:
            out.update("")
            return
        try:
            queries = catalog.queries(self.project.db, name)
            runs = catalog.runs_of(self.project.db, catalog.investigation(self.project.db, name)["id"])
            sets = reading.result_sets(self.project, name)
        except InflqError as exc:
            out.update(str(exc))
            return
        lines = Text()
        lines.append(f"{name}: {plural(len(queries), 'query')}\n", style="bold")
        for q in queries:
            lines.append(f"  #{q['id']} {render.snippet(q['prompt'], 40)} → {render.snippet(q['completion'], 20)}\n")
        lines.append("runs: ", style="bold")
        lines.append(", ".join(f"{r['id']} {r['estimator']} {r['status']}" for r in runs) or "none")
        lines.append("\nresult sets: ", style="bold")
        lines.append(", ".join(f"{r['id']} {r['estimator']}/{r['filter']}" for r in sets) or "none")
        out.update(lines)

    @on(DataTable.RowHighlighted, "#investigations")
    def _highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._detail(event.row_key.value)

    @on(DataTable.RowSelected, "#investigations")
    def _selected_row(self, event: DataTable.RowSelected) -> None:
        self.set_context(investigation=event.row_key.value)
        self.notify(f"investigation {event.row_key.value!r} selected")

    def action_new(self) -> None:
        if not self.need():
            return

        def done(name: str | None) -> None:
            if name:
                try:
                    catalog.create_investigation(self.project.db, name)
                except InflqError as exc:
                    self.inflq.show_error(exc)
                    return
                self.set_context(investigation=name.strip())
                self.reload()

        self.app.push_screen(InputScreen("Name of the new investigation", placeholder="e.g. astrobia facts"), done)

    def action_rename(self) -> None:
        name = self._selected()
        if name is None:
            return

        def done(new: str | None) -> None:
            if new and new.strip() != name:
                try:
                    catalog.rename_investigation(self.project.db, name, new.strip())
                except InflqError as exc:
                    self.inflq.show_error(exc)
                    return
                if self.context.investigation == name:
                    self.set_context(investigation=new.strip())
                self.reload()

        self.app.push_screen(InputScreen(f"Rename {name!r} to", value=name), done)

    def action_delete(self) -> None:
        name = self._selected()
        if name is None:
            return
        
        def done(yes: bool | None) -> None:
            if yes:
                try:
                    self.project.delete_investigation(name)
                except InflqError as exc:
                    self.inflq.show_error(exc)
                    return
                if self.context.investigation == name:
                    self.set_context(investigation=None)
                self.notify(f"deleted investigation {name!r}")
                self.reload()

        self.app.push_screen(ConfirmScreen(f"Delete investigation {name!r} with all its queries, probes, runs and results? This cannot be undone."), done)
