"""Tab 4: a result set's top and bottom sequences for a query, paged and searchable; enter
opens one in the sequence screen."""

from __future__ import annotations

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import DataTable, Input, Label, Select

from ... import catalog, reading
from ...display import score_format
from .. import render
from ..compact import CInput, CSelect
from ..screens.sequence import SequenceScreen
from .pane import Pane, RowTable, blank


class ResultsPane(Pane):
    PAGE = 100
    ID_WIDTH = 34  # ids such as fact-astrobia-president-fwd-02:0 are how users tell sequences apart
    MIN_TEXT_WITH_SOURCE = 30  # below this text width the source column gives way to the text
    FOCUS = "#results"
    BINDINGS = [
        Binding("t", "side('top')", "Top"),
        Binding("b", "side('bottom')", "Bottom"),
        Binding("n", "page(1)", "Next", tooltip="next page of 100"),
        Binding("p", "page(-1)", "Prev", tooltip="previous page"),
        Binding("slash", "search", "Search", show=False),  # the search field's placeholder shows it
        Binding("e", "export", "Export"),
        Binding("escape", "leave", "Back to table", show=False),
    ]

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.side = "top"
        self.page_offset = 0
        self.rows: dict[str, dict] = {}
        self.page_rows: list[dict] = []
        self._laid_out_for = 0

    def compose(self) -> ComposeResult:
        with Horizontal(classes="field", id="res-choose"):
            yield CSelect([], id="res-set", allow_blank=True, prompt="result set")
            yield CSelect([], id="res-query", allow_blank=True, prompt="query")
        yield CInput(placeholder="/ search the stored top K by text or id (enter: back to the table)", id="res-search")
        yield Label("", id="res-status", classes="hint")
        yield RowTable(id="results", cursor_type="row", zebra_stripes=True)
        yield Label(render.SIGN_NOTE, id="res-sign", classes="hint")

    def reload(self) -> None:
        if self.project is None or self.context.investigation is None:
            return
        sets = reading.result_sets(self.project, self.context.investigation)
        s = self.query_one("#res-set", Select)
        with self.prevent(Select.Changed):
            s.set_options([(f"{r['id']}: {r['estimator']} / {r['filter']}", r["id"]) for r in sets])
            if self.context.result_set_id in {r["id"] for r in sets}:
                s.value = self.context.result_set_id
        q = self.query_one("#res-query", Select)
        with self.prevent(Select.Changed):
            qs = catalog.queries(self.project.db, self.context.investigation)
            q.set_options([(f"{x['id']}: {render.snippet(x['prompt'] + ' → ' + x['completion'], 400)}", x["id"]) for x in qs])
            if self.context.query_id in {x["id"] for x in qs}:
                q.value = self.context.query_id
        self.page_offset = 0
        self.load_page()

    def _focus_table(self) -> None:
        # After the Select's overlay has closed (it gives focus back to the Select first).
        self.call_after_refresh(self.query_one("#results", DataTable).focus)

    @on(Select.Changed, "#res-set")
    def _set_changed(self, event: Select.Changed) -> None:
        if not blank(event.value):
            self.set_context(result_set_id=int(event.value))
            self.page_offset = 0
            self.load_page()
            self._focus_table()

    @on(Select.Changed, "#res-query")
    def _query_changed(self, event: Select.Changed) -> None:
        if not blank(event.value):
            self.set_context(query_id=int(event.value))
            self.page_offset = 0
            self.load_page()
            self._focus_table()

    @on(Input.Changed, "#res-search")
    def _search_changed(self) -> None:
        self.page_offset = 0
        self.load_page()

    @on(Input.Submitted, "#res-search")
    def _search_done(self) -> None:
        self._focus_table()

    def action_leave(self) -> None:
        """esc: from the search box or a select back to the table; from the table to the pane
        itself (its keys and the tab digits keep working)."""
        table = self.query_one("#results", DataTable)
        if self.screen.focused in (table, self):
            self.hold_keys()
        else:
            table.focus()

    def fetch(self, rs: int, qid: int, side: str, search: str, k: int, offset: int) -> list[dict]:
        if not search:
            rows = reading.top(self.project, rs, qid, side, k, offset)
        else:
            rows = catalog.stored_results(self.project.db, rs, qid, side, k, offset, search=search)
        seqs = catalog.sequence_rows(self.project.db, [r["seq_idx"] for r in rows])
        for r in rows:
            r["source"] = (seqs.get(r["seq_idx"]) or {}).get("source") or ""
        return rows

    def load_page(self) -> None:
        self.rows.clear()
        self.page_rows = []
        status = self.query_one("#res-status", Label)
        ctx = self.context
        if self.project is None or ctx.result_set_id is None or ctx.query_id is None:
            self.show_rows()
            status.update("no results: run the investigation (tab 3) and choose a query")
            return
        search = self.query_one("#res-search", Input).value.strip()
        self.page_rows = self.fetch(ctx.result_set_id, ctx.query_id, self.side, search, self.PAGE, self.page_offset)
        self.rows = {f"{r['side']}:{r['rank']}": r for r in self.page_rows}
        self.show_rows()
        where = "most positive" if self.side == "top" else "most negative"
        if self.page_rows:
            shown = f"rows {self.page_offset + 1}-{self.page_offset + len(self.page_rows)}" + (f" matching {search!r}" if search else "")
        else:
            shown = f"no rows matching {search!r}" if search else "no rows"
        if search:  # only the stored top and bottom K are in the catalog, so only they are searched
            stored = catalog.count_results(self.project.db, ctx.result_set_id, ctx.query_id, self.side)
            shown += f" (searched: the {stored} stored)"
        stale = ctx.query_id in catalog.stale_queries(self.project.db, ctx.result_set_id)
        status.update(
            f"{where} · result set {ctx.result_set_id} · query {ctx.query_id} · {shown}" + (" · enter opens a row" if self.page_rows else "")
            + f"\n{self._estimator_line(ctx.result_set_id)}"
            + ("\nSTALE: the query was edited after this result set scored it; run the investigation again (tab 3)" if stale else "")
        )
        status.set_class(stale, "stale")
        self.query_one("#res-sign", Label).update(render.sign_note(catalog.query(self.project.db, ctx.query_id)))

    def _estimator_line(self, result_set_id: int) -> str:
        """The damping used (and an iterative estimator's residual), as every result must show."""
        from inflq.reading import estimator_summary

        row = catalog.get_result_set(self.project.db, result_set_id)
        return f"{row['estimator']}: {estimator_summary(row)}" if row else ""

    def _available_width(self) -> int:
        """Columns the table can show without scrolling sideways (its vertical scrollbar taken off)."""
        table = self.query_one("#results", DataTable)
        width = table.size.width or max(0, self.app.size.width - 2)  # not laid out yet: the screen's
        return max(40, width - table.styles.scrollbar_size_vertical)

    def column_widths(self, rows: list[dict], available: int) -> dict[str, int]:
        """The id column as wide as the page's ids (at most ID_WIDTH), the text column what is left."""
        pad = 2 * self.query_one("#results", DataTable).cell_padding
        fmt = score_format(r["score"] for r in rows)
        widths = {
            "rank": max([4] + [len(str(r["rank"])) for r in rows]),
            "score": max([5] + [len(fmt(r["score"])) for r in rows]),
            "id": min(self.ID_WIDTH, max([2] + [len(r["seq_id"]) for r in rows])),
        }
        text = available - sum(w + pad for w in widths.values()) - pad
        source = min(10, max([6] + [len(r["source"]) for r in rows]))
        if text - (source + pad) >= self.MIN_TEXT_WITH_SOURCE:
            widths["source"] = source
            text -= source + pad
        widths["text"] = max(10, text)
        return widths

    def show_rows(self, keep_cursor: bool = False) -> None:
        """(Re)build the table from the page's rows, with columns sized to the pane's width."""
        table = self.query_one("#results", DataTable)
        cursor = table.cursor_row
        available = self._available_width()
        widths = self.column_widths(self.page_rows, available)
        table.clear(columns=True)
        for key in ("rank", "score", "id", "source", "text"):
            if key in widths:
                table.add_column(key, key=key, width=widths[key])
        fmt = score_format(r["score"] for r in self.page_rows)  # one format for the page
        for r in self.page_rows:
            cells = {
                "rank": str(r["rank"]),
                "score": Text(fmt(r["score"]), style="red" if r["score"] > 0 else "blue"),
                "id": render.middle_snippet(r["seq_id"], widths["id"]),
                "source": render.snippet(r["source"], widths.get("source", 0)),
                "text": render.snippet(r["text"], widths["text"]),
            }
            table.add_row(*(cells[k] for k in widths if k in cells), key=f"{r['side']}:{r['rank']}")
        self._laid_out_for = available
        if keep_cursor and 0 < cursor < table.row_count:
            table.move_cursor(row=cursor)

    def on_resize(self) -> None:
        # The first layout (and every terminal resize) may change the room for the text column.
        self.call_after_refresh(self._relayout)

    def _relayout(self) -> None:
        if self.page_rows and self._available_width() != self._laid_out_for:
            self.show_rows(keep_cursor=True)

    @on(DataTable.HeaderSelected, "#results")
    def _sort(self, event: DataTable.HeaderSelected) -> None:
        key = event.column_key
        table = self.query_one("#results", DataTable)
        if key.value in ("rank", "score"):
            table.sort(key, key=lambda v: float(str(v)))
        else:
            table.sort(key)

    @on(DataTable.RowSelected, "#results")
    def _open(self, event: DataTable.RowSelected) -> None:
        
        row = self.rows.get(event.row_key.value)
        if row is not None and not isinstance(self.app.screen, SequenceScreen):
            self.app.push_screen(SequenceScreen(row))

    def action_side(self, side: str) -> None:
        self.side, self.page_offset = side, 0
        self.load_page()

    def action_page(self, step: int) -> None:
        new = max(0, self.page_offset + step * self.PAGE)
        if step > 0 and len(self.page_rows) < self.PAGE:
            self.notify("this is the last page")
            return
        self.page_offset = new
        self.load_page()

    def action_search(self) -> None:
        self.query_one("#res-search", Input).focus()

    def action_export(self) -> None:
        self.inflq.action_export()
