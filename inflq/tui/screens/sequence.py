"""One training sequence against one query: token heat map, top tokens, layer chart, metadata,
self-influence on demand, and the user's tags and notes (saved in the catalog)."""

from __future__ import annotations

import json

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.widgets import Button, Footer, Header, Input, Label, Static

from ... import catalog
from ...display import score_format
from .. import render
from ..compact import CButton, CInput
from ..worker_failures import WorkerFailures, failure_note


class SequenceScreen(WorkerFailures, Screen):
    BINDINGS = [
        Binding("escape", "back", "Back"),
        Binding("i", "self_influence", "Self-influence"),
        Binding("ctrl+s", "save_tag", "Save tag"),
    ]

    def __init__(self, row: dict) -> None:
        super().__init__()
        self.row = row

    @property
    def inflq(self):
        return self.app

    def compose(self) -> ComposeResult:
        r = self.row
        yield Header()
        with VerticalScroll(id="seq-body"):
            head = Text()
            head.append(f"{r['seq_id']}", style="bold")
            head.append(f"  {r['side']} #{r['rank']}  score ")
            head.append(f"{r['score']:+.4g}", style="bold red" if r["score"] > 0 else "bold blue")
            head.append(f"  query {r['query_id']} · result set {r['result_set_id']}")
            yield Static(head, id="seq-head")
            yield Label(render.sign_note(self.inflq.project and catalog.query(self.inflq.project.db, r["query_id"])), classes="hint")
            yield Label("Token heat map (per-token influence)", classes="section")
            yield Static("computing the per-token attribution…", id="heat")
            yield Label("Tokens carrying most of the score", classes="section")
            yield Static("", id="top-tokens")
            yield Label("Influence by layer", classes="section")
            yield Static(render.layer_bars(r.get("layer_scores") or "{}", 40), id="layers")
            yield Label("Metadata", classes="section")
            yield Static("", id="meta")
            yield Static("self-influence: press i to compute", id="self-influence")
            yield Label("Tags and notes", classes="section")
            yield Static("", id="tags")
            with Horizontal(classes="field"):
                yield CInput(placeholder="tag: relevant, memorised, …", id="tag")
                yield CInput(placeholder="note (optional)", id="note")
                yield CButton("Save (ctrl+s)", variant="primary", id="save-tag")
        yield Footer()

    def on_mount(self) -> None:
        project = self.inflq.project
        seq = catalog.sequence_rows(project.db, [self.row["seq_idx"]]).get(self.row["seq_idx"], {})
        meta = Text()
        shown = ("seq_id", "doc_id", "chunk", "n_tokens", "source")
        for key in shown:
            meta.append(f"{key}: ", style="bold")
            meta.append(f"{seq.get(key)}  ")
        # The document's other fields (its source is already shown above).
        extra = {k: v for k, v in json.loads(seq.get("meta") or "{}").items() if k not in shown}
        if extra:
            meta.append("\n" + ", ".join(f"{k}={v}" for k, v in extra.items()))
        self.query_one("#meta", Static).update(meta)
        self.show_tags()
        self.attribute()

    @work(thread=True, exclusive=True, exit_on_error=False, group="attribute")
    def attribute(self) -> None:
        app = self.inflq
        with app.model_lock:
            session = app.result_session(self.row["result_set_id"])
            tokens = app.project.runtime.corpus.get(self.row["seq_idx"])
            res = session.attribute(tokens, self.row["query_id"], "token")
        self.app.call_from_thread(self._show_heat, res)

    def _show_heat(self, res) -> None:
        heat = render.heat_map(res.labels, res.values)
        fmt = score_format([res.total, self.row["score"]])
        heat.append(f"\n(tokens sum to {fmt(res.total)}; stored score {fmt(self.row['score'])})", style="dim")
        self.query_one("#heat", Static).update(heat)
        self.query_one("#top-tokens", Static).update(render.top_tokens(res.labels, res.values))
        self.heat_total = res.total

    def show_tags(self) -> None:
        app = self.inflq
        tags = catalog.sequence_tags(app.project.db, app.investigation, self.row["seq_id"]) if app.investigation else []
        self.query_one("#tags", Static).update(
            "\n".join(f"• {t['tag']}" + (f": {t['note']}" if t["note"] else "") for t in tags) or "no tags yet"
        )

    @on(Button.Pressed, "#save-tag")
    @on(Input.Submitted, "#tag, #note")
    def action_save_tag(self) -> None:
        app = self.inflq
        tag, note = self.query_one("#tag", Input).value.strip(), self.query_one("#note", Input).value.strip()
        if not tag and not note:
            self.notify("write a tag or a note first", severity="warning")
            return
        if app.investigation is None:
            self.notify("choose an investigation first", severity="warning")
            return
        catalog.tag_sequence(app.project.db, app.investigation, self.row["seq_id"], tag or "note", note)
        self.query_one("#tag", Input).value = ""
        self.query_one("#note", Input).value = ""
        self.notify(f"tagged {self.row['seq_id']}")
        self.show_tags()

    def action_self_influence(self) -> None:
        self.query_one("#self-influence", Static).update("self-influence: computing…")
        self.self_influence()

    @work(thread=True, exclusive=True, exit_on_error=False, group="self-influence")
    def self_influence(self) -> None:
        from ...reading import self_influence

        app = self.inflq
        rs = catalog.get_result_set(app.project.db, self.row["result_set_id"])
        settings = json.loads(rs["settings"])
        with app.model_lock:
            _, values = self_influence(
                app.project, rs["estimator"], indices=[self.row["seq_idx"]], modules=",".join(settings["modules"]),
                fit_sequences=settings.get("fit_sequences"), seed=settings.get("seed", 0),
            )
        self.app.call_from_thread(
            self.query_one("#self-influence", Static).update,
            f"self-influence ({rs['estimator']}): {float(values[0]):.4g}  (how much the sequence supports itself; high = outlier or memorised)",
        )

    def show_failed_work(self, worker) -> None:
        if worker.group == "self-influence":
            self.query_one("#self-influence", Static).update(failure_note(worker, "self-influence"))
        elif worker.group == "attribute":
            self.query_one("#heat", Static).update(failure_note(worker, "the token heat map"))

    def action_back(self) -> None:
        self.app.pop_screen()
