"""Tab 7: two result sets compared on the current query (rank correlation, top-K overlap and
what each ranks high that the other does not). The score matrices are loaded in a worker."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import Button, Input, Label, Select, Static
from textual.worker import get_current_worker

from ... import catalog, reading
from ...display import score_format
from ...errors import InflqError
from ..compact import CButton, CInput, CSelect
from ..context import Context, ContextChanged
from .pane import Pane, blank


class ComparePane(Pane):
    BINDINGS = [Binding("ctrl+s", "compare", "Compare")]

    def compose(self) -> ComposeResult:
        with Horizontal(classes="field"):
            yield CSelect([], id="cmp-a", prompt="result set A")
            yield CSelect([], id="cmp-b", prompt="result set B")
        with Horizontal(classes="field"):
            yield Label("top K", classes="field-label")
            yield CInput("10", id="cmp-k")
            yield CButton("Compare (ctrl+s)", variant="primary", id="cmp-go")
        with VerticalScroll():
            yield Static("", id="cmp-out", classes="detail")
            yield Static("", id="cmp-tables", classes="detail")

    def reload(self) -> None:
        if self.project is None or self.context.investigation is None:
            return
        sets = reading.result_sets(self.project, self.context.investigation)
        opts = [(f"{r['id']}: {r['estimator']} / {r['filter']}", r["id"]) for r in sets]
        for wid, pick in (("#cmp-a", -2), ("#cmp-b", -1)):
            s = self.query_one(wid, Select)
            old = s.value
            s.set_options(opts)
            ids = [r["id"] for r in sets]
            if old in ids:
                s.value = old
            elif len(ids) >= 2:
                s.value = ids[pick]

    @on(Button.Pressed, "#cmp-go")
    @on(Input.Submitted, "#cmp-k")
    def action_compare(self) -> None:
        if not self.need("investigation", "query"):
            return
        a, b = self.query_one("#cmp-a", Select).value, self.query_one("#cmp-b", Select).value
        out = self.query_one("#cmp-out", Static)
        if blank(a) or blank(b):
            out.update("choose two result sets (they need a run each)")
            self.query_one("#cmp-tables", Static).update("")
            return
        try:
            k = int(self.query_one("#cmp-k", Input).value)
        except ValueError:
            self.inflq.show_error(InflqError("top K must be a whole number"))
            return
        self.compare(self.context, int(a), int(b), k)

    def context_changed(self, event: ContextChanged) -> None:
        self.workers.cancel_group(self, "load")  # a comparison for the old query is stale
        super().context_changed(event)

    @work(thread=True, exclusive=True, exit_on_error=False, group="load")
    def compare(self, ctx: Context, a: int, b: int, k: int) -> None:
        """Both result sets' score matrices are read off the UI thread (an error becomes a modal)."""
        from ...stats import compare_result_sets

        cmp = compare_result_sets(ctx.project, ctx.investigation, a, b, ctx.query_id, k)
        ids = {**catalog.sequence_rows(ctx.project.db, [i for i, _, _ in cmp.only_a]), **catalog.sequence_rows(ctx.project.db, [i for i, _, _ in cmp.only_b])}
        if not get_current_worker().is_cancelled:
            self.app.call_from_thread(self._show, ctx, a, b, k, cmp, ids)

    def _show(self, ctx: Context, a: int, b: int, k: int, cmp, ids: dict) -> None:
        if ctx is not self.context:  # the query or investigation changed meanwhile
            return
        head = Text()
        head.append(f"query {ctx.query_id}: result set {a} vs {b}\n", style="bold")
        head.append(f"Spearman rank correlation: {cmp.spearman:.3f} over {cmp.n_common} sequences scored by both\n")
        head.append(f"top-{cmp.k} overlap: {cmp.overlap}/{cmp.k}\n")
        tables = []
        for title, rows, other in ((f"high in {a}, not in {b}'s top {k}", cmp.only_a, b), (f"high in {b}, not in {a}'s top {k}", cmp.only_b, a)):
            t = Table(title=title, title_justify="left", box=None, expand=False, min_width=44)
            t.add_column("id")
            t.add_column("score", justify="right")
            t.add_column(f"rank in {other}", justify="right")
            fmt = score_format(score for _, score, _ in rows)
            for idx, score, rank in rows:
                t.add_row(ids.get(idx, {}).get("seq_id", str(idx)), fmt(score), "—" if rank is None else str(rank))
            tables.append(t)
        self.query_one("#cmp-out", Static).update(head)
        self.query_one("#cmp-tables", Static).update(Group(*tables))
