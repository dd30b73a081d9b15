"""Tab 2: the investigation's queries, the query editor (prompt, completion, the measurement and,
for one that compares two completions, the alternative) with its tokens, what the model says, and
(where a gradient index or another interactive estimator serves the project) the top sequences of
the query as it is typed: the index's preview first, then the exact scores of its best candidates,
block by block, until the list is their exact top (ctrl+g re-scores deeper)."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import DataTable, Input, Label, Select, Static
from textual.worker import get_current_worker

from ... import catalog
from ...display import score_format
from ...errors import InflqError
from ...queries import add_query
from .. import render
from ..compact import CButton, CInput, CSelect
from ..worker_failures import failure_note
from .pane import Pane


class QueryPane(Pane):
    DEPENDS = frozenset({"project", "investigation", "query_id"})
    BINDINGS = [
        Binding("ctrl+s", "add", "Add query"),
        Binding("ctrl+l", "inspect", "Model says"),
        Binding("ctrl+g", "deeper", "Re-score deeper"),
    ]
    LIVE_DELAY = 0.35  # seconds after the last keystroke before the live query runs
    LIVE_K = 10  # rows shown: the exact top 10 once converged
    LIVE_BLOCK = 32  # candidates re-scored exactly at a time (a keystroke stops the worker between blocks)
    LIVE_DEPTH: int | None = None  # candidates re-scored (None: inflq.ask.default_depth of the corpus)
    _said_for: tuple | None = None  # the fields (prompt, completion, measurement, alternative) the model-says box is about

    def compose(self) -> ComposeResult:
        table = DataTable(id="queries", cursor_type="row", zebra_stripes=True)
        table.add_columns("id", "prompt", "completion", "measurement", "probes")
        yield table
        with Horizontal(classes="field"):
            yield Label("prompt", classes="field-label")
            yield CInput(placeholder="the first president of the republic of astrobia was", id="prompt")
        with Horizontal(classes="field"):
            yield Label("completion", classes="field-label")
            yield CInput(placeholder="zorald pfaff", id="completion")
        with Horizontal(classes="field"):
            yield Label("measurement", classes="field-label")
            yield CSelect(self._measurements(), id="measurement", allow_blank=False)
            alternative = CInput(placeholder="alternative completion, e.g. velmora", id="alternative")
            alternative.display = False  # shown for a measurement that compares two completions
            yield alternative
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

    @staticmethod
    def _measurements() -> list[tuple[str, str]]:
        """The registered measurements, the default first: (name: what it measures, name)."""
        from ...plugins import get_registry

        reg = get_registry()
        default = reg.default("measurement", required=False)
        names = sorted(reg.names("measurement"), key=lambda n: (n != default, n))
        return [(f"{n}: {reg.get('measurement', n)().formula()}", n) for n in names]

    def _needs_alternative(self, name: object) -> bool:
        from ...plugins import get_registry

        try:
            return bool(get_registry().get("measurement", str(name)).alternative)
        except InflqError:
            return False

    def _measurement(self) -> tuple[str | None, str | None]:
        """The measurement chosen and, where it reads one, the alternative typed."""
        value = self.query_one("#measurement", Select).value
        name = None if value is Select.BLANK else str(value)
        alt = self.query_one("#alternative", Input).value if self._needs_alternative(name) else None
        return name, alt or None

    def reload(self) -> None:
        from ...measuring import describe

        table = self.query_one("#queries", DataTable)
        table.clear()
        if self.project is None or self.context.investigation is None:
            return
        current = 0
        for i, q in enumerate(catalog.queries(self.project.db, self.context.investigation)):
            n = catalog.probe_count(self.project.db, q["id"])
            table.add_row(str(q["id"]), render.snippet(q["prompt"], 32), render.snippet(q["completion"], 16),
                          render.snippet(describe(q), 24), str(n), key=str(q["id"]))
            if q["id"] == self.context.query_id:
                current = i
        if table.row_count:
            table.move_cursor(row=current)

    @on(DataTable.RowSelected, "#queries")
    def _selected(self, event: DataTable.RowSelected) -> None:
        q = catalog.query(self.project.db, int(event.row_key.value))
        self.query_one("#prompt", Input).value = q["prompt"]
        self.query_one("#completion", Input).value = q["completion"]
        self.query_one("#alternative", Input).value = q.get("alternative") or ""
        self.query_one("#measurement", Select).value = q.get("measurement") or self._measurements()[0][1]
        self.set_context(query_id=q["id"])
        self.action_inspect()

    @on(Select.Changed, "#measurement")
    def _measurement_changed(self, event: Select.Changed) -> None:
        self.query_one("#alternative", Input).display = self._needs_alternative(event.value)
        if any(self._fields()):  # not at mount (the select's first value), when there is nothing to measure
            self._changed()

    @on(Input.Changed, "#prompt, #completion, #alternative")
    def _changed(self) -> None:
        current = self._live_fields()
        if self._said_for is not None and current != self._said_for:  # what the model said was about other text
            self._said_for = None
            self.query_one("#model-says", Static).update(Text("(the query changed: ctrl+l asks the model about this one)", style="dim italic"))
        if self.project is not None:
            self.tokenize(self.query_one("#prompt", Input).value, self.query_one("#completion", Input).value)
            self.live_query(current, typed_at=time.perf_counter())

    @work(thread=True, exclusive=True, exit_on_error=False, group="tokenize")
    def tokenize(self, prompt: str, completion: str) -> None:
        from ...measuring import require_known_completion

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

    def _live_fields(self) -> tuple[str, str, str | None, str | None]:
        """What the query measures as the fields say: prompt, completion, measurement, alternative."""
        return (*self._fields(), *self._measurement())

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
        measurement, alternative = self._measurement()
        try:
            qid = add_query(self.project, self.context.investigation, prompt, completion, measurement=measurement, alternative=alternative)
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
        self._said_for = self._live_fields()
        self.inspect(*self._said_for)

    @work(thread=True, exclusive=True, exit_on_error=False, group="inspect")
    def inspect(self, prompt: str, completion: str, measurement: str | None = None, alternative: str | None = None) -> None:
        from ...predictions import completion_token_logprobs, greedy_continuation

        with self.inflq.model_lock:
            per_token = completion_token_logprobs(self.project, prompt, completion)
            other = completion_token_logprobs(self.project, prompt, alternative) if alternative else None
            greedy = greedy_continuation(self.project, prompt, 12)
        total = sum(v for _, v in per_token)
        text = Text()
        text.append("log p(completion | prompt) = ", style="bold")
        text.append(f"{total:.3f} nats (p = {np.exp(total):.3g})\n")
        text.append("per token: " + "  ".join(f"{t.strip()} {v:.2f}" for t, v in per_token) + "\n")
        if other is not None:
            alt_total = sum(v for _, v in other)
            text.append("log p(alternative | prompt) = ", style="bold")
            text.append(f"{alt_total:.3f} nats; margin = {total - alt_total:.3f} nats\n")
        text.append("greedy continuation: ", style="bold")
        text.append(repr(greedy))
        self.app.call_from_thread(self._show_says, (prompt, completion, measurement, alternative), text)

    def _show_says(self, about: tuple, text: Text) -> None:
        if about == self._said_for:  # not if the query was edited meanwhile
            self.query_one("#model-says", Static).update(text)

    # -- the live query ----------------------------------------------------------------------------
    _live: LiveState | None = None  # what the live box shows (and ctrl+g deepens)

    def _scorer(self):
        from ...live import LiveScorer

        scorer = getattr(self, "_live_scorer", None)
        if scorer is None or scorer.project is not self.project:
            scorer = self._live_scorer = LiveScorer(self.project)
        return scorer

    @work(thread=True, exclusive=True, exit_on_error=False, group="live")
    def live_query(self, about: tuple[str, str, str | None, str | None], typed_at: float | None = None) -> None:
        """LIVE_DELAY after the last edit (a newer edit cancels this worker while it waits, and
        between blocks after), the interactive estimator's preview; then, where the exact
        estimator's factors are cached, its exact scores of the preview's top candidates, block by
        block, until the list is the exact top of the candidates."""
        time.sleep(self.LIVE_DELAY)
        worker = get_current_worker()
        if worker.is_cancelled:
            return
        probes = catalog.investigation_probes(self.project.db, self.context.investigation) if self.context.investigation else []
        scorer = self._scorer()
        prompt, completion, measurement, alternative = about
        with self.inflq.model_lock:
            top = scorer.top(prompt, completion, self.LIVE_K, probes, measurement=measurement, alternative=alternative)
            cached = top is not None and scorer.factors_cached()
        if worker.is_cancelled:
            return
        state = LiveState(tuple(about), top, self.LIVE_DEPTH or scorer.default_depth(), started=typed_at or time.perf_counter())
        state.waiting = not cached
        self.app.call_from_thread(self._show_live, state.copy())
        if top is not None and cached:
            self._converge(state, worker)

    def _converge(self, state: LiveState, worker) -> None:
        """Exact scores of the preview's top ``state.depth`` not yet scored, LIVE_BLOCK at a time,
        each block shown as it arrives; stops between blocks once the worker is cancelled."""
        scorer = self._scorer()
        todo = [int(i) for i in state.top.candidates(state.depth) if int(i) not in state.exact]
        state.waiting = False
        for s in range(0, len(todo), self.LIVE_BLOCK):
            if worker.is_cancelled:
                return
            block = todo[s : s + self.LIVE_BLOCK]
            try:
                with self.inflq.model_lock:
                    prompt, completion, measurement, alternative = state.about
                    values, parts = scorer.exact_parts(prompt, completion, np.asarray(block, dtype=np.int64), measurement, alternative)
                    if state.layers is None:
                        state.layers = scorer.modules()[1]
            except InflqError as exc:
                self.app.call_from_thread(self.inflq.show_error, exc)
                return
            if worker.is_cancelled:
                return
            state.exact.update({i: (float(v), p) for i, v, p in zip(block, values, parts, strict=True)})
            state.seconds = time.perf_counter() - state.started
            self.app.call_from_thread(self._show_live, state.copy())

    def _show_live(self, state: LiveState) -> None:
        now = self._live_fields()
        live = self.query_one("#live", Static)
        if state.about != now:  # about text since edited: a newer worker shows its own
            return
        self._live = state
        top = state.top
        live.display = top is not None
        if top is None:
            return
        scorer = self._scorer()
        rows = state.rows(self.LIVE_K)
        seq_ids, texts = scorer.describe([i for i, *_ in rows])
        scored = state.scored()
        text = Text()
        if state.done():
            text.append(f"live: exact top {len(rows)} of the index's best {scored:,} (of {top.num_rows:,}) by {scorer.asker.estimator}", style="bold")
            text.append(f", {state.seconds:.1f} s after the last keystroke\n", style="dim")
            hint = f"ctrl+g: re-score deeper ({min(2 * state.depth, top.num_rows):,})" if scored < top.num_rows else "every sequence is scored exactly"
        else:
            text.append(f"live: top {len(rows)} of {top.num_rows:,}: {top.estimator} preview ({top.seconds * 1000:.0f} ms)", style="bold")
            if state.waiting:
                text.append("\n")
                hint = f"exact scores need {scorer.asker.estimator} factors: ctrl+g fits them (once, cached) and re-scores"
            else:
                text.append(f"; exact {scorer.asker.estimator}: {scored:,}/{min(state.depth, top.num_rows):,} candidates…\n", style="dim")
                hint = ""
        fmt = score_format([r[2] for r in rows])
        spark = state.layers is not None and len(set(state.layers)) <= 24
        for r, ((_idx, kind, score, parts), sid, t) in enumerate(zip(rows, seq_ids, texts, strict=True)):
            text.append(f"{r + 1:>2}. ")
            text.append(f"{kind:<7}", style="bold green" if kind == "exact" else "dim italic")
            text.append(f" {sid}  {fmt(score)}  ", style="bold" if r == 0 and kind == "exact" else "")
            if spark and parts is not None:
                text.append_text(render.layer_spark(layer_scores(parts, state.layers)))
                text.append("  ")
            text.append(render.snippet(t, 200) + "\n")
        if hint:
            text.append(f"    {hint}\n", style="dim")
        if state.done() and rows and rows[0][3] is not None:
            text.append(f"influence by layer of #1 ({seq_ids[0]}):\n", style="bold")
            text.append_text(render.layer_bars(layer_scores(rows[0][3], state.layers), 30))
        if top.probes:
            text.append(f"probes, ranked among the {top.num_rows:,} corpus sequences by the index:\n", style="bold")
            for p in top.probes:
                label = f" {p.label}" if p.label else ""
                text.append(f"   probe {p.id}{label} (query {p.query_id})  {p.score:.4g}  rank {p.rank:,}  ")
                text.append(render.snippet(p.text, 200) + "\n")
        text.rstrip()
        live.update(text)

    def action_deeper(self) -> None:
        """Re-score deeper: twice as many of the preview's candidates (the first time, with no
        cached factors, this fits them and re-scores the preview's top)."""
        state = self._live
        if not self.need() or state is None or state.top is None:
            self.notify("no live results to re-score (type a query; the preview needs a gradient index: inflq index build)", severity="warning")
            return
        state = state.copy()
        if state.waiting:
            state.waiting = False
            self.notify(f"fitting {self._scorer().asker.estimator} factors (once), then re-scoring exactly…")
        else:
            if state.scored() >= state.top.num_rows:
                self.notify("every sequence is scored exactly already")
                return
            state.depth = min(2 * state.depth, state.top.num_rows)
            self.notify(f"re-scoring the preview's best {state.depth:,} exactly…")
        state.started = time.perf_counter()
        self.deepen(state)

    @work(thread=True, exclusive=True, exit_on_error=False, group="live")
    def deepen(self, state: LiveState) -> None:
        self._converge(state, get_current_worker())


def layer_scores(parts: np.ndarray, layers: list) -> dict[str, float]:
    """Per-module scores summed by layer (modules outside a layer under their position)."""
    out: dict[str, float] = {}
    for i, (layer, v) in enumerate(zip(layers, parts, strict=True)):
        key = str(layer) if layer is not None else f"module {i}"
        out[key] = out.get(key, 0.0) + float(v)
    return out


@dataclass
class LiveState:
    """A live query's state: its preview, how deep it is re-scored and the exact scores so far
    (corpus index -> (score, per-module scores))."""

    about: tuple  # prompt, completion, measurement, alternative
    top: object  # LiveTop | None
    depth: int
    exact: dict = field(default_factory=dict)
    started: float = 0.0
    seconds: float = 0.0
    waiting: bool = False  # exact scores wait for ctrl+g (no cached factors)
    layers: list | None = None

    def copy(self) -> LiveState:
        return dataclasses.replace(self, exact=dict(self.exact))

    def scored(self) -> int:
        return len(self.exact)

    def done(self) -> bool:
        """Every candidate at this depth is scored exactly."""
        return self.top is not None and not self.waiting and all(int(i) in self.exact for i in self.top.candidates(self.depth))

    def rows(self, k: int) -> list[tuple[int, str, float, np.ndarray | None]]:
        """The ``k`` rows to show: exact scores first, highest first, then the preview's best not
        yet scored, in its order: ``(corpus index, "exact" or "preview", score, per-module scores)``."""
        exact = sorted(((i, "exact", v, p) for i, (v, p) in self.exact.items()), key=lambda r: (-r[2], r[0]))[:k]
        if len(exact) < k:
            seen = set(self.exact)
            rest = [int(i) for i in self.top.candidates(max(self.depth, k)) if int(i) not in seen][: k - len(exact)]
            exact += [(i, "preview", float(self.top.row[i]), None) for i in rest]
        return exact
