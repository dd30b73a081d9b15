"""Tab 6: hand-written probe sequences for the current query, scored (in a worker) with a
chosen estimator and shown as token heat maps."""

from __future__ import annotations

import numpy as np
from rich.console import Group
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import Button, Input, Label, Select, Static
from textual.worker import get_current_worker

from ... import catalog
from ...display import score_format
from ...errors import InflqError
from ...plugins import get_registry
from .. import render
from ..compact import CButton, CInput, CSelect
from ..context import ContextChanged
from ..worker_failures import failure_note
from .pane import Pane


class ProbesPane(Pane):
    BINDINGS = [Binding("ctrl+s", "add", "Add + score")]
    FOCUS = "#probe-text"  # typing a probe must not fire single-letter keys

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._estimators: list[str] = []  # the estimator select's options
        self.shown: list[tuple[int, str]] = []  # (probe id, head line) of the probes listed, in order

    def compose(self) -> ComposeResult:
        yield Label("", id="probe-query", classes="hint")
        with Horizontal(classes="field"):
            yield Label("estimator", classes="field-label")
            yield CSelect([], id="probe-estimator", allow_blank=True, prompt="estimator")
        with Horizontal(classes="field"):
            yield CInput(placeholder="a hand-written candidate training sequence", id="probe-text", select_on_focus=False)
            yield CButton("Add + score (ctrl+s)", variant="primary", id="probe-add")
        yield Label(render.SIGN_NOTE, id="probe-sign", classes="hint")
        # One Static holds the whole list, replaced in one update: no widgets are mounted per
        # probe, so two quick reloads cannot meet half-removed children (DuplicateIds).
        with VerticalScroll(id="probe-list"):
            yield Static("", id="probe-body")

    def reload(self) -> None:
        ctx = self.context
        if self.project is None:
            return
        query = catalog.query(self.project.db, ctx.query_id) if ctx.query_id is not None else None
        self.query_one("#probe-sign", Label).update(render.sign_note(query))
        sel = self.query_one("#probe-estimator", Select)
        names = list(get_registry().names("estimator"))
        if names != self._estimators:  # the select's options: the registry's estimators
            with self.prevent(Select.Changed):
                sel.set_options([(n, n) for n in names])
            self._estimators = names
        default = get_registry().default("estimator", required=False)
        if ctx.result_set_id is not None:
            rs = catalog.get_result_set(self.project.db, ctx.result_set_id)
            default = rs["estimator"].split(":")[0]
        with self.prevent(Select.Changed):
            if default in get_registry().names("estimator"):
                sel.value = default
        if ctx.query_id is None:
            self.query_one("#probe-query", Label).update("choose a query first (Query or Results tab)")
            return
        q = catalog.query(self.project.db, ctx.query_id)
        self.query_one("#probe-query", Label).update(f"probes for query {q['id']}: {render.snippet(q['prompt'], 40)} → {render.snippet(q['completion'], 20)}")
        self.score()

    @on(Select.Changed, "#probe-estimator")
    def _estimator_changed(self) -> None:
        if self.context.query_id is not None:
            self.score()

    @on(Button.Pressed, "#probe-add")
    @on(Input.Submitted, "#probe-text")
    def action_add(self) -> None:
        if not self.need("query"):
            return
        box = self.query_one("#probe-text", Input)
        # A click on the button took the focus: the field gets it back (also under a refusal's
        # dialog, which returns the focus where it was), so the next probe's digits are text.
        self.screen.set_focus(box)
        try:
            self.project.runtime.tokenize_sequence(box.value)
            catalog.add_probe(self.project.db, self.context.query_id, box.value)
        except InflqError as exc:
            self.inflq.show_error(exc)
            return
        box.value = ""
        self.score()

    def score(self) -> None:
        probes = catalog.probes(self.project.db, self.context.query_id)
        body = self.query_one("#probe-body", Static)
        if not probes:
            body.update("no probes yet: write one above")
            return
        body.update(f"scoring {len(probes)} probes…")
        self.score_worker(self.context.query_id, str(self.query_one("#probe-estimator", Select).value), probes)

    def show_failed_work(self, worker) -> None:
        if worker.group == "probes":
            self.query_one("#probe-body", Static).update(Text(failure_note(worker, "scoring the probes"), style="bold red"))

    @work(thread=True, exclusive=True, exit_on_error=False, group="probes")
    def score_worker(self, query_id: int, estimator: str, probes: list[dict]) -> None:
        with self.inflq.model_lock:
            session = self.inflq.probe_session(estimator, query_id)
            scored = session.score_texts([p["text"] for p in probes], query_id)
        if not get_current_worker().is_cancelled:
            self.app.call_from_thread(self.show, probes, scored, estimator)

    def context_changed(self, event: ContextChanged) -> None:
        self.workers.cancel_group(self, "probes")  # scores for the old query are stale
        super().context_changed(event)

    def show(self, probes: list[dict], scored: list, estimator: str) -> None:
        """The probes, highest score first: each a head line (score, id, label, estimator) and its
        token heat map."""
        self.shown = []
        order = np.argsort([-s.total for s in scored])
        fmt = score_format(s.total for s in scored)
        parts = []
        for i in order:
            p, s = probes[i], scored[i]
            head = Text(fmt(s.total), style="bold red" if s.total > 0 else "bold blue")
            head.append(f"  probe {p['id']}", style="dim")
            if p.get("label"):
                head.append(f" {p['label']}", style="bold")
            head.append(f" ({estimator})", style="dim")
            self.shown.append((p["id"], head.plain))
            parts += [head, render.heat_map(s.labels, s.values), Text("")]
        self.query_one("#probe-body", Static).update(Group(*parts))
