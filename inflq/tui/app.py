"""The inflq Textual app: a tab per task (investigations, query, run, results, distribution,
probes, compare) over one open project, a factor-set screen (f), with modals for errors, confirmation, export and help."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

from textual import work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.reactive import reactive
from textual.screen import Screen
from textual.worker import Worker

from .. import catalog
from ..errors import Cancelled, InflqError
from ..layout import EXPORTS  # the export dialog's default folder, inside the project
from .context import Context, ContextChanged
from .main_screen import TABS, FactorsScreen, MainScreen
from .panes import Pane
from .screens.modals import ConfirmScreen, ErrorScreen, HelpScreen, InputScreen
from .worker_failures import WorkerFailures


def default_project() -> Path:
    """The demo project: ``projects/demo`` under the working directory or the source checkout."""
    here = Path("projects/demo")
    if here.exists():
        return here
    return Path(__file__).resolve().parents[2] / "projects" / "demo"


def initial_investigation(project) -> str | None:
    """The investigation to open on: the one with the most recent result set, else the one with
    the most recently added query, else the first (so a project opens on its live work)."""
    invs = catalog.investigations(project.db)
    if not invs:
        return None
    return catalog.latest_investigation(project.db) or invs[0]["name"]


class InflqApp(WorkerFailures, App):
    """The inflq terminal UI over one project folder."""

    CSS_PATH = "app.tcss"
    TITLE = "inflq"
    BINDINGS = [
        # Open and Theme are in the help and the palette, not the footer: at 80 columns the
        # footer must keep the tab's own keys, Help and Quit.
        Binding("question_mark", "help", "Help"),
        Binding("o", "open_project", "Open", show=False),
        Binding("ctrl+t", "toggle_theme", "Theme", show=False),
        Binding("f", "factors", "Factors", show=False),
        Binding("q", "quit", "Quit"),
    ]

    #: what the user works on; every pane is told when it changes (ContextChanged)
    context: reactive[Context] = reactive(Context, init=False)

    def __init__(self, project_path: str | Path | None = None) -> None:
        super().__init__()
        self.project_path = Path(project_path) if project_path is not None else default_project()
        self._context_origin: object = None  # the pane changing the context, while it does
        # Workers share the project's model; one at a time uses it (the run has its own).
        self.model_lock = threading.Lock()
        self._result_sessions: dict[int, object] = {}
        self._probe_sessions: dict[tuple[str, int], object] = {}

    # -- lifecycle -----------------------------------------------------------------------------
    def on_mount(self) -> None:
        self.push_screen(MainScreen())
        self.open_project(self.project_path)

    def open_project(self, path: str | Path) -> bool:
        from ..project import Project

        try:
            project = Project.open(Path(path).expanduser())
        except InflqError as exc:
            self.show_error(exc, "Cannot open the project")
            return False
        if self.project is not None:
            self.project.close()
        self.project_path = Path(path)
        self._result_sessions.clear()
        self._probe_sessions.clear()
        self.title = f"inflq — {project.config.name}"
        if project.readonly:
            self.notify("the project is read-only: browsing only", severity="warning")
        # Loaded before the panes hear of the project, so the run form offers the local plugins.
        self._load_local_plugins(project)
        self.context = self._with_defaults(Context(project, initial_investigation(project)))
        self.check_model()
        return True

    def _load_local_plugins(self, project) -> None:
        """The project's local plugins, if the user trusts them (else say how to)."""
        from ..trust import load_project_plugins

        try:
            untrusted = load_project_plugins(project)
        except (InflqError, OSError) as exc:
            self.notify(f"local plugins not loaded: {exc}", severity="warning")
            return
        if untrusted:
            n = len(untrusted)
            self.notify(f"this project has {n} local plugin{'s' if n != 1 else ''}, not loaded: ctrl+p → Trust local plugins", severity="warning", timeout=10)

    @work(thread=True, exclusive=True, exit_on_error=False, group="model-status")
    def check_model(self) -> None:
        status = self.project.model_status()
        if status != "ok":
            try:
                self.project.require_model()
            except InflqError as exc:
                fix = "\n\nIn the UI: ctrl+p → Relink model or corpus, to point the project at a copy." if status == "missing" else ""
                self.call_from_thread(self.show_error, f"{exc}{fix}", "The project's model is not usable")

    @staticmethod
    def _with_defaults(ctx: Context) -> Context:
        """The context with the investigation's first query and latest result set where it has
        none (or one of another investigation)."""
        from .. import reading

        if ctx.project is None or ctx.investigation is None:
            return ctx
        qs = catalog.queries(ctx.project.db, ctx.investigation)
        if qs and ctx.query_id not in {q["id"] for q in qs}:
            ctx = replace(ctx, query_id=qs[0]["id"])
        sets = reading.result_sets(ctx.project, ctx.investigation)
        if sets and ctx.result_set_id not in {r["id"] for r in sets}:
            ctx = replace(ctx, result_set_id=sets[-1]["id"])
        return ctx

    # The context's parts, read by the screens (and tests) as the app's attributes.
    @property
    def project(self):
        return self.context.project

    @property
    def investigation(self) -> str | None:
        return self.context.investigation

    @property
    def query_id(self) -> int | None:
        return self.context.query_id

    @property
    def result_set_id(self) -> int | None:
        return self.context.result_set_id

    def set_context(self, origin: object = None, **changes) -> None:
        """Change the current investigation, query or result set (and what follows from it);
        ``origin``: the pane that asked (it has updated itself; the others are told)."""
        ctx = self.context
        if "investigation" in changes and changes["investigation"] != ctx.investigation:
            ctx = self._with_defaults(Context(ctx.project, changes["investigation"]))
        ctx = replace(ctx, **{k: v for k, v in changes.items() if k in ("query_id", "result_set_id")})
        if not ctx.changed(self.context):
            return
        self._context_origin = origin
        try:
            self.context = ctx
        finally:
            self._context_origin = None

    def watch_context(self, old: Context, new: Context) -> None:
        parts = [f"investigation: {new.investigation or '—'}", f"query: {new.query_id or '—'}", f"results: {new.result_set_id or '—'}"]
        self.sub_title = " · ".join(parts)
        for screen in self.screen_stack:
            for pane in screen.query(Pane):
                pane.post_message(ContextChanged(old, new, self._context_origin))

    # -- shared model sessions -----------------------------------------------------------------
    def result_session(self, rs_id: int):
        """The scoring session of a result set (cached): its saved preconditioned queries."""
        from ..reading import ScoringSession

        if rs_id not in self._result_sessions:
            rs = catalog.get_result_set(self.project.db, rs_id)
            self._result_sessions[rs_id] = ScoringSession.for_result_set(self.project, rs)
        return self._result_sessions[rs_id]

    def probe_session(self, estimator: str, query_id: int):
        """A session for scoring probes against one query (factors come from the cache)."""
        from ..reading import ScoringSession

        key = (estimator, query_id)
        if key not in self._probe_sessions:
            self._probe_sessions[key] = ScoringSession.for_queries(self.project, [query_id], estimator=estimator)
        return self._probe_sessions[key]

    # -- errors --------------------------------------------------------------------------------
    def show_error(self, exc: BaseException | str, title: str = "Something went wrong") -> None:
        if isinstance(exc, InflqError):
            message = str(exc)
        elif isinstance(exc, str):
            message = exc
        else:
            message = f"{type(exc).__name__}: {exc}\n\nThis looks like a bug in inflq or a plugin; please report it."
        self.push_screen(ErrorScreen(title, message))

    def worker_failed(self, worker: Worker) -> None:
        """The one handler of a failed worker, whichever pane, screen or the app started it
        (``WorkerFailures`` brings each failure here once): its error in a modal. A cancelled run
        or validation (``Cancelled``) is not an error."""
        error = worker.error
        if isinstance(error, Cancelled):
            return
        title = "The run failed" if worker.group == "run" else "Something went wrong"
        if worker.group == "run":
            error = f"{error if isinstance(error, InflqError) else type(error).__name__ + ': ' + str(error)}\n\nThe investigation is unchanged. Fix the settings and start again, or resume the run (ctrl+y)."
        self.show_error(error, title)

    # -- actions -------------------------------------------------------------------------------
    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_factors(self) -> None:
        if not isinstance(self.screen, FactorsScreen):
            self.push_screen(FactorsScreen())

    def action_toggle_theme(self) -> None:
        self.theme = "textual-light" if self.current_theme.dark else "textual-dark"

    def action_open_project(self) -> None:
        def done(path: str | None) -> None:
            if path:
                self.open_project(path)

        self.push_screen(InputScreen("Open project folder", str(self.project_path), "path/to/project"), done)

    def action_export(self) -> None:
        if self.project is None or self.investigation is None or self.result_set_id is None:
            self.notify("no result set to export: run the investigation first", severity="warning")
            return
        default = self.project.root / EXPORTS

        def done(folder: str | None) -> None:
            if folder:
                self.export_to(Path(folder).expanduser())

        self.push_screen(InputScreen(f"Export result set {self.result_set_id} (CSV, JSONL, Markdown) to folder", str(default)), done)

    def export_to(self, folder: Path) -> list[Path]:
        from ..export import export_csv, export_jsonl, export_markdown

        try:
            if folder.resolve() == (self.project.root / EXPORTS).resolve() and not folder.exists():
                # The default folder lives inside the project, which may be in a git checkout
                # (the demo is): it keeps itself out of version control.
                folder.mkdir(parents=True)
                (folder / ".gitignore").write_text("# exports written by inflq; delete this file to track them\n*\n")
            folder.mkdir(parents=True, exist_ok=True)
            stem = folder / f"{self.investigation}-results-{self.result_set_id}".replace(" ", "_")
            written = [
                fn(self.project, self.investigation, self.result_set_id, stem.with_suffix(ext))
                for fn, ext in ((export_csv, ".csv"), (export_jsonl, ".jsonl"), (export_markdown, ".md"))
            ]
        except (InflqError, OSError) as exc:
            self.show_error(exc if isinstance(exc, InflqError) else InflqError(f"cannot write to {folder}: {exc}"), "Export failed")
            return []
        self.notify("exported " + ", ".join(p.name for p in written) + f" to {folder}")
        return written

    def action_validate(self) -> None:
        from .screens.tools import ValidateScreen

        if self.project is None or self.investigation is None:
            self.notify("open a project and choose an investigation first", severity="warning")
            return
        if not isinstance(self.screen, ValidateScreen):
            self.push_screen(ValidateScreen())

    def action_validations(self) -> None:
        """The project's saved validations and their tables (``inflq validate``'s)."""
        from .screens.saved_validations import ValidationsScreen

        if self.project is None:
            self.notify("no project is open: press o to open one", severity="warning")
            return
        if not isinstance(self.screen, ValidationsScreen):
            self.push_screen(ValidationsScreen())

    def action_relink(self) -> None:
        """Point the project at local copies of its model or corpus (``inflq relink``), asked for
        one path at a time and confirmed before inflq.toml is rewritten."""
        from .screens.tools import relink_question

        if self.project is None:
            self.notify("no project is open: press o to open one", severity="warning")
            return
        project = self.project
        answers: dict[str, str] = {}

        def relink(yes: bool | None) -> None:
            if not yes:
                self.notify("not relinked")
                return
            model, corpus = answers["model"], answers["corpus"]
            try:
                project.relink(Path(model).expanduser() if model else None, Path(corpus).expanduser() if corpus else None)
            except InflqError as exc:
                self.show_error(exc, "Cannot relink")
                return
            self.notify("relinked: " + ", ".join(k for k in ("model", "corpus") if answers[k]))
            self.open_project(self.project_path)  # the model and corpus load afresh from the new paths

        def got_corpus(path: str | None) -> None:
            if path is None:
                return
            answers["corpus"] = path.strip()
            if not answers["model"] and not answers["corpus"]:
                self.notify("nothing to relink")
                return
            self.push_screen(ConfirmScreen(relink_question(project, answers["model"], answers["corpus"])), relink)

        def got_model(path: str | None) -> None:
            if path is None:
                return
            answers["model"] = path.strip()
            self.push_screen(InputScreen("Relink: a local copy of the corpus file (blank: keep the current one)", "",
                                         str(project.corpus_path)), got_corpus)

        self.push_screen(InputScreen("Relink: a local copy of the model folder (blank: keep the current one)", "",
                                     str(project.model_path)), got_model)

    def action_trust(self) -> None:
        """Trust and load the project's local plugins (``inflq trust``), after confirmation."""
        from ..trust import load_project_plugins, trust
        from .screens.tools import trust_question

        if self.project is None:
            self.notify("no project is open: press o to open one", severity="warning")
            return
        question = trust_question(self.project)
        if question is None:
            self.notify("this project has no local plugins (plugins/*.py): nothing to trust")
            return
        project = self.project

        def done(yes: bool | None) -> None:
            if not yes:
                self.notify("not trusted: the local plugins stay unloaded")
                return
            try:
                names = trust(project.root)
                load_project_plugins(project)
            except InflqError as exc:
                self.show_error(exc, "Cannot trust the plugins")
                return
            self.notify(f"trusted and loaded {', '.join(names)}")
            run = self.screen.query("#pane-run")
            if run:
                run.first().reload_plugins()

        self.push_screen(ConfirmScreen(question), done)

    def get_system_commands(self, screen: Screen):
        yield from super().get_system_commands(screen)
        if isinstance(screen, MainScreen):
            for tid, _label, _ in TABS:
                yield SystemCommand(f"Go to {tid}", f"show the {tid} tab", lambda tid=tid: screen.action_tab(tid))
        yield SystemCommand("Open project", "open another project folder", self.action_open_project)
        yield SystemCommand("Export result set", "write CSV, JSONL and a Markdown report", self.action_export)
        yield SystemCommand("Factor sets", "cached factors and their spectra against the damping", self.action_factors)
        yield SystemCommand("Validate estimators", "correlation with the PBRF ground truth, and a damping sweep (inflq validate)", self.action_validate)
        yield SystemCommand("Saved validations", "every validation the project saved, with its table", self.action_validations)
        yield SystemCommand("Relink model or corpus", "point the project at local copies; fingerprints are checked (inflq relink)", self.action_relink)
        yield SystemCommand("Trust local plugins", "let this project's plugins/*.py run, after confirmation (inflq trust)", self.action_trust)
        # (Textual's own "Keys" shows the focused widget's keys; this is inflq's help, every screen's.)
        yield SystemCommand("Help: every key", "inflq's keys, screen by screen (also ?)", self.action_help)
        yield SystemCommand("Toggle light/dark", "switch between the light and dark theme", self.action_toggle_theme)


def run_tui(project_path: str | None = None) -> None:
    """Open the TUI on ``project_path`` (default: the demo project)."""
    InflqApp(project_path).run()
