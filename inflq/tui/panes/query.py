"""Tab 2: the investigation's queries, the query editor with its tokens, and what the model says."""

from __future__ import annotations

import numpy as np
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import DataTable, Input, Label, Static

from ... import catalog
from ...errors import InflqError
from ...queries import add_query
from .. import render
from ..compact import CButton, CInput
from .base import Pane


class QueryPane(Pane):
    DEPENDS = frozenset({"project", "investigation", "query_id"})
    BINDINGS = [
        Binding("ctrl+s", "add", "Add query"),
        Binding("ctrl+l", "inspect", "Model says"),
    ]
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
        yield Static("", id="tokens", classes="detail")
        yield Static("", id="model-says", classes="detail")

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
        self.app.call_from_thread(self.query_one("#tokens", Static).update, text)

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
        from ...inspect import completion_token_logprobs, greedy_continuation

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
