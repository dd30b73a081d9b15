"""The main screen's tabs, a module each, and the factor-set screen's pane. Every pane is a
:class:`~inflq.tui.panes.base.Pane`: it shows the app's context and reloads when it changes."""

from .base import Pane, RowTable, blank
from .compare import ComparePane
from .distribution import DistributionPane
from .factors import FactorsPane
from .investigations import InvestigationsPane
from .probes import ProbesPane
from .query import QueryPane
from .results import ResultsPane
from .run import RunPane, option_widget

__all__ = [
    "ComparePane", "DistributionPane", "FactorsPane", "InvestigationsPane", "Pane", "ProbesPane", "QueryPane",
    "ResultsPane", "RowTable", "RunPane", "blank", "option_widget",
]
