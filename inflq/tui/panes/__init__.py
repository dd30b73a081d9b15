"""The main screen's tabs, a module each, and the factor-set screen's pane. Every pane is a
:class:`~inflq.tui.panes.pane.Pane`: it shows the app's context and reloads when it changes."""

from .compare_pane import ComparePane
from .distribution_pane import DistributionPane
from .factor_sets_pane import FactorsPane
from .investigations_pane import InvestigationsPane
from .pane import Pane, RowTable, blank
from .probes_pane import ProbesPane
from .query_pane import QueryPane
from .results_pane import ResultsPane
from .run_pane import RunPane, option_widget

__all__ = [
    "ComparePane", "DistributionPane", "FactorsPane", "InvestigationsPane", "Pane", "ProbesPane", "QueryPane",
    "ResultsPane", "RowTable", "RunPane", "blank", "option_widget",
]
