"""What inflq's built-in plugins (``plugins/inflq_builtins``) need beyond the plugin contract.

**Unstable.** These names change with inflq's internals, without notice or deprecation. A
third-party plugin imports only ``inflq.__all__`` (docs/plugins.md); where it needs one of these,
ask for it to join the contract. ``tests/test_architecture.py`` holds the built-ins to the contract
plus this module, and third-party-shaped plugins (examples/, the test plugins) to the contract alone.

Nothing here loads until first use (PEP 562), so importing this module costs nothing; it is a
module beside the package root, not the root, because one of its names is the CLI's progress
display and the package root imports nothing from the front ends.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_LAZY = {
    # EK-FAC, K-FAC and the diagonal: packed covariance sums and their float64 eigendecompositions,
    # and where sampled labels sit (part of fitted factors' cache key)
    "eigh": "linalg", "gram": "linalg", "pack_upper": "linalg", "unpack_upper": "linalg", "SAMPLED_AT": "engine",
    # LiSSA: the attention kernel forward-mode AD needs
    "math_attention": "engine",
    # the Ray executor: a pass over a shard on an actor, and an engine over a model shipped to it
    "run_shard": "passes", "select_modules": "engine",
    "load_model": "modeling", "pick_device": "modeling", "pick_dtype": "modeling", "quiet_transformers": "modeling",
    # TracIn: checkpoints recorded as project-relative paths with their fingerprints, LoRA adapter
    # checkpoints of a fine-tune (also the LoRA trainer's)
    "check_model_dir": "modeling", "fingerprint_files": "modeling", "model_files": "modeling", "is_adapter_dir": "modeling",
    "project_relative": "project",
    # tfidf's search-depth command
    "search_depth_for_result_set": "search_depth",
    # the gradient index's build command: fit and run passes as a run does
    "RunSettings": "settings", "prepare_estimator": "runs.recipe", "make_executor": "runs.recipe",
    "worker_spec": "runs.workers",
    # a plugin command's progress bar and Ctrl-C handling, as inflq's own commands show them
    "progress_monitor": "cli.common",
    # sizes as the core's commands print them (the index's build and list)
    "size_text": "display",
}

# Subpackages, imported on first use (they import torch): the gradient index's core.
_LAZY_PACKAGES = {"index"}

if TYPE_CHECKING:
    pass


def __getattr__(name: str):
    if name in _LAZY_PACKAGES:
        value = importlib.import_module(f"inflq.{name}")
    elif name in _LAZY:
        value = getattr(importlib.import_module(f"inflq.{_LAZY[name]}"), name)
    else:
        raise AttributeError(f"module 'inflq._builtins_api' has no attribute {name!r}")
    globals()[name] = value
    return value


__all__ = sorted([*_LAZY, *_LAZY_PACKAGES])
