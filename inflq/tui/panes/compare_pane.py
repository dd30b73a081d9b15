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
from ..worker_failures import failure_note
from .pane import Pane, blank


class ComparePane(Pane):
    BINDINGS = [Binding("ctrl+s", "compare", "Compare")]
    _compared: tuple = ()  # (query id, set A, set B) of the comparison shown

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
        """Both selects list the investigation's result sets, those that did not score the current
        query marked so; each defaults to one that did (B the newest, A the one before), and a
        choice is kept while it has the query. With fewer than two such sets the pane says so."""
        if self.project is None or self.context.investigation is None:
            return
        qid = self.context.query_id
        sets = reading.result_sets(self.project, self.context.investigation)
        having = [r["id"] for r in sets if qid in reading.scored_queries(r)]
        opts = [(f"{r['id']}: {r['estimator']} / {r['filter']}" + ("" if r["id"] in having else f" (no query {qid})"), r["id"]) for r in sets]
        chosen: list[int] = []
        for wid, pick in (("#cmp-b", 1), ("#cmp-a", 2)):  # B first: the newest set with the query
            s = self.query_one(wid, Select)
            old = s.value
            s.set_options(opts)
            free = [i for i in having if i not in chosen]
            if old in free:
                s.value = old
            elif len(having) >= pick and free:
                s.value = having[-pick] if having[-pick] in free else free[-1]
            else:
                s.clear()
            if not blank(s.value):
                chosen.append(s.value)
        chosen.reverse()  # (A, B)
        out = self.query_one("#cmp-out", Static)
        if qid is None:
            out.update("choose a query first (Query or Results tab)")
        elif len(having) < 2:
            out.update(self._too_few(qid, having))
            self.query_one("#cmp-tables", Static).update("")
        elif self._compared != (qid, *chosen):  # (a comparison shown for these stays)
            out.update(f"query {qid}: {len(having)} of the {len(sets)} result sets scored it; ctrl+s compares the two chosen")
            self.query_one("#cmp-tables", Static).update("")

    @staticmethod
    def _too_few(qid: int, having: list[int]) -> Text:
        if not having:
            say = f"no result set has query {qid} yet: run the investigation (tab 3) to score it"
        else:
            say = f"only result set {having[0]} has query {qid}: a comparison needs two; run again (tab 3), e.g. with another estimator"
        return Text(say, style="bold")

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
        qid = self.context.query_id
        lacking = [int(x) for x in (a, b) if qid not in reading.scored_queries(catalog.get_result_set(self.project.db, int(x)))]
        if lacking:  # said plainly, where the comparison would be: not an error dialog
            out.update(Text(f"result set {lacking[0]} did not score query {qid} (the query came after its run): choose a set without \"(no query {qid})\"", style="bold"))
            self.query_one("#cmp-tables", Static).update("")
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

    def show_failed_work(self, worker) -> None:
        if worker.group == "load":
            self._compared = ()
            self.query_one("#cmp-out", Static).update(Text(failure_note(worker, "the comparison"), style="bold red"))
            self.query_one("#cmp-tables", Static).update("")

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
        self._compared = (ctx.query_id, a, b)
