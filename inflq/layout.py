"""Where everything lives in a project folder: the one module that knows the folder's layout.

Every other module asks here for a path; ``tests/test_architecture.py`` fails when code elsewhere
spells an artifact path itself. Paths are POSIX strings relative to the project folder, as the
catalog records them (``save_tensors(project.root, layout.score_shard(7, 0), ...)``).

============================  ==================================================  ===================
what                          where (relative to the project folder)               named by
============================  ==================================================  ===================
settings                      ``inflq.toml``
catalog                       ``catalog.db`` (``-wal``/``-shm``, ``.bak-*``)
token store                   ``corpus/``                                          meta ``corpus_fingerprint``
local plugins                 ``plugins/*.py``                                     ``inflq trust``
factor set                    ``artifacts/factors/<estimator>-<key>.safetensors``  ``factor_sets.path``
a run's folder                ``artifacts/runs/<run id>/``                         ``runs.id``
 fitting shard                ``…/fit-<pass>-<shard>.safetensors``                 ``fit_shards.path``
 fitting running sum          ``…/fit-<pass>-upto-<last shard>.safetensors``       ``fit_shards.path``
 candidate list               ``…/candidates.safetensors``                         the run itself
 an estimator's own pass      ``…/candidates-<pass>-<shard>.safetensors``          ``fit_shards.path``
 query gradients              ``…/queries.safetensors``                            ``result_sets.queries_path``
 score shard                  ``…/shard-<shard>.safetensors``                      ``run_shards.path``
 score matrix                 ``…/scores.safetensors``                             ``result_sets.scores_path``
score matrix (older runs)     ``artifacts/results/run-<run id>.safetensors``        ``result_sets.scores_path``
self-influence scores         ``artifacts/self-influence/<est>-<key>.…``          ``self_influence.path``
a plugin's own files          ``artifacts/<plugin>/`` (``index``, ``tfidf``, …)    the plugin's rows
TUI exports                   ``exports/``                                         nothing (the user's)
catalog copies                ``backups/catalog-<time>-<label>.db``                 nothing (newest 3)
lock files                    ``.locks/``                                          nothing
============================  ==================================================  ===================

LDS retrains in a temporary folder outside the project, removed once each subset is measured:
only its measurements stay (``lds_subsets`` rows). A run's files all live in its own folder, so
that removing a run removes one folder, and :func:`run_of` tells whose a file is.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CONFIG = "inflq.toml"
CATALOG = "catalog.db"
CATALOG_SIDE_FILES = (CATALOG + "-wal", CATALOG + "-shm")
CORPUS = "corpus"
LOCAL_PLUGINS = "plugins"
EXPORTS = "exports"
BACKUPS = "backups"  # copies of the catalog after each completed run (inflq/backups.py); local, never packed
LOCKS = ".locks"  # lock files (one factor fit per cache key at a time)
ARTIFACTS = "artifacts"

FACTORS = f"{ARTIFACTS}/factors"
RUNS = f"{ARTIFACTS}/runs"
LEGACY_RESULTS = f"{ARTIFACTS}/results"  # score matrices of runs made before they moved into the run's folder
SELF_INFLUENCE = f"{ARTIFACTS}/self-influence"
#: The folders whose every file a catalog row (or a run) must own: ``inflq check`` and ``inflq gc``
#: look for orphans here. A plugin's folder is the plugin's own (its ``check_artifacts`` hook).
CORE_FOLDERS = (FACTORS, RUNS, LEGACY_RESULTS, SELF_INFLUENCE)

_SUFFIX = ".safetensors"


def factor_set(estimator: str, key: str) -> str:
    """A factor set's file, named by its estimator and cache key."""
    return f"{FACTORS}/{estimator}-{key}{_SUFFIX}"


def self_influence_scores(estimator: str, key: str) -> str:
    """Kept self-influence scores (``inflq self-influence``), named by estimator and cache key."""
    return f"{SELF_INFLUENCE}/{estimator}-{key}{_SUFFIX}"


def run_folder(run_id: int) -> str:
    """The folder of every file a run writes."""
    return f"{RUNS}/{int(run_id)}"


def fit_shard(run_id: int, pass_name: str, shard: int) -> str:
    """One fitting shard's own sums (``pass_name``: the pass's number, and its module group's hash)."""
    return f"{run_folder(run_id)}/fit-{pass_name}-{int(shard):06d}{_SUFFIX}"


def fit_running_sum(run_id: int, pass_name: str, last: int) -> str:
    """The running sum of a fitting pass's shards 0 through ``last``."""
    return f"{run_folder(run_id)}/fit-{pass_name}-upto-{int(last):06d}{_SUFFIX}"


def fit_files(root: Path | str, run_id: int) -> list[Path]:
    """The fitting shards' files on disk in a run's folder (what a finished fit no longer needs)."""
    return sorted((Path(root) / run_folder(run_id)).glob("fit-*"))


def candidates(run_id: int) -> str:
    """A run's candidates: their corpus indices and the per-query mask, chosen at its first attempt."""
    return f"{run_folder(run_id)}/candidates{_SUFFIX}"


def candidate_pass_shard(run_id: int, n: int, shard: int) -> str:
    """One shard of an estimator's own pass ``n`` over a run's candidates (``ScoringContext.run_pass``)."""
    return f"{run_folder(run_id)}/candidates-{int(n)}-{int(shard):06d}{_SUFFIX}"


def query_gradients(run_id: int) -> str:
    """A run's preconditioned query gradients (attribution, probes, rescoring a damaged shard)."""
    return f"{run_folder(run_id)}/queries{_SUFFIX}"


def score_shard(run_id: int, shard: int) -> str:
    """One committed scoring shard of a run."""
    return f"{run_folder(run_id)}/shard-{int(shard):06d}{_SUFFIX}"


def score_matrix(run_id: int) -> str:
    """A finished run's full score matrix (its result set's ``scores_path``)."""
    return f"{run_folder(run_id)}/scores{_SUFFIX}"


def plugin_folder(name: str) -> str:
    """The folder of a plugin's own files (``index``, ``tfidf``, ``cosine``), which no core row names."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or f"{ARTIFACTS}/{name}" in CORE_FOLDERS or name in (".", ".."):
        raise ValueError(f"{name!r} cannot name a plugin's artifact folder")
    return f"{ARTIFACTS}/{name}"


_RUN_FILE = re.compile(rf"^{re.escape(RUNS)}/(\d+)(/|$)")


def run_of(path: str) -> int | None:
    """The run whose folder holds ``path``, or ``None``."""
    m = _RUN_FILE.match(path)
    return int(m.group(1)) if m else None


def is_candidates(path: str) -> bool:
    run = run_of(path)
    return run is not None and path == candidates(run)


# -- what is on disk -----------------------------------------------------------------------------
@dataclass(frozen=True)
class OnDisk:
    """A file under one of the core folders: its path (relative), size and age in seconds."""

    path: str
    size: int
    age: float


def core_files(root: Path | str) -> Iterator[OnDisk]:
    """Every file under the core artifact folders (:data:`CORE_FOLDERS`), leftovers of interrupted
    writes (``*.tmp``, safetensors' ``.tmpXXXXXX``) included, in path order."""
    root = Path(root)
    now = time.time()
    for folder in CORE_FOLDERS:
        base = root / folder
        if not base.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for name in sorted(filenames):
                p = Path(dirpath) / name
                try:
                    st = p.lstat()
                except FileNotFoundError:  # removed by a writer since the listing
                    continue
                yield OnDisk(p.relative_to(root).as_posix(), st.st_size, max(0.0, now - st.st_mtime))


def empty_folders(root: Path | str) -> list[str]:
    """Empty folders under the core artifact folders (a removed run's), deepest first."""
    root = Path(root)
    out = []
    for folder in CORE_FOLDERS:
        base = root / folder
        if not base.is_dir():
            continue
        for dirpath, _, _ in os.walk(base, topdown=False):
            p = Path(dirpath)
            if p != base and not any(p.iterdir()):
                out.append(p.relative_to(root).as_posix())
    return out
