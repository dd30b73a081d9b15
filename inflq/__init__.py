"""inflq: which training sequences made the model say this? Influence functions (EK-FAC) for
causal language models, after Grosse et al. 2023.

The public API for scripts, notebooks and plugins. The headless core never imports Textual.
"""

from typing import TYPE_CHECKING

from .startup import import_sqlite_utils_without_pandas
from .threads import prefer_sleeping_workers

prefer_sleeping_workers()  # before anything imports torch: see inflq/threads.py
import_sqlite_utils_without_pandas()  # 0.3 s less for every command: see inflq/startup.py

from . import catalog  # records: catalog.queries(project.db, "default"), ...
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
    SumPass,
    TrainContext,
    Trainer,
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
    "add_into": "linalg", "eigh": "linalg", "gram": "linalg", "pack_upper": "linalg", "unpack_upper": "linalg",
    "ScorePass": "passes", "SelfInfluencePass": "passes", "run_shard": "passes",
    "QueryGradients": "contractions",
    # projects and model folders, for plugins (#14 catalog block)
    "Project": "project", "ProjectConfig": "project", "project_relative": "project", "Runtime": "runtime",
    "check_model_dir": "modeling", "fingerprint_files": "modeling", "load_model": "modeling", "model_files": "modeling",
    "pick_device": "modeling", "pick_dtype": "modeling", "quiet_transformers": "modeling",
    # fine-tunes (docs/finetune.md): a training sequence's mask of trained tokens, LoRA adapters (trainers)
    "TrainingTokens": "corpus", "targets_of": "corpus", "is_adapter_dir": "modeling", "require_peft": "modeling",
    # What the built-in plugins need beyond the contract: running a pass on a worker built from a
    # spec (executors), the attention kernel forward-mode AD needs (LiSSA), where sampled labels
    # sit (part of fitted factors' cache key), search depth over a result set (the tfidf plugin's command).
    "SAMPLED_AT": "engine", "math_attention": "engine", "build_worker": "runs",
    "search_depth_for_result_set": "search_depth",
    "get_registry": "plugins",
    # storing a plugin's own tensors; running a pass in this process; reading a result set back
    "save_tensors": "artifacts", "load_tensors": "artifacts", "LocalWorker": "runs",
    "result_set": "reading", "score_matrix": "reading",
    # a plugin that fits and runs passes as a run does (the gradient index's build command): the run
    # settings, the one recipe, an executor from its spec and the job spec a remote worker rebuilds
    "RunSettings": "settings", "prepare_estimator": "runs", "make_executor": "runs", "worker_spec": "runs",
    # a plugin command's progress bar and Ctrl-C handling, as inflq's own commands show them
    "progress_monitor": "cli.common",
}

if TYPE_CHECKING:  # for type checkers and IDEs: the names above, eagerly
    from .artifacts import load_tensors, save_tensors
    from .cli.common import progress_monitor
    from .contractions import QueryGradients
    from .corpus import TrainingTokens, targets_of
    from .engine import (
        SAMPLED_AT,
        Batch,
        Captured,
        GradientEngine,
        SequenceGradients,
        TrackedModule,
        make_batch,
        math_attention,
        select_modules,
    )
    from .linalg import add_into, eigh, gram, pack_upper, unpack_upper
    from .modeling import (
        check_model_dir,
        fingerprint_files,
        is_adapter_dir,
        load_model,
        model_files,
        pick_device,
        pick_dtype,
        quiet_transformers,
        require_peft,
    )
    from .passes import ScorePass, SelfInfluencePass, run_shard
    from .plugins import get_registry
    from .project import Project, ProjectConfig, project_relative
    from .reading import result_set, score_matrix
    from .runs import LocalWorker, build_worker, make_executor, prepare_estimator, worker_spec
    from .runtime import Runtime
    from .search_depth import search_depth_for_result_set
    from .settings import RunSettings


# Subpackages exported whole, imported on first use (they import torch).
_LAZY_PACKAGES = {"index"}  # the gradient index: inflq.index.build_index, ...


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
    "add_into", "Attribution", "AttributionContext", "AttributionResult", "Batch", "build_worker", "Cancelled", "Captured",
    "catalog", "check_model_dir", "eigh", "Estimator", "Executor", "Filter", "FilterContext", "fingerprint_files",
    "FitContext", "get_registry", "GradientEngine", "gram", "hookimpl", "index", "InflqError", "init_project", "is_adapter_dir",
    "Job", "load_model", "load_tensors", "LocalWorker", "make_batch", "make_executor", "math_attention", "model_files",
    "Monitor", "NumericalError", "open_project", "Option", "pack_upper", "Pass", "pick_device", "pick_dtype", "prepare_estimator",
    "progress_monitor", "ProgressEvent", "Project", "project_relative", "ProjectConfig", "QueryGradients", "quiet_transformers", "require_peft", "result_set",
    "run_shard", "RunSettings", "Runtime", "SAMPLED_AT", "save_tensors", "score_matrix", "ScorePass", "search_depth_for_result_set",
    "select_modules", "SelfInfluencePass", "SequenceGradients", "Shard", "SumPass", "targets_of", "TrackedModule", "TrainContext", "Trainer", "TrainingTokens",
    "unpack_upper", "worker_spec",
]
