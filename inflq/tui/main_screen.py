"""The app's own screens: the main screen, a tab per task, and the factor-set screen (key f)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer, Header, TabbedContent, TabPane

from .panes import (
    ComparePane,
    DistributionPane,
    FactorsPane,
    InvestigationsPane,
    Pane,
    ProbesPane,
    QueryPane,
    ResultsPane,
    RunPane,
)

TABS = (
    ("investigations", "1 Investigations", InvestigationsPane),
    ("query", "2 Query", QueryPane),
    ("run", "3 Run", RunPane),
    ("results", "4 Results", ResultsPane),
    ("distribution", "5 Distrib", DistributionPane),
    ("probes", "6 Probes", ProbesPane),
    ("compare", "7 Compare", ComparePane),
)


class MainScreen(Screen):
    BINDINGS = [Binding(str(i + 1), f"tab('{tid}')", label, show=False) for i, (tid, label, _) in enumerate(TABS)] + [
        Binding("escape", "leave_field", "Leave field", show=False),
    ]

    def compose(self) -> ComposeResult:
        yield Header()
        with TabbedContent(id="tabs"):
            for tid, label, cls in TABS:
                with TabPane(label, id=f"tab-{tid}"):
                    yield cls(id=f"pane-{tid}")
        yield Footer()

    def action_tab(self, tid: str) -> None:
        """Show tab ``tid`` and focus its field or table now (also when it is already shown), so
        that keys typed right after the digit go there, never to another tab's digit."""
        self.query_one("#tabs", TabbedContent).active = f"tab-{tid}"  # (shows the pane at once)
        self.query_one(f"#pane-{tid}", Pane).focus_default()

    @property
    def active_pane(self) -> Pane:
        tabs = self.query_one("#tabs", TabbedContent)
        return self.query_one(f"#pane-{tabs.active.removeprefix('tab-')}", Pane)

    def action_leave_field(self) -> None:
        """esc: leave the field; the tab's own keys keep working (Pane.hold_keys)."""
        self.active_pane.hold_keys()

    def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        event.pane.query_one(Pane).activate()


class FactorsScreen(Screen):
    """The project's cached factor sets and their spectra (key f; esc back)."""

    BINDINGS = [Binding("escape", "app.pop_screen", "Back"), Binding("f", "app.pop_screen", "Back", show=False)]

    def compose(self) -> ComposeResult:
        yield Header()
        yield FactorsPane(id="pane-factors")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(FactorsPane).activate()
