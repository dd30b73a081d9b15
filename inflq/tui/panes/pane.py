"""What every tab's pane shares: the context it shows, reloading when that changes, the keyboard
focus when shown, failed workers (``WorkerFailures``), and a row table that opens a row on a click."""

from __future__ import annotations

from typing import Any

from textual.containers import Vertical
from textual.coordinate import Coordinate
from textual.widget import Widget
from textual.widgets import DataTable, Select

from ...errors import InflqError
from ..context import Context, ContextChanged
from ..worker_failures import WorkerFailures


def blank(value) -> bool:
    """Whether a Select's value is "nothing chosen" (Select.NULL in Textual 8; BLANK is only the
    constructor's "no value given")."""
    return value is Select.NULL or value is Select.BLANK or value is None


class Pane(WorkerFailures, Vertical):
    """A tab's content. ``reload`` re-reads what it shows from the catalog: when the tab is shown,
    and when the context it depends on (``DEPENDS``) changes while it is in view."""

    #: the context fields whose change makes the pane reload
    DEPENDS: frozenset[str] = frozenset({"project", "investigation", "query_id", "result_set_id"})
    #: the widget that takes keyboard focus when the tab is shown (None: the first input or table)
    FOCUS: str | None = None

    @property
    def inflq(self) -> Any:
        """The app's services (show_error, worker_failed, model_lock, the scoring sessions, set_context)."""
        return self.app

    @property
    def context(self) -> Context:
        return self.app.context  # type: ignore[attr-defined]

    @property
    def project(self):
        return self.context.project

    def set_context(self, **changes) -> None:
        """Change the app's context; every other pane is told (this one updates itself)."""
        self.inflq.set_context(origin=self, **changes)

    def reload(self) -> None:
        pass

    def reload_or_report(self) -> None:
        """Reload; a catalog error becomes a modal."""
        try:
            self.reload()
        except InflqError as exc:
            self.inflq.show_error(exc)

    def activate(self) -> None:
        """Reload and take the keyboard focus: when the pane comes into view."""
        self.reload_or_report()
        self.focus_default()

    def hold_keys(self) -> None:
        """esc: leave whatever field has the focus and give it to the pane itself, so that its own
        keys (the footer's), the tab digits and the single-letter keys all work. The pane is a
        focus stop only while it holds the focus (tab never lands on it)."""
        self.can_focus = True
        self.screen.set_focus(self)

    def on_blur(self) -> None:
        self.can_focus = False

    @property
    def in_view(self) -> bool:
        """Whether the pane is shown on its screen (its tab is the active one)."""
        return all(node.display for node in self.ancestors_with_self if isinstance(node, Widget))

    def on_context_changed(self, event: ContextChanged) -> None:
        self.context_changed(event)

    def context_changed(self, event: ContextChanged) -> None:
        """Reload if in view and the change concerns the pane (a hidden pane reloads when shown)."""
        if event.origin is not self and event.changed & self.DEPENDS and self.in_view:
            self.reload_or_report()

    def focus_default(self) -> None:
        """Give keyboard focus to the widget the tab is used through, so its keys work at once.
        At once, not after the queued events: keys typed right after a tab's digit reach it."""
        targets = [self.query_one(self.FOCUS)] if self.FOCUS else list(self.query("DataTable, Input, Select"))
        for widget in targets:
            if widget.focusable:
                self.screen.set_focus(widget)
                return

    def need(self, *what: str) -> bool:
        """True if there is a project (and investigation, query, result set as asked)."""
        ctx = self.context
        missing = None
        if ctx.project is None:
            missing = "No project is open: press o to open one."
        elif "investigation" in what and ctx.investigation is None:
            missing = "Choose an investigation first (tab 1)."
        elif "query" in what and ctx.query_id is None:
            missing = "Choose or add a query first (tab 2)."
        elif "result_set" in what and ctx.result_set_id is None:
            missing = "No result set yet: run the investigation (tab 3)."
        if missing:
            self.notify(missing, severity="warning")
            return False
        return True


class RowTable(DataTable):
    """A row-cursor table where a click on the highlighted row selects it, whichever column is
    clicked (DataTable alone selects only on a click in the cursor's own cell). A double click on
    any row therefore selects it too."""

    async def on_click(self, event) -> None:
        # Runs before DataTable's own click handler (handlers are called along the MRO): put the
        # cursor's column under the click so the base class sees a click on the highlighted cell.
        meta = event.style.meta
        row, column = meta.get("row"), meta.get("column")
        if self.cursor_type == "row" and row is not None and column is not None and row >= 0 and column >= 0 and row == self.cursor_row:
            self.cursor_coordinate = Coordinate(row, column)
