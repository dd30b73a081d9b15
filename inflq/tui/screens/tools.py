"""What the CLI's maintenance commands do, in the TUI: validating estimators against the PBRF
ground truth or retraining (``inflq validate [--lds]``), relinking the model or corpus (``inflq relink``) and trusting
a project's local plugins (``inflq trust``). Validation runs in a thread worker with progress
bars and a cancel; relink and trust ask for confirmation first."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.widgets import Button, Footer, Header, Input, Static
from textual.worker import Worker, WorkerState

from ...errors import Cancelled, InflqError
from ...progress import Monitor
from ...settings import ValidationSettings
from ..compact import CButton
from ..forms import setting_field, setting_value
from ..phases import PhaseBars, RunProgress
from ..worker_failures import WorkerFailures


class ValidateScreen(WorkerFailures, Screen):
    """``inflq validate`` on the current investigation: estimators against the PBRF ground truth
    on a sample of fitting sequences, or (method lds) against retraining on random subsets, and an
    optional sweep of the default estimator's damping (esc back). Shows the latest saved LDS validation on opening."""

    BINDINGS = [
        Binding("escape", "back", "Back"),
        Binding("ctrl+r", "start", "Start"),
        Binding("ctrl+b", "cancel", "Cancel"),
        Binding("ctrl+l", "app.validations", "Saved"),
    ]
    # The validation settings declared for this form (inflq/settings.py), in their order; the
    # method's other settings take their declared defaults, as on the command line.
    FIELDS = ValidationSettings.declared("validate form")

    def __init__(self) -> None:
        super().__init__()
        self.monitor: Monitor | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll(id="validate-body"):
            yield Static("", id="validate-title", classes="hint")
            for s in self.FIELDS:
                yield setting_field(s, "val")
            with Horizontal(classes="buttons"):
                yield CButton("Start (ctrl+r)", variant="primary", id="val-start")
                yield CButton("Cancel (ctrl+b)", variant="error", id="val-cancel", disabled=True)
            yield PhaseBars(id="val-phases")
            yield Static("", id="val-result", classes="detail")
        yield Footer()

    def on_mount(self) -> None:
        app = self.app
        self.query_one("#validate-title", Static).update(
            f"Validate estimators on investigation {app.investigation!r}: Pearson and Spearman correlation with the PBRF "
            "ground truth, or (method lds) the linear datamodeling score against retraining (docs/validation.md). "
            "The same as `inflq validate [--lds]`; results are saved with the project."
        )
        self.query_one("#val-estimators", Input).focus()
        if app.project is not None:
            from ... import catalog

            rows = catalog.validation_rows(app.project.db, method="lds")
            if rows:
                self.query_one("#val-result", Static).update(lds_table(rows[0]["validation"], rows, rows[0]["settings"], rows[0]["settings"].get("recommended_damping")))

    def _arguments(self) -> dict:
        """The method and its keyword arguments (``validate`` or ``validate_lds``'s), from the form."""
        settings = ValidationSettings.from_values({s.name: setting_value(self, s, "val") for s in self.FIELDS})
        method = settings.method_of()
        return {"method": method, **settings.values(method)}

    @property
    def running(self) -> bool:
        return any(w.group == "validate" and w.is_running for w in self.workers)

    @on(Button.Pressed, "#val-start")
    def action_start(self) -> None:
        app = self.app
        if app.project is None or app.investigation is None:
            self.notify("open a project and choose an investigation first", severity="warning")
            return
        if self.running:
            self.notify("a validation is running: cancel it (ctrl+b) first", severity="warning")
            return
        try:
            kwargs = self._arguments()
        except InflqError as exc:
            app.show_error(exc, "Cannot start the validation")
            return
        self.phases.reset()
        self.query_one("#val-result", Static).update(Text("validating… (the PBRF solves or the retraining take a while; ctrl+b cancels)", style="italic"))
        self._set_running(True)
        self.monitor = Monitor(on_progress=lambda ev: self.post_message(RunProgress(ev)))
        self.validate_worker(app.investigation, kwargs, self.monitor)

    @on(Button.Pressed, "#val-cancel")
    def action_cancel(self) -> None:
        if self.monitor is None or not self.running:
            self.notify("no validation in progress", severity="warning")
            return
        self.monitor.cancel()
        self.notify("cancelling: the validation stops after the current step (LDS keeps the subsets already retrained)")

    def action_back(self) -> None:
        if self.running and self.monitor is not None:
            self.monitor.cancel()  # nothing is left half-saved: results at the end, LDS subsets as each finishes
        self.app.pop_screen()

    def _set_running(self, running: bool) -> None:
        self.query_one("#val-start", Button).disabled = running
        self.query_one("#val-cancel", Button).disabled = not running

    @property
    def phases(self) -> PhaseBars:
        """The validation's per-phase progress bars."""
        return self.query_one("#val-phases", PhaseBars)

    def on_run_progress(self, message: RunProgress) -> None:
        self.phases.show(message.event)

    @work(thread=True, exclusive=True, exit_on_error=False, group="validate")
    def validate_worker(self, investigation: str, kwargs: dict, monitor: Monitor):
        from ...lds import validate_lds
        from ...project import Project
        from ...validate import validate

        # Its own catalog connection and model, as a run has: browsing stays responsive and safe.
        project = Project.open(self.app.project.root)
        kwargs = dict(kwargs)
        run = validate_lds if kwargs.pop("method") == "lds" else validate
        try:
            return run(project, investigation, monitor=monitor, **kwargs)
        finally:
            project.close()

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.worker.group != "validate" or event.state not in (WorkerState.SUCCESS, WorkerState.ERROR, WorkerState.CANCELLED):
            return
        self._set_running(False)
        self.phases.stop("" if event.state == WorkerState.SUCCESS else "(stopped)")  # no ETA
        out = self.query_one("#val-result", Static)
        if event.state == WorkerState.SUCCESS:
            v = event.worker.result
            out.update(lds_table(v.id, v.rows, v.settings, v.recommended_damping) if hasattr(v, "measured") else validation_table(v))
        elif isinstance(event.worker.error, Cancelled):
            out.update(Text("cancelled: nothing was saved (LDS: the subsets retrained so far were; start again to resume)", style="italic"))
        else:
            out.update("")  # (the error itself: WorkerFailures shows it)


def validation_table(v) -> Table:
    """A validation's correlations, as ``inflq validate`` prints them."""
    from ...display import plural
    from ...validations import PBRF_COLUMNS, pbrf_table_rows

    t = Table(
        *PBRF_COLUMNS,
        title=f"validation {v.id}: {plural(len(v.settings['queries']), 'query')} × {plural(len(v.sample), 'sequence')} vs PBRF "
              f"(ε={v.settings['epsilon']:.3g}, {v.settings['pbrf_seconds']:.0f} s)",
        title_justify="left", box=None, pad_edge=False,
    )
    for cells in pbrf_table_rows([{**r.__dict__, "num_queries": len(v.settings["queries"]), "num_sequences": len(v.sample)} for r in v.rows]):
        t.add_row(*cells)
    if v.recommended_damping is not None:
        from ...lds import recommendation

        t.caption = recommendation(v.recommended_damping, v.settings.get("damping_sweep"), "the PBRF")
        t.caption_justify = "left"
    return t


def lds_table(vid, rows, settings: dict, recommended: float | None) -> Table:
    """An LDS validation's scores (``LDSRow``s or saved rows), as ``inflq validate --lds`` prints them."""
    from ...lds import LDS_COLUMNS, lds_table_rows, lds_title, recommendation, swept_estimator

    t = Table(*LDS_COLUMNS, title=lds_title(vid, settings), title_justify="left", box=None, pad_edge=False)
    for cells in lds_table_rows(rows):
        t.add_row(*cells)
    if recommended is not None:
        t.caption = recommendation(recommended, swept_estimator(settings, rows))
        t.caption_justify = "left"
    return t


def relink_question(project, model: str, corpus: str) -> str:
    """What a relink will do, for the confirmation dialog."""
    parts = []
    if model:
        parts.append(f"the model to {Path(model).expanduser()} (now {project.model_path})")
    if corpus:
        parts.append(f"the corpus to {Path(corpus).expanduser()} (now {project.corpus_path})")
    return f"Point {project.root} at " + " and ".join(parts) + "? The copies' content fingerprints are checked first; inflq.toml is rewritten."


def trust_question(project) -> str | None:
    """The trust dialog's question, naming the plugin files (None: the folder has none)."""
    from ...trust import is_trusted, plugin_files

    files = plugin_files(project.root)
    if not files:
        return None
    state = "already trusted; trust them again" if is_trusted(project.root) else "not trusted"
    names = ", ".join(f.name for f in files)
    return (f"{project.root} has {len(files)} local plugin file{'s' if len(files) != 1 else ''} ({names}), {state}. "
            "Trusting them lets them run with your permissions, now and whenever this folder is opened, until a file changes. "
            "Trust and load them?")
