"""inflq: which training sequences made the model say this? Influence functions (EK-FAC) for
causal language models, after Grosse et al. 2023.

The public API for scripts, notebooks and plugins. The headless core never imports Textual.
"""

from .base import (
    Attribution,
    AttributionContext,
    AttributionResult,
    Estimator,
    Executor,
    Filter,
    FilterContext,
    FitContext,
    Job,
)
from .engine import (
    Batch,
    Captured,
    GradientEngine,
    SequenceGradients,
    TrackedModule,
    make_batch,
    select_modules,
)
from .errors import Cancelled, InflqError, NumericalError
from .hookspecs import hookimpl
from .linalg import eigh, gram
from .options import Option
from .passes import Pass, ScorePass, SelfInfluencePass, Shard, add_into, run_shard
from .progress import Monitor, ProgressEvent
from .scoring import QueryGradients

__version__ = "0.1.0"


def open_project(path):
    """Open a project folder (see :class:`inflq.project.Project`)."""
    from .project import Project

    return Project.open(path)


def init_project(path, model, corpus, **kwargs):
    """Create a project folder from a local model folder and a corpus file."""
    from .project import Project

    return Project.init(path, model, corpus, **kwargs)


__all__ = [
    "Attribution", "AttributionContext", "AttributionResult", "Batch", "Cancelled", "Captured", "Estimator",
    "Executor", "Filter", "FilterContext", "FitContext", "GradientEngine", "InflqError", "Job", "Monitor",
    "NumericalError", "Option", "Pass", "ProgressEvent", "QueryGradients", "ScorePass", "SelfInfluencePass", "SequenceGradients",
    "Shard", "TrackedModule", "add_into", "eigh", "gram", "hookimpl", "init_project", "make_batch", "open_project", "run_shard", "select_modules",
]
