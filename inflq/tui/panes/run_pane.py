"""Tab 3: the run form (plugins with their declared options, numeric settings), start, cancel
and resume, per-phase progress, and the investigation's runs."""

from __future__ import annotations

import time
from typing import Any

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Button, Checkbox, DataTable, Input, Label, Select
from textual.worker import Worker, WorkerState

from ... import catalog, reading
from ...errors import Cancelled, InflqError
from ...options import Option
from ...plugins import get_registry
from ...progress import Monitor, ProgressEvent
from ...settings import RunSettings
from .. import render
from ..compact import CButton, CCheckbox, CInput, CSelect
from ..forms import setting_field, setting_value
from ..phases import PhaseBars, RunProgress
from .pane import Pane, blank


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
    DEPENDS = frozenset({"project", "investigation"})
    BINDINGS = [
        Binding("ctrl+r", "start", "Start run"),
        Binding("ctrl+b", "cancel", "Cancel run"),
        Binding("ctrl+y", "resume", "Resume run"),
    ]
    # The form: the run settings declared for it (inflq/settings.py), in their order; those naming
    # a plugin kind are a select of the registry's plugins and the chosen one's declared options.
    FORM = RunSettings.declared("run form")
    KINDS = tuple(s.plugin for s in FORM if s.plugin)
    NEWEST = -1  # (_cursor_to) the newest run, once a started run has recorded its row

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.monitor: Monitor | None = None
        self._plugins_of = None  # the project whose plugins the selects offer
        self._table_at = 0.0
        self._table_pending = False
        # The run the runs table puts its cursor on at its next reload: the run that has just
        # started (NEWEST, once its row is there) or stopped, so ctrl+y resumes the cancelled one.
        self._cursor_to: int | None = None
        self._runs_before = 0  # the newest run's id when a new run started

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="run-form"):
            for s in self.FORM:
                if not s.plugin:
                    yield setting_field(s, "run")
                    continue
                with Horizontal(classes="field"):
                    yield Label(s.name, classes="field-label")
                    yield CSelect([], allow_blank=True, id=f"sel-{s.plugin}", tooltip=s.help)
                yield Vertical(id=f"opts-{s.plugin}", classes="options")
            with Horizontal(classes="buttons"):
                yield CButton("Start (ctrl+r)", variant="primary", id="start")
                yield CButton("Cancel (ctrl+b)", variant="error", id="cancel", disabled=True)
                yield CButton("Resume (ctrl+y)", id="resume")
            yield PhaseBars(id="phases", bar_classes="phase-bar")
            runs = DataTable(id="runs", cursor_type="row", zebra_stripes=True)
            runs.add_columns("run", "status", "estimator", "filter", "phase", "done")
            yield runs

    def on_mount(self) -> None:
        self.reload_plugins()

    def reload_plugins(self) -> None:
        if self.project is None:
            return
        for kind in self.KINDS:
            classes = get_registry().all(kind)
            sel = self.query_one(f"#sel-{kind}", Select)
            # Whole descriptions: the open list wraps them; the closed select shows one line.
            sel.set_options([(f"{name}: {' '.join(cls.description.split())}", name) for name, cls in sorted(classes.items())])
            default = get_registry().default(kind, required=False)
            if default in classes:
                sel.value = default
        self._plugins_of = self.project

    @on(Select.Changed, "#sel-estimator, #sel-filter, #sel-executor")
    async def _plugin_changed(self, event: Select.Changed) -> None:
        kind = event.select.id.removeprefix("sel-")
        box = self.query_one(f"#opts-{kind}", Vertical)
        await box.remove_children()
        if self.project is None or blank(event.value):
            return
        cls = get_registry().get(kind, str(event.value))
        await box.mount_all([option_widget(kind, o) for o in cls.options])
        if kind == "estimator":
            self._show_query_rank(bool(getattr(cls, "full_rank_queries", False)))

    def _show_query_rank(self, full: bool) -> None:
        """An estimator whose queries are never compressed runs at full rank: the rank field says so
        (and is not offered) rather than show a rank the run would not apply."""
        rank = self.query_one("#run-rank", Input)
        if full:
            rank.value, rank.tooltip, rank.disabled = "full", "this estimator's queries are never compressed: full rank", True
        elif rank.disabled:
            declared = next(s for s in self.FORM if s.name == "rank")
            rank.value, rank.tooltip, rank.disabled = declared.shown(), declared.help, False

    def spec(self, kind: str) -> str:
        """``name:key=value,...`` from the Select and the generated option inputs."""
        value = self.query_one(f"#sel-{kind}", Select).value
        if blank(value):
            raise InflqError(f"choose a {kind}")
        cls = get_registry().get(kind, str(value))
        # A plugin that combines others (Filter.joins: the union) is made from the specs it joins.
        joins = getattr(cls, "joins", None)
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
                if o.name == joins:
                    return v
                if any(c in v for c in ",:"):
                    raise InflqError(f"{kind} option {o.name}: commas and colons are not allowed in a value")
                given.append(f"{o.name}={v}")
        return str(value) + (":" + ",".join(given) if given else "")

    def settings(self) -> RunSettings:
        """The run settings the form gives (the seed: the project's, as on the command line)."""
        values = {s.name: self.spec(s.plugin) if s.plugin else setting_value(self, s, "run") for s in self.FORM}
        return RunSettings.from_values(values, self.project)

    def reload(self) -> None:
        table = self.query_one("#runs", DataTable)
        selected = table.coordinate_to_cell_key((table.cursor_row, 0)).row_key.value if table.row_count else None
        table.clear()
        if self.project is None:
            return
        if self._plugins_of is not self.project:
            self.reload_plugins()
        if self.context.investigation is None:
            return
        inv = catalog.investigation(self.project.db, self.context.investigation)
        rows = catalog.runs_of(self.project.db, inv["id"], newest_first=True)
        if self._cursor_to == self.NEWEST and rows and rows[0]["id"] > self._runs_before:
            self._cursor_to = rows[0]["id"]  # the run just started has its row now
        if self._cursor_to in {r["id"] for r in rows}:
            selected, self._cursor_to = str(self._cursor_to), None
        for i, r in enumerate(rows):
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
            from ...runs import make_estimator, make_executor, make_filter

            make_estimator(settings.estimator)
            make_filter(settings.filter)
            make_executor(settings.executor)
        except InflqError as exc:
            self.inflq.show_error(exc, "Cannot start the run")
            return
        if self._begin():
            rows = catalog.runs_of(self.project.db, catalog.investigation(self.project.db, self.context.investigation)["id"], newest_first=True)
            self._runs_before, self._cursor_to = (rows[0]["id"] if rows else 0), self.NEWEST
            self.start_run_worker(self.context.investigation, settings, None, self.monitor)

    def run_to_resume(self) -> tuple[int | None, str]:
        """The run ctrl+y resumes, and why that one: the highlighted run if it stopped unfinished
        (cancelled, failed or left running by a killed process), else the investigation's latest
        such run (what ``inflq run --resume`` continues). After a cancel the cursor is on the
        cancelled run, so that is the one."""
        from ...runs import interrupted_run

        table = self.query_one("#runs", DataTable)
        highlighted = None
        if table.row_count:
            highlighted = catalog.get_run(self.project.db, int(table.coordinate_to_cell_key((table.cursor_row, 0)).row_key.value))
            if highlighted["status"] != "done" and highlighted.get("kind", "scores") == "scores":
                return highlighted["id"], ""
        latest = interrupted_run(self.project, self.context.investigation)
        if latest is None:
            return None, "no cancelled or failed run to resume"
        why = f"run {highlighted['id']} (highlighted) is complete, so the latest unfinished run: " if highlighted is not None else ""
        return latest["id"], why

    @on(Button.Pressed, "#resume")
    def action_resume(self) -> None:
        if not self.need("investigation"):
            return
        run_id, why = self.run_to_resume()
        if run_id is None:
            self.notify(why, severity="warning")
            return
        if self._begin():
            from ...runs import committed_work

            self._cursor_to = run_id
            self.reload()
            self.notify(f"{why}resuming run {run_id}; {committed_work(self.project, run_id)}", timeout=8)
            self.start_run_worker(self.context.investigation, None, run_id, self.monitor)

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        if self.monitor is None or not self.running:
            self.notify("no run in progress", severity="warning")
            return
        self.monitor.cancel()
        self.notify("cancelling: the run stops after the current batch")

    @property
    def phases(self) -> PhaseBars:
        """The running (or last) run's per-phase progress bars."""
        return self.query_one("#phases", PhaseBars)

    @property
    def running(self) -> bool:
        return any(w.group == "run" and w.is_running for w in self.app.workers)

    def _begin(self) -> bool:
        # A thread worker cannot be stopped by starting another: refuse a second run instead.
        if self.running:
            self.notify("a run is in progress: cancel it (ctrl+b) first", severity="warning")
            return False
        self.phases.reset()
        self._set_running(True)
        # Made here, not in the worker, so a cancel pressed before the thread starts still counts.
        self.monitor = Monitor(on_progress=self._on_progress)
        return True

    def _on_progress(self, ev: ProgressEvent) -> None:
        # Called in the worker thread (post_message is thread-safe); queued events of one phase
        # collapse into the latest (RunProgress.can_replace).
        self.post_message(RunProgress(ev))

    def on_run_progress(self, message: RunProgress) -> None:
        self.phases.show(message.event)
        # The runs table follows the run (its status and phase are in the catalog, written by the
        # run's own connection), at most twice a second.
        # A throttled event leaves a trailing reload, so the table catches up with the last event
        # even when the run then goes quiet for a while (a long batch, a held shard).
        now = time.monotonic()
        if now - self._table_at > 0.5:
            self._table_at = now
            self.reload()
        elif not self._table_pending:
            self._table_pending = True
            self.set_timer(0.5 - (now - self._table_at), self._trailing_reload)

    def _trailing_reload(self) -> None:
        self._table_pending = False
        self._table_at = time.monotonic()
        self.reload()

    @work(thread=True, exclusive=True, exit_on_error=False, group="run")
    def start_run_worker(self, investigation: str, settings: RunSettings | None, resume: int | None, monitor: Monitor):
        from ...project import Project
        from ...runs import run_investigation

        # The run gets its own catalog connection and model, so browsing stays responsive and safe.
        project = Project.open(self.project.root)
        try:
            return run_investigation(project, investigation, settings, monitor, resume=resume)
        finally:
            project.close()

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        # (Pane's handler, called before this one, shows a failed worker's error.)
        if event.worker.group != "run" or event.state not in (WorkerState.SUCCESS, WorkerState.ERROR, WorkerState.CANCELLED):
            return
        self._set_running(False)
        if event.state == WorkerState.SUCCESS:
            self.phases.stop("")
            res = event.worker.result
            rs = catalog.get_result_set(self.project.db, res.result_set_id)
            # The damping used and an iterative estimator's (LiSSA's) convergence residual.
            self.notify(f"run {res.run_id} done in {res.seconds:.1f}s: result set {res.result_set_id} ({rs['estimator']}: {reading.estimator_summary(rs)})", timeout=10)
            self.set_context(result_set_id=res.result_set_id)
        else:
            from ...runs import committed_work, interrupted_run

            cancelled = isinstance(event.worker.error, Cancelled)
            self.phases.stop("(stopped)" if cancelled else "(failed)")
            row = interrupted_run(self.project, self.context.investigation) if self.context.investigation else None
            if row is not None:
                self._cursor_to = row["id"]  # ctrl+y resumes this one, not an older row under the cursor
            if cancelled:
                done = f" {row['id']}; {committed_work(self.project, row['id'])}" if row else ""
                self.notify(f"run{done} cancelled. ctrl+y resumes it", severity="warning", timeout=10)
        self.reload()
