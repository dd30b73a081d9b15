"""inflq: which training sequences made the model say this? Influence functions (EK-FAC) for
causal language models, after Grosse et al. 2023.

This package's names (``inflq.__all__``) are the plugin contract: what a third-party estimator,
filter, attribution, executor, trainer or measurement may use, documented in docs/plugins.md and kept stable.
Scripts and notebooks also use the modules (``inflq.runs``, ``inflq.reading``, ``inflq.queries``:
README.md, "Python API"). What inflq's own built-in plugins need beyond the contract is in
:mod:`inflq._builtins_api`, which is unstable. The package root imports nothing from the CLI or
the TUI, and the headless core never imports Textual.
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
    Measurement,
    MeasurementTerm,
    Pass,
    ScoringContext,
    Shard,
    SumPass,
    TrainContext,
    Trainer,
)
from .errors import Cancelled, InflqError
from .hookspecs import hookimpl
from .options import Option
from .progress import Monitor

# Names that import torch (1-2 s) or the catalog load on first use, so that `inflq --help`,
# `inflq runs` and every plugin's import stay fast (PEP 562 module __getattr__).
_LAZY = {
    # the gradient engine's objects a plugin receives (ctx.engine, captures, batches)
    "Batch": "engine", "Captured": "engine", "GradientEngine": "engine", "SequenceGradients": "engine",
    "TrackedModule": "engine", "make_batch": "engine",
    # what precondition_queries returns, and how a run asks it to be held
    "QueryGradients": "contractions", "Compression": "contractions",
    # a sum pass's accumulation (Pass.accumulate)
    "add_into": "linalg",
    # fine-tunes (docs/finetune.md): a training sequence's mask of trained tokens, as corpus.get and
    # FilterContext.sequences hand it over; peft for a trainer of LoRA adapters
    "TrainingTokens": "corpus", "targets_of": "corpus", "require_peft": "modeling",
    # running a pass: in this process (a command of the plugin's own), or on a remote executor's
    # worker rebuilt from a job's picklable spec
    "LocalWorker": "runs.workers", "build_worker": "runs.workers",
    "get_registry": "plugins",
    # the project a plugin receives, its own tensors, and result sets read back
    "Project": "project", "Runtime": "runtime",
    "save_tensors": "artifacts", "load_tensors": "artifacts",
    "result_set": "reading", "score_matrix": "reading", "investigation_queries": "reading",
}

if TYPE_CHECKING:  # for type checkers and IDEs: the names above, eagerly
    from . import testing
    from .artifacts import load_tensors, save_tensors
    from .contractions import Compression, QueryGradients
    from .corpus import TrainingTokens, targets_of
    from .engine import (
        Batch,
        Captured,
        GradientEngine,
        SequenceGradients,
        TrackedModule,
        make_batch,
    )
    from .linalg import add_into
    from .modeling import require_peft
    from .plugins import get_registry
    from .project import Project
    from .reading import investigation_queries, result_set, score_matrix
    from .runs.workers import LocalWorker, build_worker
    from .runtime import Runtime


# Subpackages exported whole, imported on first use: a tiny project and gradient helpers for
# plugins' tests (inflq.testing.tiny_project, ...).
_LAZY_PACKAGES = {"testing"}


def __getattr__(name: str):
    import importlib

    if name in _LAZY_PACKAGES:
        value = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = value
        return value
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'inflq' has no attribute {name!r}")
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
    # plugin kinds, their options and registration
    "Attribution", "Estimator", "Executor", "Filter", "Trainer", "Measurement", "Option", "hookimpl", "get_registry",
    # what each kind receives (a measurement: TokenizedQuery, and returns MeasurementTerm)
    "MeasurementTerm", "AttributionContext", "AttributionResult", "FilterContext", "FitContext", "ScoringContext", "TrainContext",
    # passes and where they run
    "Job", "Pass", "Shard", "SumPass", "add_into", "LocalWorker", "build_worker",
    # gradients
    "Batch", "Captured", "Compression", "GradientEngine", "QueryGradients", "SequenceGradients", "TrackedModule", "make_batch",
    # fine-tunes: the trained tokens of a sequence, peft
    "TrainingTokens", "targets_of", "require_peft",
    # progress and errors
    "Cancelled", "InflqError", "Monitor",
    # projects, a plugin's own tensors, results read back, tests
    "Project", "Runtime", "init_project", "open_project", "load_tensors", "save_tensors",
    "investigation_queries", "result_set", "score_matrix", "testing",
]
