"""inflq: which training sequences made the model say this? Influence functions (EK-FAC) for
causal language models, after Grosse et al. 2023.

The public API for scripts, notebooks and plugins. The headless core never imports Textual.
"""

from typing import TYPE_CHECKING

from .startup import import_sqlite_utils_without_pandas
from .threads import prefer_sleeping_workers

prefer_sleeping_workers()  # before anything imports torch: see inflq/threads.py
import_sqlite_utils_without_pandas()  # 0.3 s less for every command: see inflq/startup.py

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
    Pass,
    Shard,
)
from .errors import Cancelled, InflqError, NumericalError
from .hookspecs import hookimpl
from .options import Option
from .progress import Monitor, ProgressEvent

# The gradient engine's names import torch (1-2 s); they load on first use so that `inflq --help`,
# `inflq runs` and every plugin's import stay fast (PEP 562 module __getattr__).
_LAZY = {
    "Batch": "engine", "Captured": "engine", "GradientEngine": "engine", "SequenceGradients": "engine",
    "TrackedModule": "engine", "make_batch": "engine", "select_modules": "engine",
    "add_into": "linalg", "eigh": "linalg", "gram": "linalg",
    "ScorePass": "passes", "SelfInfluencePass": "passes", "run_shard": "passes",
    "QueryGradients": "scoring",
}

if TYPE_CHECKING:  # for type checkers and IDEs: the names above, eagerly
    from .engine import (
        Batch,
        Captured,
        GradientEngine,
        SequenceGradients,
        TrackedModule,
        make_batch,
        select_modules,
    )
    from .linalg import add_into, eigh, gram
    from .passes import ScorePass, SelfInfluencePass, run_shard
    from .scoring import QueryGradients


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'inflq' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


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
    "Shard", "TrackedModule", "add_into", "eigh", "gram", "hookimpl", "index", "init_project", "make_batch", "open_project", "run_shard", "select_modules",
]
