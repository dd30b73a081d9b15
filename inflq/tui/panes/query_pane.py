"""Tab 2: the investigation's queries, the query editor with its tokens, what the model says, and
(where a gradient index or another interactive estimator serves the project) the top sequences of
the query as it is typed, re-scored exactly on ctrl+g."""

from __future__ import annotations

import time

import numpy as np
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import DataTable, Input, Label, Static
from textual.worker import get_current_worker

from ... import catalog
from ...errors import InflqError
from ...queries import add_query
from .. import render
from ..compact import CButton, CInput
from ..workers import failure_note
from .pane import Pane


class QueryPane(Pane):
    DEPENDS = frozenset({"project", "investigation", "query_id"})
    BINDINGS = [
        Binding("ctrl+s", "add", "Add query"),
        Binding("ctrl+l", "inspect", "Model says"),
        Binding("ctrl+g", "exact", "Exact top"),
    ]
    LIVE_DELAY = 0.35  # seconds after the last keystroke before the live query runs
    LIVE_K = 5
    _said_for: tuple[str, str] | None = None  # the prompt and completion the model-says box is about

    def compose(self) -> ComposeResult:
        table = DataTable(id="queries", cursor_type="row", zebra_stripes=True)
        table.add_columns("id", "prompt", "completion", "probes")
        yield table
        with Horizontal(classes="field"):
            yield Label("prompt", classes="field-label")
            yield CInput(placeholder="the first president of the republic of astrobia was", id="prompt")
        with Horizontal(classes="field"):
            yield Label("completion", classes="field-label")
            yield CInput(placeholder="zorald pfaff", id="completion")
        with Horizontal(classes="buttons"):
            yield CButton("Add query (ctrl+s)", variant="primary", id="add-query")
            yield CButton("Model says (ctrl+l)", id="inspect")
        # What follows from the query scrolls: at 80x24 the live list would be cut at the bottom.
        with VerticalScroll(id="query-detail"):
            yield Static("", id="tokens", classes="detail")
            yield Static("", id="model-says", classes="detail")
            live = Static("", id="live", classes="detail")
            live.display = False  # shown once an interactive estimator answers
            yield live

    def reload(self) -> None:
        table = self.query_one("#queries", DataTable)
        table.clear()
        if self.project is None or self.context.investigation is None:
            return
        current = 0
        for i, q in enumerate(catalog.queries(self.project.db, self.context.investigation)):
            n = catalog.probe_count(self.project.db, q["id"])
            table.add_row(str(q["id"]), render.snippet(q["prompt"], 36), render.snippet(q["completion"], 18), str(n), key=str(q["id"]))
            if q["id"] == self.context.query_id:
                current = i
        if table.row_count:
            table.move_cursor(row=current)

    @on(DataTable.RowSelected, "#queries")
    def _selected(self, event: DataTable.RowSelected) -> None:
        q = catalog.query(self.project.db, int(event.row_key.value))
        self.query_one("#prompt", Input).value = q["prompt"]
        self.query_one("#completion", Input).value = q["completion"]
        self.set_context(query_id=q["id"])
        self.action_inspect()

    @on(Input.Changed, "#prompt, #completion")
    def _changed(self) -> None:
        current = (self.query_one("#prompt", Input).value, self.query_one("#completion", Input).value)
        if self._said_for is not None and current != self._said_for:  # what the model said was about other text
            self._said_for = None
            self.query_one("#model-says", Static).update(Text("(the query changed: ctrl+l asks the model about this one)", style="dim italic"))
        if self.project is not None:
            self.tokenize(self.query_one("#prompt", Input).value, self.query_one("#completion", Input).value)
            self.live_query(*current)

    @work(thread=True, exclusive=True, exit_on_error=False, group="tokenize")
    def tokenize(self, prompt: str, completion: str) -> None:
        from ...queries import require_known_completion

        try:
            tq = self.project.runtime.tokenize_query(prompt, completion)
            text = Text.assemble(("tokens (measured ones highlighted): ", "bold"), render.query_tokens(self.project.runtime.token_strings(tq.tokens), tq.completion_start))
            try:
                require_known_completion(self.project.runtime.tokenizer, tq, completion)
            except InflqError as exc:
                text.append(f"\n{exc}", style="bold red")
        except InflqError as exc:
            text = Text(str(exc), style="italic")
        self.app.call_from_thread(self._show_tokens, (prompt, completion), text)

    def _fields(self) -> tuple[str, str]:
        return self.query_one("#prompt", Input).value, self.query_one("#completion", Input).value

    def _show_tokens(self, about: tuple[str, str], text: Text) -> None:
        # Workers of earlier keystrokes still finish (a thread cannot be stopped) and may finish
        # after the latest one: only the answer about the text in the fields is shown.
        if about == self._fields():
            self.query_one("#tokens", Static).update(text)

    def show_failed_work(self, worker) -> None:
        """A failed worker's line says so, rather than keeping an answer about other text."""
        if worker.group == "tokenize":
            self.query_one("#tokens", Static).update(Text(failure_note(worker, "tokenizing the query"), style="bold red"))
        elif worker.group == "inspect":
            self._said_for = None
            self.query_one("#model-says", Static).update(Text(failure_note(worker, "asking the model"), style="bold red"))
        elif worker.group == "live":
            self._live_top = None
            live = self.query_one("#live", Static)
            live.update(Text(failure_note(worker, "the live top sequences"), style="bold red"))
            live.display = True

    def action_add(self) -> None:
        if not self.need("investigation"):
            return
        prompt, completion = self.query_one("#prompt", Input).value, self.query_one("#completion", Input).value
        try:
            qid = add_query(self.project, self.context.investigation, prompt, completion)
        except InflqError as exc:
            self.inflq.show_error(exc)
            return
        self.notify(f"query {qid} added")
        self.set_context(query_id=qid)
        self.reload()
        self.action_inspect()

    def action_inspect(self) -> None:
        if not self.need():
            return
        self.query_one("#model-says", Static).update("asking the model…")
        self._said_for = (self.query_one("#prompt", Input).value, self.query_one("#completion", Input).value)
        self.inspect(*self._said_for)

    @work(thread=True, exclusive=True, exit_on_error=False, group="inspect")
    def inspect(self, prompt: str, completion: str) -> None:
        from ...predictions import completion_token_logprobs, greedy_continuation

        with self.inflq.model_lock:
            per_token = completion_token_logprobs(self.project, prompt, completion)
            greedy = greedy_continuation(self.project, prompt, 12)
        total = sum(v for _, v in per_token)
        text = Text()
        text.append("log p(completion | prompt) = ", style="bold")
        text.append(f"{total:.3f} nats (p = {np.exp(total):.3g})\n")
        text.append("per token: " + "  ".join(f"{t.strip()} {v:.2f}" for t, v in per_token) + "\n")
        text.append("greedy continuation: ", style="bold")
        text.append(repr(greedy))
        self.app.call_from_thread(self._show_says, (prompt, completion), text)

    def _show_says(self, about: tuple[str, str], text: Text) -> None:
        if about == self._said_for:  # not if the query was edited meanwhile
            self.query_one("#model-says", Static).update(text)

    # -- the live query ----------------------------------------------------------------------------
    _live_top = None  # the LiveTop shown, for ctrl+g

    def _scorer(self):
        from ...live import LiveScorer

        scorer = getattr(self, "_live_scorer", None)
        if scorer is None or scorer.project is not self.project:
            scorer = self._live_scorer = LiveScorer(self.project)
        return scorer

    @work(thread=True, exclusive=True, exit_on_error=False, group="live")
    def live_query(self, prompt: str, completion: str) -> None:
        """The interactive estimator's top sequences, LIVE_DELAY after the last edit (a newer
        edit cancels this worker while it waits)."""
        time.sleep(self.LIVE_DELAY)
        if get_current_worker().is_cancelled:
            return
        probes = catalog.investigation_probes(self.project.db, self.context.investigation) if self.context.investigation else []
        with self.inflq.model_lock:
            top = self._scorer().top(prompt, completion, self.LIVE_K, probes)
        if not get_current_worker().is_cancelled:
            self.app.call_from_thread(self._show_live, (prompt, completion), top, None)

    def _show_live(self, about: tuple[str, str], top, exact) -> None:
        now = (self.query_one("#prompt", Input).value, self.query_one("#completion", Input).value)
        live = self.query_one("#live", Static)
        if about != now:
            return
        self._live_top = (about, top)
        live.display = top is not None
        if top is None:
            return
        # One line per sequence or probe, cut with an ellipsis at the pane's width (#live in
        # app.tcss; at 80 columns a wrapped list pushed its own end off the screen).
        text = Text()
        text.append(f"live: top {len(top.indices)} by {top.estimator} ({top.seconds * 1000:.0f} ms)", style="bold")
        text.append("   ctrl+g: exact scores\n" if exact is None else "   with exact scores\n", style="dim")
        for r, (sid, s, t) in enumerate(zip(top.seq_ids, top.scores, top.texts, strict=True)):
            ex = "" if exact is None else f"  exact {exact[r]:.4g}"
            text.append(f"{r + 1}. {sid}  {s:.4g}{ex}  ", style="bold" if r == 0 else "")
            text.append(render.snippet(t, 200) + "\n")
        if top.probes:
            text.append(f"probes, ranked among the {top.num_rows:,} corpus sequences:\n", style="bold")
            for p in top.probes:
                label = f" {p.label}" if p.label else ""
                text.append(f"   probe {p.id}{label} (query {p.query_id})  {p.score:.4g}  rank {p.rank:,}  ")
                text.append(render.snippet(p.text, 200) + "\n")
        text.rstrip()
        live.update(text)

    def action_exact(self) -> None:
        if not self.need() or self._live_top is None or self._live_top[1] is None:
            self.notify("no live results to re-score (build a gradient index: inflq index build)", severity="warning")
            return
        self.notify("re-scoring the live top exactly…")
        self.exact(*self._live_top)

    @work(thread=True, exclusive=True, exit_on_error=False, group="exact")
    def exact(self, about: tuple[str, str], top) -> None:
        try:
            with self.inflq.model_lock:
                exact = self._scorer().exact(*about, top.indices)
        except InflqError as exc:
            self.app.call_from_thread(self.inflq.show_error, exc)
            return
        self.app.call_from_thread(self._show_live, about, top, exact)

