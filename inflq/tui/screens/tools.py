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
from textual.widgets import Button, Footer, Header, Input, Label, Static
from textual.worker import Worker, WorkerState

from ...errors import Cancelled, InflqError
from ...progress import Monitor
from ..compact import CButton, CInput
from ..phases import PhaseBars, RunProgress
from ..workers import WorkerFailures


class ValidateScreen(WorkerFailures, Screen):
    """``inflq validate`` on the current investigation: estimators against the PBRF ground truth
    on a sample of fitting sequences, or (method lds) against retraining on random subsets, and an
    optional EK-FAC damping sweep (esc back). Shows the latest saved LDS validation on opening."""

    BINDINGS = [
        Binding("escape", "back", "Back"),
        Binding("ctrl+r", "start", "Start"),
        Binding("ctrl+b", "cancel", "Cancel"),
        Binding("ctrl+l", "app.validations", "Saved"),
    ]
    # (validate() argument, default shown, what it is)
    FIELDS = (
        ("method", "pbrf", "pbrf (the PBRF ground truth) or lds (retraining on random subsets; resumable)"),
        ("estimators", "identity,ekfac,lissa", "estimator specs to compare, comma-separated"),
        ("sample", "20", "fitting sequences to solve the PBRF for (two solves each)"),
        ("queries", "3", "how many of the investigation's queries"),
        ("fit_sequences", "128", "fitting sequences N for the estimators and the PBRF"),
        ("dampings", "", "EK-FAC dampings to sweep, e.g. 1e-4,1e-2 (blank: none)"),
        ("pbrf_steps", "300", "optimiser steps per PBRF solve (fewer: faster, less exact)"),
        ("max_minutes", "30", "refuse a sample whose PBRF solves would take longer"),
        ("subsets", "32", "lds: subsets to retrain on (each committed as it finishes)"),
        ("fraction", "0.5", "lds: the share of the corpus in each subset"),
        ("trainer", "", "lds: trainer spec, e.g. adamw:epochs=6 (blank: the default)"),
    )

    def __init__(self) -> None:
        super().__init__()
        self.monitor: Monitor | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll(id="validate-body"):
            yield Static("", id="validate-title", classes="hint")
            for name, default, hint in self.FIELDS:
                with Horizontal(classes="field"):
                    yield Label(name.replace("_", " "), classes="field-label")
                    yield CInput(default, placeholder=hint, id=f"val-{name}", tooltip=hint)
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
        from ...validate import parse_list

        raw = {name: self.query_one(f"#val-{name}", Input).value.strip() for name, _, _ in self.FIELDS}

        def whole(name: str) -> int:
            try:
                value = int(raw[name])
            except ValueError:
                raise InflqError(f"{name.replace('_', ' ')} must be a whole number, got {raw[name]!r}") from None
            if value <= 0:
                raise InflqError(f"{name.replace('_', ' ')} must be positive")
            return value

        try:
            minutes = float(raw["max_minutes"])
        except ValueError:
            raise InflqError(f"max minutes must be a number, got {raw['max_minutes']!r}") from None
        estimators = parse_list(raw["estimators"])
        if not estimators:
            raise InflqError("name at least one estimator, e.g. identity,ekfac")
        method = raw["method"].lower()
        if method not in ("pbrf", "lds"):
            raise InflqError(f"method must be pbrf or lds, got {raw['method']!r}")
        if method == "lds":
            try:
                fraction = float(raw["fraction"])
            except ValueError:
                raise InflqError(f"fraction must be a number, got {raw['fraction']!r}") from None
            return {
                "method": "lds", "estimators": estimators, "subsets": whole("subsets"), "fraction": fraction,
                "trainer": raw["trainer"] or None, "dampings": parse_list(raw["dampings"], float), "queries": whole("queries"),
            }
        return {
            "method": "pbrf",
            "estimators": estimators, "sample": whole("sample"), "queries": whole("queries"), "fit_sequences": whole("fit_sequences"),
            "dampings": parse_list(raw["dampings"], float), "pbrf_steps": whole("pbrf_steps"), "max_minutes": minutes,
        }

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
    t = Table(
        "estimator", "pearson", "spearman", "fit s", "inverse-HVP s",
        title=f"validation {v.id}: {len(v.settings['queries'])} queries × {len(v.sample)} sequences vs PBRF "
              f"(ε={v.settings['epsilon']:.3g}, {v.settings['pbrf_seconds']:.0f} s)",
        title_justify="left", box=None, pad_edge=False,
    )
    for r in v.rows:
        t.add_row(r.estimator, f"{r.pearson:.3f}", f"{r.spearman:.3f}", f"{r.fit_seconds:.3f}", f"{r.ihvp_seconds:.4f}")
    if v.recommended_damping is not None:
        t.caption = f"recommended EK-FAC damping: {v.recommended_damping:g} (estimator ekfac:damping={v.recommended_damping:g})"
        t.caption_justify = "left"
    return t


def lds_table(vid, rows, settings: dict, recommended: float | None) -> Table:
    """An LDS validation's scores (``LDSRow``s or saved rows), as ``inflq validate --lds`` prints them."""
    from ...lds import LDS_COLUMNS, lds_table_rows, lds_title, recommendation

    t = Table(*LDS_COLUMNS, title=lds_title(vid, settings), title_justify="left", box=None, pad_edge=False)
    for cells in lds_table_rows(rows):
        t.add_row(*cells)
    if recommended is not None:
        t.caption = recommendation(recommended)
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
