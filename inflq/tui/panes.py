"""The tabs of the main screen. Each pane reads the catalog through the headless core when it is
shown (``reload``) and runs anything slow in a thread worker, so the UI never freezes."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.coordinate import Coordinate
from textual.message import Message
from textual.widgets import Button, Checkbox, DataTable, Input, Label, ProgressBar, Select, Static
from textual.worker import Worker, WorkerState

from .. import results
from ..display import score_format
from ..errors import Cancelled, InflqError
from ..options import Option
from ..progress import Monitor, ProgressEvent
from ..settings import RunSettings
from . import render
from .compact import CButton, CCheckbox, CInput, CSelect

if TYPE_CHECKING:
    from .app import InflqApp


def blank(value) -> bool:
    """Whether a Select's value is "nothing chosen" (Select.NULL in Textual 8; BLANK is only the
    constructor's "no value given")."""
    return value is Select.NULL or value is Select.BLANK or value is None


class Pane(Vertical):
    """A tab's content. ``reload`` re-reads what it shows from the catalog."""

    @property
    def inflq(self) -> InflqApp:
        return self.app  # type: ignore[return-value]

    @property
    def project(self):
        return self.inflq.project

    #: the widget that takes keyboard focus when the tab is shown (None: the first input or table)
    FOCUS: str | None = None

    def reload(self) -> None:
        pass

    def activate(self) -> None:
        """Reload (a catalog error becomes a modal) and take the keyboard focus: when the pane comes into view."""
        try:
            self.reload()
        except InflqError as exc:
            self.inflq.show_error(exc)
        self.focus_default()

    def focus_default(self) -> None:
        """Give keyboard focus to the widget the tab is used through, so its keys work at once."""
        targets = [self.query_one(self.FOCUS)] if self.FOCUS else list(self.query("DataTable, Input, Select"))
        for widget in targets:
            if widget.focusable:
                widget.focus()
                return

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        # Worker messages go to the widget that started the worker; errors become a modal.
        self.inflq.worker_failed(event)

    def need(self, *what: str) -> bool:
        """True if the app has a project (and investigation, query, result set as asked)."""
        app = self.inflq
        missing = None
        if app.project is None:
            missing = "No project is open: press o to open one."
        elif "investigation" in what and app.investigation is None:
            missing = "Choose an investigation first (tab 1)."
        elif "query" in what and app.query_id is None:
            missing = "Choose or add a query first (tab 2)."
        elif "result_set" in what and app.result_set_id is None:
            missing = "No result set yet: run the investigation (tab 3)."
        if missing:
            self.notify(missing, severity="warning")
            return False
        return True


class RowTable(DataTable):
    """A row-cursor table where a click on the highlighted row selects it, whichever column is
    clicked (DataTable alone selects only on a click in the cursor's own cell). A double click on
    any row therefore selects it too."""

    async def _on_click(self, event) -> None:
        # Runs before DataTable._on_click (handlers are called along the MRO): put the cursor's
        # column under the click so the base class sees a click on the highlighted cell.
        meta = event.style.meta
        row, column = meta.get("row"), meta.get("column")
        if self.cursor_type == "row" and row is not None and column is not None and row >= 0 and column >= 0 and row == self.cursor_row:
            self.cursor_coordinate = Coordinate(row, column)


# -- investigations ----------------------------------------------------------------------------
class InvestigationsPane(Pane):
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
        runs = {r["investigation_id"]: r["n"] for r in self.project.db.query("SELECT investigation_id, count(*) AS n FROM runs GROUP BY investigation_id")}
        current = 0
        for i, inv in enumerate(self.project.investigations()):
            table.add_row(inv["name"], str(inv["num_queries"]), str(inv["num_result_sets"]), str(runs.get(inv["id"], 0)), key=inv["name"])
            if inv["name"] == self.inflq.investigation:
                current = i
        if table.row_count:
            table.move_cursor(row=current)
        self._detail(self.inflq.investigation)

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
            queries = self.project.queries(name)
            runs = list(self.project.db.query("SELECT r.* FROM runs r JOIN investigations i ON i.id = r.investigation_id WHERE i.name = ? ORDER BY r.id", [name]))
            sets = results.result_sets(self.project, name)
        except InflqError as exc:
            out.update(str(exc))
            return
        lines = Text()
        lines.append(f"{name}: {len(queries)} queries\n", style="bold")
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
        self.inflq.set_context(investigation=event.row_key.value)
        self.notify(f"investigation {event.row_key.value!r} selected")

    def action_new(self) -> None:
        if not self.need():
            return

        def done(name: str | None) -> None:
            if name:
                try:
                    self.project.create_investigation(name)
                except InflqError as exc:
                    self.inflq.show_error(exc)
                    return
                self.inflq.set_context(investigation=name.strip())
                self.reload()

        self.app.push_screen(self.inflq.input_screen("Name of the new investigation", placeholder="e.g. astrobia facts"), done)

    def action_rename(self) -> None:
        name = self._selected()
        if name is None:
            return

        def done(new: str | None) -> None:
            if new and new.strip() != name:
                try:
                    self.project.rename_investigation(name, new.strip())
                except InflqError as exc:
                    self.inflq.show_error(exc)
                    return
                if self.inflq.investigation == name:
                    self.inflq.set_context(investigation=new.strip())
                self.reload()

        self.app.push_screen(self.inflq.input_screen(f"Rename {name!r} to", value=name), done)

    def action_delete(self) -> None:
        name = self._selected()
        if name is None:
            return
        from .modals import ConfirmScreen

        def done(yes: bool | None) -> None:
            if yes:
                try:
                    self.project.delete_investigation(name)
                except InflqError as exc:
                    self.inflq.show_error(exc)
                    return
                if self.inflq.investigation == name:
                    self.inflq.set_context(investigation=None)
                self.notify(f"deleted investigation {name!r}")
                self.reload()

        self.app.push_screen(ConfirmScreen(f"Delete investigation {name!r} with all its queries, probes, runs and results? This cannot be undone."), done)


# -- query editor ------------------------------------------------------------------------------
class QueryPane(Pane):
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
        if self.project is None or self.inflq.investigation is None:
            return
        current = 0
        for i, q in enumerate(self.project.queries(self.inflq.investigation)):
            n = self.project.db["probes"].count_where("query_id = ?", [q["id"]])
            table.add_row(str(q["id"]), render.snippet(q["prompt"], 36), render.snippet(q["completion"], 18), str(n), key=str(q["id"]))
            if q["id"] == self.inflq.query_id:
                current = i
        if table.row_count:
            table.move_cursor(row=current)

    @on(DataTable.RowSelected, "#queries")
    def _selected(self, event: DataTable.RowSelected) -> None:
        q = self.project.query(int(event.row_key.value))
        self.query_one("#prompt", Input).value = q["prompt"]
        self.query_one("#completion", Input).value = q["completion"]
        self.inflq.set_context(query_id=q["id"])
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
        from ..queries import require_known_completion

        try:
            tq = self.project.tokenize_query(prompt, completion)
            text = Text.assemble(("tokens (measured ones highlighted): ", "bold"), render.query_tokens(self.project.token_strings(tq.tokens), tq.completion_start))
            try:
                require_known_completion(self.project.tokenizer, tq, completion)
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
            qid = self.project.add_query(self.inflq.investigation, prompt, completion)
        except InflqError as exc:
            self.inflq.show_error(exc)
            return
        self.notify(f"query {qid} added")
        self.inflq.set_context(query_id=qid)
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
        from ..inspect import completion_token_logprobs, greedy_continuation

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


# -- run panel ---------------------------------------------------------------------------------
class RunProgress(Message):
    """A progress event from the run worker (posted from its thread)."""

    def __init__(self, event: ProgressEvent) -> None:
        super().__init__()
        self.event = event

    def can_replace(self, message: Message) -> bool:
        # A newer event of the same phase supersedes a queued one: the bar shows the latest state
        # however fast batches go, and never a stale one while the worker is in a long batch.
        return isinstance(message, RunProgress) and message.event.phase == self.event.phase


def option_widget(kind: str, opt: Option) -> Horizontal:
    """An input for one declared plugin option (so third-party options need no UI code)."""
    wid = f"opt-{kind}-{opt.name}"
    if opt.type is bool:
        w: Any = CCheckbox(opt.name, value=bool(opt.default), id=wid)
    elif opt.choices:
        w = CSelect([(c, c) for c in opt.choices], value=opt.default if opt.default in opt.choices else Select.BLANK, id=wid)
    else:
        w = CInput(placeholder="default" if opt.default is None else str(opt.default), id=wid)
    w.tooltip = f"{opt.name} ({opt.type.__name__}): {opt.help}"
    row = Horizontal(Label(f" {opt.name}", classes="field-label"), w, classes="field option")
    return row


class RunPane(Pane):
    BINDINGS = [
        Binding("ctrl+r", "start", "Start run"),
        Binding("ctrl+b", "cancel", "Cancel run"),
        Binding("ctrl+y", "resume", "Resume run"),
    ]
    KINDS = ("estimator", "filter", "executor")
    DEFAULTS = {"estimator": "ekfac", "filter": "all", "executor": "local"}
    # (RunSettings field, default shown, hint): the run's numeric settings.
    NUMBERS = (
        ("rank", "32", "low-rank query gradients (blank: full)"),
        ("top_k", "20", "sequences kept per side"),
        ("fit_sequences", "", "sequences to fit factors on (blank: all)"),
        ("shard_size", "", f"advanced: sequences per shard, a resume's unit (blank: {RunSettings.shard_size})"),
    )

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.monitor: Monitor | None = None
        self._bars: dict[str, tuple[Label, ProgressBar]] = {}
        self._last: dict[str, ProgressEvent] = {}
        self._table_at = 0.0

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="run-form"):
            for kind in self.KINDS:
                with Horizontal(classes="field"):
                    yield Label(kind, classes="field-label")
                    yield CSelect([], allow_blank=True, id=f"sel-{kind}")
                yield Vertical(id=f"opts-{kind}", classes="options")
            for name, default, hint in self.NUMBERS:
                with Horizontal(classes="field"):
                    yield Label(name, classes="field-label")
                    yield CInput(default, placeholder=hint, id=f"run-{name}", tooltip=hint)
            with Horizontal(classes="buttons"):
                yield CButton("Start (ctrl+r)", variant="primary", id="start")
                yield CButton("Cancel (ctrl+b)", variant="error", id="cancel", disabled=True)
                yield CButton("Resume (ctrl+y)", id="resume")
            yield Vertical(id="phases")
            runs = DataTable(id="runs", cursor_type="row", zebra_stripes=True)
            runs.add_columns("run", "status", "estimator", "filter", "phase", "done")
            yield runs

    def on_mount(self) -> None:
        self.reload_plugins()

    def reload_plugins(self) -> None:
        if self.project is None:
            return
        for kind in self.KINDS:
            classes = self.project.registry.all(kind)
            sel = self.query_one(f"#sel-{kind}", Select)
            # Whole descriptions: the open list wraps them; the closed select shows one line.
            sel.set_options([(f"{name}: {' '.join(cls.description.split())}", name) for name, cls in sorted(classes.items())])
            if self.DEFAULTS[kind] in classes:
                sel.value = self.DEFAULTS[kind]

    @on(Select.Changed, "#sel-estimator, #sel-filter, #sel-executor")
    async def _plugin_changed(self, event: Select.Changed) -> None:
        kind = event.select.id.removeprefix("sel-")
        box = self.query_one(f"#opts-{kind}", Vertical)
        await box.remove_children()
        if self.project is None or blank(event.value):
            return
        cls = self.project.registry.get(kind, str(event.value))
        await box.mount_all([option_widget(kind, o) for o in cls.options])

    def spec(self, kind: str) -> str:
        """``name:key=value,...`` from the Select and the generated option inputs."""
        value = self.query_one(f"#sel-{kind}", Select).value
        if blank(value):
            raise InflqError(f"choose a {kind}")
        cls = self.project.registry.get(kind, str(value))
        given = []
        for o in cls.options:
            w = self.query_one(f"#opt-{kind}-{o.name}")
            if isinstance(w, Checkbox):
                if w.value != bool(o.default):
                    given.append(f"{o.name}={str(w.value).lower()}")
            elif isinstance(w, Select):
                if not blank(w.value) and w.value != o.default:
                    given.append(f"{o.name}={w.value}")
            elif w.value.strip():
                v = w.value.strip()
                if any(c in v for c in ",:") and not (kind == "filter" and o.name == "of"):
                    raise InflqError(f"{kind} option {o.name}: commas and colons are not allowed in a value")
                given.append(f"{o.name}={v}")
        return str(value) + (":" + ",".join(given) if given else "")

    def settings(self) -> RunSettings:
        def number(name: str, blank: int | None) -> int | None:
            raw = self.query_one(f"#run-{name}", Input).value.strip()
            if not raw:
                return blank
            try:
                value = int(raw)
            except ValueError:
                raise InflqError(f"{name} must be a whole number, got {raw!r}") from None
            if value <= 0:
                raise InflqError(f"{name} must be positive")
            return value

        return RunSettings(
            estimator=self.spec("estimator"), filter=self.spec("filter"), executor=self.spec("executor"),
            rank=number("rank", None), top_k=number("top_k", 20) or 20, fit_sequences=number("fit_sequences", None),
            shard_size=number("shard_size", RunSettings.shard_size) or RunSettings.shard_size, seed=self.project.config.seed,
        )

    def reload(self) -> None:
        table = self.query_one("#runs", DataTable)
        selected = table.coordinate_to_cell_key((table.cursor_row, 0)).row_key.value if table.row_count else None
        table.clear()
        if self.project is None:
            return
        if not self.query_one("#sel-estimator", Select)._options[1:]:
            self.reload_plugins()
        if self.inflq.investigation is None:
            return
        inv = self.project.investigation(self.inflq.investigation)
        for i, r in enumerate(self.project.db["runs"].rows_where("investigation_id = ?", [inv["id"]], order_by="id desc")):
            table.add_row(str(r["id"]), r["status"], render.snippet(r["estimator"], 14), render.snippet(r["filter"], 14), r["phase"] or "", f"{r['done']}/{r['total']}", key=str(r["id"]))
            if str(r["id"]) == selected:
                table.move_cursor(row=i)

    def _set_running(self, running: bool) -> None:
        self.query_one("#start", Button).disabled = running
        self.query_one("#resume", Button).disabled = running
        self.query_one("#cancel", Button).disabled = not running

    @on(Button.Pressed, "#start")
    def action_start(self) -> None:
        if not self.need("investigation"):
            return
        try:
            settings = self.settings()
            from ..runs import make_estimator, make_executor, make_filter

            make_estimator(self.project, settings.estimator)
            make_filter(self.project, settings.filter)
            make_executor(self.project, settings.executor)
        except InflqError as exc:
            self.inflq.show_error(exc, "Cannot start the run")
            return
        if self._begin():
            self.run_worker_(self.inflq.investigation, settings, None, self.monitor)

    @on(Button.Pressed, "#resume")
    def action_resume(self) -> None:
        if not self.need("investigation"):
            return
        table = self.query_one("#runs", DataTable)
        if not table.row_count:
            self.notify("no run to resume", severity="warning")
            return
        run_id = int(table.coordinate_to_cell_key((table.cursor_row, 0)).row_key.value)
        row = self.project.db["runs"].get(run_id)
        if row["status"] == "done":
            self.notify(f"run {run_id} is already complete; choose a cancelled or failed run", severity="warning")
            return
        if self._begin():
            from ..runs import committed_work

            self.notify(f"resuming run {run_id}; {committed_work(self.project, run_id)}", timeout=8)
            self.run_worker_(self.inflq.investigation, None, run_id, self.monitor)

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        if self.monitor is None or not self.running:
            self.notify("no run in progress", severity="warning")
            return
        self.monitor.cancel()
        self.notify("cancelling: the run stops after the current batch")

    @property
    def running(self) -> bool:
        return any(w.group == "run" and w.is_running for w in self.app.workers)

    def _begin(self) -> bool:
        # A thread worker cannot be stopped by starting another: refuse a second run instead.
        if self.running:
            self.notify("a run is in progress: cancel it (ctrl+b) first", severity="warning")
            return False
        self.query_one("#phases", Vertical).remove_children()
        self._bars.clear()
        self._last.clear()
        self._set_running(True)
        # Made here, not in the worker, so a cancel pressed before the thread starts still counts.
        self.monitor = Monitor(on_progress=self._on_progress)
        return True

    def _on_progress(self, ev: ProgressEvent) -> None:
        # Called in the worker thread (post_message is thread-safe); queued events of one phase
        # collapse into the latest (RunProgress.can_replace).
        self.post_message(RunProgress(ev))

    def on_run_progress(self, message: RunProgress) -> None:
        ev = message.event
        if ev.phase not in self._bars:
            label, bar = Label(ev.phase, classes="phase-label"), ProgressBar(total=max(ev.total, 1), show_eta=False, classes="phase-bar")
            self._bars[ev.phase] = (label, bar)
            self.query_one("#phases", Vertical).mount(Horizontal(label, bar, classes="phase"))
        label, bar = self._bars[ev.phase]
        bar.update(total=max(ev.total, 1), progress=ev.done)
        label.update(f"{ev.phase} {ev.done}/{ev.total} {render.eta(ev.eta)}")
        self._last[ev.phase] = ev
        # The runs table follows the run (its status and phase are in the catalog, written by the
        # run's own connection), at most twice a second.
        now = time.monotonic()
        if now - self._table_at > 0.5:
            self._table_at = now
            self.reload()

    def _stop_bars(self, how: str) -> None:
        """A finished or stopped run's bars keep their count but lose the ETA."""
        for phase, (label, _bar) in self._bars.items():
            ev = self._last.get(phase)
            if ev is not None:
                finished = ev.done >= ev.total
                label.update(f"{phase} {ev.done}/{ev.total}" + ("" if finished else f" {how}"))

    @work(thread=True, exclusive=True, exit_on_error=False, group="run")
    def run_worker_(self, investigation: str, settings: RunSettings | None, resume: int | None, monitor: Monitor):
        from ..project import Project
        from ..runs import run_investigation

        # The run gets its own catalog connection and model, so browsing stays responsive and safe.
        project = Project.open(self.project.root)
        try:
            return run_investigation(project, investigation, settings, monitor, resume=resume)
        finally:
            project.close()

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        super().on_worker_state_changed(event)
        if event.worker.group != "run" or event.state not in (WorkerState.SUCCESS, WorkerState.ERROR, WorkerState.CANCELLED):
            return
        self._set_running(False)
        if event.state == WorkerState.SUCCESS:
            self._stop_bars("")
            res = event.worker.result
            rs = self.project.db["result_sets"].get(res.result_set_id)
            # The damping used and an iterative estimator's (LiSSA's) convergence residual.
            self.notify(f"run {res.run_id} done in {res.seconds:.1f}s: result set {res.result_set_id} ({rs['estimator']}: {results.estimator_summary(rs)})", timeout=10)
            self.inflq.set_context(result_set_id=res.result_set_id)
        elif isinstance(event.worker.error, Cancelled):
            from ..runs import committed_work, interrupted_run

            self._stop_bars("(stopped)")
            row = interrupted_run(self.project, self.inflq.investigation) if self.inflq.investigation else None
            done = f"; {committed_work(self.project, row['id'])}" if row else ""
            self.notify(f"run cancelled{done}. Select it and press ctrl+y to resume", severity="warning", timeout=10)
        else:
            self._stop_bars("(failed)")
        self.reload()


# -- results browser ---------------------------------------------------------------------------
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
        yield Label(render.SIGN_NOTE, classes="hint")

    def reload(self) -> None:
        if self.project is None or self.inflq.investigation is None:
            return
        sets = results.result_sets(self.project, self.inflq.investigation)
        s = self.query_one("#res-set", Select)
        with self.prevent(Select.Changed):
            s.set_options([(f"{r['id']}: {r['estimator']} / {r['filter']}", r["id"]) for r in sets])
            if self.inflq.result_set_id in {r["id"] for r in sets}:
                s.value = self.inflq.result_set_id
        q = self.query_one("#res-query", Select)
        with self.prevent(Select.Changed):
            qs = self.project.queries(self.inflq.investigation)
            q.set_options([(f"{x['id']}: {render.snippet(x['prompt'] + ' → ' + x['completion'], 400)}", x["id"]) for x in qs])
            if self.inflq.query_id in {x["id"] for x in qs}:
                q.value = self.inflq.query_id
        self.page_offset = 0
        self.load_page()

    def _focus_table(self) -> None:
        # After the Select's overlay has closed (it gives focus back to the Select first).
        self.call_after_refresh(self.query_one("#results", DataTable).focus)

    @on(Select.Changed, "#res-set")
    def _set_changed(self, event: Select.Changed) -> None:
        if not blank(event.value):
            self.inflq.set_context(result_set_id=int(event.value))
            self.page_offset = 0
            self.load_page()
            self._focus_table()

    @on(Select.Changed, "#res-query")
    def _query_changed(self, event: Select.Changed) -> None:
        if not blank(event.value):
            self.inflq.set_context(query_id=int(event.value))
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
        """esc: from the search box or a select back to the table; from the table to the tab bar."""
        table = self.query_one("#results", DataTable)
        if self.screen.focused is table:
            self.screen.action_leave_field()  # type: ignore[attr-defined]
        else:
            table.focus()

    def fetch(self, rs: int, qid: int, side: str, search: str, k: int, offset: int) -> list[dict]:
        if not search:
            rows = results.top(self.project, rs, qid, side, k, offset)
        else:
            like = f"%{search}%"
            rows = list(self.project.db.query(
                "SELECT * FROM results WHERE result_set_id = ? AND query_id = ? AND side = ? AND (text LIKE ? OR seq_id LIKE ?) "
                "ORDER BY rank LIMIT ? OFFSET ?", [rs, qid, side, like, like, k, offset]))
        seqs = self.project.sequence_rows([r["seq_idx"] for r in rows])
        for r in rows:
            r["source"] = (seqs.get(r["seq_idx"]) or {}).get("source") or ""
        return rows

    def load_page(self) -> None:
        self.rows.clear()
        self.page_rows = []
        status = self.query_one("#res-status", Label)
        app = self.inflq
        if self.project is None or app.result_set_id is None or app.query_id is None:
            self.show_rows()
            status.update("no results: run the investigation (tab 3) and choose a query")
            return
        search = self.query_one("#res-search", Input).value.strip()
        self.page_rows = self.fetch(app.result_set_id, app.query_id, self.side, search, self.PAGE, self.page_offset)
        self.rows = {f"{r['side']}:{r['rank']}": r for r in self.page_rows}
        self.show_rows()
        where = "most positive" if self.side == "top" else "most negative"
        if self.page_rows:
            shown = f"rows {self.page_offset + 1}-{self.page_offset + len(self.page_rows)}" + (f" matching {search!r}" if search else "")
        else:
            shown = f"no rows matching {search!r}" if search else "no rows"
        if search:  # only the stored top and bottom K are in the catalog, so only they are searched
            stored = self.project.db["results"].count_where("result_set_id = ? AND query_id = ? AND side = ?", [app.result_set_id, app.query_id, self.side])
            shown += f" (searched: the {stored} stored)"
        status.update(
            f"{where} · result set {app.result_set_id} · query {app.query_id} · {shown}" + (" · enter opens a row" if self.page_rows else "")
            + f"\n{self._estimator_line(app.result_set_id)}"
        )

    def _estimator_line(self, result_set_id: int) -> str:
        """The damping used (and an iterative estimator's residual), as every result must show."""
        from inflq.results import estimator_summary

        row = next(self.project.db["result_sets"].rows_where("id = ?", [result_set_id]), None)
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
        from .sequence import SequenceScreen

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


# -- distribution ------------------------------------------------------------------------------
class DistributionPane(Pane):
    """The query's score distribution. The plot and the fits scroll together (they need more
    than 24 lines), and the plot is redrawn to the pane's size on every resize. The scroll area
    takes the focus, so the tab is reachable and keyboard-scrollable from any other tab."""

    FOCUS = "#dist-scroll"
    FIT_LINES = 4  # the two tails' fits, the method line and a blank line

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._values: np.ndarray | None = None
        self._drawn_for: tuple[int, int] = (0, 0)

    def compose(self) -> ComposeResult:
        yield Static("", id="dist-title", classes="hint")
        with VerticalScroll(id="dist-scroll", can_focus=True):
            yield Static("", id="dist-plot")
            yield Static("", id="dist-fit", classes="detail")

    def reload(self) -> None:
        from ..stats import powerlaw_tail

        title, plot, fit_box = self.query_one("#dist-title", Static), self.query_one("#dist-plot", Static), self.query_one("#dist-fit", Static)
        app = self.inflq
        self._values = None
        if self.project is None or app.result_set_id is None or app.query_id is None:
            title.update("no distribution: run the investigation and choose a query (Results tab)")
            plot.update("")
            fit_box.update("")
            return
        try:
            values = results.distribution(self.project, app.investigation, app.query_id, app.result_set_id)
        except InflqError as exc:
            title.update(str(exc))
            plot.update("")
            fit_box.update("")
            return
        self._values = values
        title.update(f"query {app.query_id}, result set {app.result_set_id}: CCDF of |score| over {len(values)} scores, log-log (• positive, x negative)")
        self.draw()
        lines = Text()
        for sign, label in ((1, "positive"), (-1, "negative")):
            fit = powerlaw_tail(sign * values)
            lines.append(f"{label} tail: ", style="bold")
            if fit is None:
                lines.append("too few values to fit a power law\n")
            else:
                lines.append(f"alpha = {fit.alpha:.2f} ± {fit.stderr:.2f} (CCDF slope {fit.ccdf_slope:.2f}) over the top {fit.n_tail}, x >= {fit.xmin:.3g}\n")
        lines.append("fit: Hill / continuous maximum-likelihood estimator over the top 20% of each tail", style="dim")
        fit_box.update(lines)

    def draw(self) -> None:
        """The plot at the scroll area's size, leaving room for the fit lines where it can."""
        from ..export import ccdf_plot

        if self._values is None:
            return
        area = self.query_one("#dist-scroll", VerticalScroll).size
        width = max(40, (area.width or self.app.size.width - 4) - 2)  # before the first layout: the pane's likely width
        height = max(10, (area.height or self.app.size.height - 8) - self.FIT_LINES)
        self._drawn_for = (area.width, area.height)
        self.query_one("#dist-plot", Static).update(Text.from_ansi(ccdf_plot(self._values, width, height, color=False)))

    def on_resize(self) -> None:
        self.call_after_refresh(self._redraw_if_resized)

    def _redraw_if_resized(self) -> None:
        size = self.query_one("#dist-scroll", VerticalScroll).size
        if self._values is not None and (size.width, size.height) != self._drawn_for:
            self.draw()


# -- probes ------------------------------------------------------------------------------------
class ProbesPane(Pane):
    BINDINGS = [Binding("ctrl+s", "add", "Add + score")]
    FOCUS = "#probe-text"  # typing a probe must not fire single-letter keys

    def compose(self) -> ComposeResult:
        yield Label("", id="probe-query", classes="hint")
        with Horizontal(classes="field"):
            yield Label("estimator", classes="field-label")
            yield CSelect([], id="probe-estimator", allow_blank=True, prompt="estimator")
        with Horizontal(classes="field"):
            yield CInput(placeholder="a hand-written candidate training sequence", id="probe-text")
            yield CButton("Add + score (ctrl+s)", variant="primary", id="probe-add")
        yield Label(render.SIGN_NOTE, classes="hint")
        yield VerticalScroll(id="probe-list")

    def reload(self) -> None:
        app = self.inflq
        if self.project is None:
            return
        sel = self.query_one("#probe-estimator", Select)
        if not sel._options or len(sel._options) <= 1:
            names = self.project.registry.names("estimator")
            with self.prevent(Select.Changed):
                sel.set_options([(n, n) for n in names])
        default = "ekfac"
        if app.result_set_id is not None:
            rs = self.project.db["result_sets"].get(app.result_set_id)
            default = rs["estimator"].split(":")[0]
        with self.prevent(Select.Changed):
            if default in self.project.registry.names("estimator"):
                sel.value = default
        if app.query_id is None:
            self.query_one("#probe-query", Label).update("choose a query first (Query or Results tab)")
            return
        q = self.project.query(app.query_id)
        self.query_one("#probe-query", Label).update(f"probes for query {q['id']}: {render.snippet(q['prompt'], 40)} → {render.snippet(q['completion'], 20)}")
        self.score()

    @on(Select.Changed, "#probe-estimator")
    def _estimator_changed(self) -> None:
        if self.inflq.query_id is not None:
            self.score()

    @on(Button.Pressed, "#probe-add")
    @on(Input.Submitted, "#probe-text")
    def action_add(self) -> None:
        if not self.need("query"):
            return
        box = self.query_one("#probe-text", Input)
        try:
            self.project.tokenize_sequence(box.value)
            self.project.add_probe(self.inflq.query_id, box.value)
        except InflqError as exc:
            self.inflq.show_error(exc)
            return
        box.value = ""
        self.score()

    def score(self) -> None:
        probes = self.project.probes(self.inflq.query_id)
        listing = self.query_one("#probe-list", VerticalScroll)
        listing.remove_children()
        if not probes:
            listing.mount(Static("no probes yet: write one above"))
            return
        listing.mount(Static(f"scoring {len(probes)} probes…", id="probe-wait"))
        self.score_worker(self.inflq.query_id, str(self.query_one("#probe-estimator", Select).value), probes)

    @work(thread=True, exclusive=True, exit_on_error=False, group="probes")
    def score_worker(self, query_id: int, estimator: str, probes: list[dict]) -> None:
        with self.inflq.model_lock:
            session = self.inflq.probe_session(estimator, query_id)
            scored = session.score_texts([p["text"] for p in probes], query_id)
        self.app.call_from_thread(self.show, probes, scored, estimator)

    def show(self, probes: list[dict], scored: list, estimator: str) -> None:
        listing = self.query_one("#probe-list", VerticalScroll)
        listing.remove_children()
        order = np.argsort([-s.total for s in scored])
        fmt = score_format(s.total for s in scored)
        for i in order:
            p, s = probes[i], scored[i]
            head = Text(fmt(s.total), style="bold red" if s.total > 0 else "bold blue")
            head.append(f"  probe {p['id']}", style="dim")
            if p.get("label"):
                head.append(f" {p['label']}", style="bold")
            head.append(f" ({estimator})", style="dim")
            listing.mount(Vertical(
                Static(head, id=f"probe-{p['id']}"), Static(render.heat_map(s.labels, s.values), id=f"probe-heat-{p['id']}"),
                classes="probe",
            ))


# -- compare -----------------------------------------------------------------------------------
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
        if self.project is None or self.inflq.investigation is None:
            return
        sets = results.result_sets(self.project, self.inflq.investigation)
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
        from ..stats import compare_result_sets

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
            cmp = compare_result_sets(self.project, self.inflq.investigation, int(a), int(b), self.inflq.query_id, k)
        except ValueError:
            self.inflq.show_error(InflqError("top K must be a whole number"))
            return
        except InflqError as exc:
            self.inflq.show_error(exc)
            return
        ids = {**self.project.sequence_rows([i for i, _, _ in cmp.only_a]), **self.project.sequence_rows([i for i, _, _ in cmp.only_b])}
        head = Text()
        head.append(f"query {self.inflq.query_id}: result set {a} vs {b}\n", style="bold")
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
        out.update(head)
        self.query_one("#cmp-tables", Static).update(Group(*tables))
        self.last = cmp


def layer_scores_of(row: dict) -> dict[str, float]:
    return json.loads(row.get("layer_scores") or "{}")


# -- factors -----------------------------------------------------------------------------------
class FactorsPane(Pane):
    """The project's cached factor sets and, for the highlighted one, each module's spectrum against
    the damping a run would add (``inflq factors show``), with the histogram of log10(λ / damping)."""

    BINDINGS = [Binding("d", "delete", "Delete")]

    def compose(self) -> ComposeResult:
        yield Label("Factor sets, shared by all investigations: ↑↓ spectra · d delete · esc back", classes="hint")
        table = RowTable(id="factor-sets", cursor_type="row", zebra_stripes=True)
        table.add_columns("id", "estimator", "settings", "sequences", "size", "runs", "model")
        yield table
        with VerticalScroll(id="factor-detail-scroll"):
            yield Static("", id="factor-detail", classes="detail")

    def reload(self) -> None:
        from ..factors import factor_sets

        table = self.query_one("#factor-sets", DataTable)
        table.clear()
        detail = self.query_one("#factor-detail", Static)
        if self.project is None:
            detail.update("No project is open: press o to open one.")
            return
        rows = factor_sets(self.project)
        for r in rows:
            size = f"{r['size_bytes'] / 2**20:.1f} MiB" if r["size_bytes"] is not None else "missing"
            table.add_row(str(r["id"]), r["estimator"], r["settings"], str(r["num_sequences"]), size, str(r["runs"]),
                          "current" if r["current_model"] else "other", key=str(r["id"]))
        if not rows:
            detail.update("No factor sets yet: a run (tab 3) fits them, or `inflq factors fit` ahead of time.")
            return
        table.move_cursor(row=len(rows) - 1)
        self._detail(rows[-1]["id"])

    def _detail(self, fs_id: int) -> None:
        from ..factors import spectra, spectrum_plot, spectrum_table

        out = self.query_one("#factor-detail", Static)
        try:
            items = spectra(self.project, fs_id)
        except InflqError as exc:
            out.update(str(exc))
            return
        t = spectrum_table(items, fs_id, box=None, pad_edge=False)
        width = max(40, (self.size.width or 80) - 4)
        note = Text("damping = 0.1 × mean λ per module (a run's default); eff. dim = Σ λ/(λ + damping)", style="dim")
        out.update(Group(t, note, Text.from_ansi(spectrum_plot(items, width, 14, color=False))))

    @on(DataTable.RowHighlighted, "#factor-sets")
    def _highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key.value is not None:
            self._detail(int(event.row_key.value))

    def action_delete(self) -> None:
        table = self.query_one("#factor-sets", DataTable)
        if self.project is None or not table.row_count:
            return
        fs_id = int(table.coordinate_to_cell_key((table.cursor_row, 0)).row_key.value)
        from ..factors import remove_factor_set
        from .modals import ConfirmScreen

        def done(yes: bool | None) -> None:
            if yes:
                try:
                    remove_factor_set(self.project, fs_id)
                except InflqError as exc:
                    self.inflq.show_error(exc)
                    return
                self.notify(f"removed factor set {fs_id}; a run that needs it fits it again")
                self.reload()

        self.app.push_screen(ConfirmScreen(f"Remove factor set {fs_id}? Runs keep their scores; a later run refits what it needs."), done)
