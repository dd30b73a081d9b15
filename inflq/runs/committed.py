"""Passes whose shards a run commits as they arrive: a fit's ``concat`` passes and an estimator's
own passes over the candidates (:class:`inflq.ScoringContext`). Each shard's results are saved and
recorded as the run's (``fit_shards``) the moment the executor reports them, so that a run stopped
mid-pass resumes from its last committed shard; the results are combined in shard order, so a
resumed pass equals an uninterrupted one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .. import catalog
from ..artifacts import load_tensors, save_tensors
from ..base import Executor, Job, Shard
from ..errors import InflqError
from ..passes import combine_results
from ..progress import Monitor
from ..project import Project


def run_committed_pass(
    project: Project,
    executor: Executor | None,
    job: Job,
    shards: list[Shard],
    monitor: Monitor,
    *,
    run_id: int | None = None,
    pass_key: str = "",
    data_key: str = "",
    shard_path: Callable[[int], str] | None = None,
) -> dict[str, torch.Tensor]:
    """Run ``job.pass_`` over ``shards`` and combine the shards' results in shard order
    (``pass_.combine``: summed, or concatenated along the first dimension).

    With a ``run_id``, each shard's results are saved at ``shard_path(shard)`` (a :mod:`inflq.layout` path) and
    recorded under the run's ``pass_key`` and ``data_key`` (what the pass ran over: shards recorded
    under another are stale and ignored) as they arrive; shards recorded before are read back instead
    of run again. ``executor``: ``None`` runs the shards here, one after another, with ``job.local``."""
    committing = run_id is not None
    parts: dict[int, Any] = {}  # shard -> its results, or (path, checksum) of a committed file
    if committing:
        for r in catalog.fit_shards(project.db, run_id, pass_key):
            if r["factor_key"] == data_key and r["shard"] < len(shards) and r["n"] == len(shards[r["shard"]]):
                parts[r["shard"]] = (r["path"], r["checksum"])
    monitor.start(job.pass_.phase, sum(len(s) for s in shards))
    monitor.advance(sum(len(shards[i]) for i in parts))

    def on_result(shard: Shard, out: dict[str, torch.Tensor]) -> None:
        if committing:
            rel = shard_path(shard.index)
            checksum = save_tensors(project.root, rel, out)
            catalog.record_fit_shards(project.db, run_id, pass_key, data_key, {shard.index: len(shard)}, rel, checksum)
        parts[shard.index] = out

    todo = [s for s in shards if s.index not in parts]
    if executor is None:
        for shard in todo:
            on_result(shard, job.local.run(job.pass_, shard, job.batch_size, monitor))
    else:
        executor.map(job, todo, on_result, monitor)
    if len(parts) != len(shards):
        raise InflqError(f"the executor returned {len(parts)} of {len(shards)} {job.pass_.phase} shards; rerun with --resume")
    loaded = []
    for i in range(len(shards)):
        part = parts.pop(i)
        loaded.append(load_tensors(project.root, part[0], part[1], f"{job.pass_.phase} shard") if isinstance(part, tuple) else part)
    return combine_results(job.pass_.combine, loaded)
