"""Fitting an estimator's factors, or loading them from the cache: the fitting passes run shard by
shard on an executor, each shard committed as it arrives when the fit belongs to a run, so that a
killed fit resumes from its last committed shard."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import numpy as np
import torch

from .. import catalog
from ..artifacts import load_tensors, save_tensors
from ..base import Estimator, Executor, FitContext, Job
from ..engine import GradientEngine
from ..errors import InflqError
from ..passes import Pass, Shard, add_into, combine_results, make_shards
from ..progress import Monitor
from ..project import ARTIFACTS, Project
from ..settings import RunSettings
from .workers import LocalWorker, worker_spec


def fit_indices(n: int, fit_sequences: int | None, seed: int) -> np.ndarray:
    if fit_sequences is None or fit_sequences >= n:
        return np.arange(n, dtype=np.int64)
    if fit_sequences <= 0:
        raise InflqError("--fit-sequences must be positive")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=fit_sequences, replace=False)).astype(np.int64)


def fit_memory_bytes(gb: float | None) -> int | None:
    """``--fit-memory GB`` in bytes (``None``: no limit)."""
    if gb is None:
        return None
    if gb <= 0:
        raise InflqError("--fit-memory must be a positive number of GB")
    return int(gb * 2**30)


def factor_key_source(project: Project, estimator: Estimator, engine: GradientEngine, indices: np.ndarray, seed: int) -> tuple[str, dict, str]:
    """``(cache key, what it hashes, the fitting data's fingerprint)`` of the factors ``estimator``
    fits over ``engine``'s modules on the corpus sequences ``indices`` with ``seed``."""
    data_fp = hashlib.sha256(project.runtime.corpus.fingerprint.encode() + np.ascontiguousarray(indices, dtype=np.int64).tobytes()).hexdigest()[:32]
    key_src = {
        "estimator": estimator.name,
        "settings": estimator.factor_settings(),
        "modules": engine.names,
        "model": project.model_fingerprint,
        "data": data_fp,
        "seed": seed,
        "dtype": str(next(engine.model.parameters()).dtype),
    }
    return hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:24], key_src, data_fp


def cached_factor_set(project: Project, estimator: Estimator, engine: GradientEngine, settings: RunSettings) -> dict | None:
    """The catalog's factor set that :func:`ensure_factors` would load for these settings, or
    ``None`` when it would fit (none cached, or ``settings.refit``). An estimator that fits nothing
    has nothing to cache: ``{}``. Reads only."""
    if not estimator.fits_factors:
        return {}
    if settings.refit:
        return None
    indices = fit_indices(len(project.runtime.corpus), settings.fit_sequences, settings.seed)
    return catalog.factor_set_by_key(project.db, factor_key_source(project, estimator, engine, indices, settings.seed)[0])


def ensure_factors(
    project: Project,
    estimator: Estimator,
    engine: GradientEngine,
    executor: Executor,
    settings: RunSettings,
    monitor: Monitor,
    run_id: int | None = None,
) -> int | None:
    """Load the estimator's cached factors, or fit and cache them. Returns the factor set id.

    With a ``run_id``, every fitting pass commits each shard as it arrives (``fit_shards``): the
    running sum through that shard where shards run in this process, else the shard's own sums;
    a run killed during fitting resumes from its last committed shard. Shards are always reduced
    in shard order, so a resumed fit equals an uninterrupted one.

    The fit's memory budget (``FitContext.memory``: ``settings.fit_memory`` or the executor's
    ``fit_memory()``, the smaller) lets estimators fit by module, a pass per group of modules;
    each group's pass is keyed and its files named by a hash of its modules. ``FitContext.run_tasks``
    is the executor's ``run_tasks`` (EK-FAC's eigendecompositions run there)."""
    store = project.runtime.corpus
    settings.resolve_batching(engine, project)  # callers outside a run (sessions, integrity) leave it open
    indices = fit_indices(len(store), settings.fit_sequences, settings.seed)
    worker = LocalWorker(project, engine)
    factor_key: str | None = None  # set below once the factors' cache key is known
    pass_count = [0]

    def run_pass(pass_: Pass) -> dict[str, torch.Tensor]:
        # A pass over one group of modules (a fit by module) is named by its group too, so that a
        # resume under another grouping never reads another group's committed sums.
        group = "" if pass_.modules is None else hashlib.sha256("\n".join(pass_.modules).encode()).hexdigest()[:8]
        pass_key = f"{pass_count[0]}:{pass_.phase}" + (f":{group}" if group else "")
        number = f"{pass_count[0]}" + (f"-{group}" if group else "")  # the committed files' names
        pass_count[0] += 1
        pass_.seed = settings.seed
        shards = make_shards(indices, settings.shard_size)
        committing = run_id is not None and factor_key is not None
        if pass_.combine != "sum":
            return _concat_pass(pass_, pass_key, number, shards, committing)
        # Sums are reduced in shard order, so a resumed fit equals an uninterrupted one: ``total``
        # holds shards [0, next); a shard that arrives early waits in ``held`` (as its committed
        # file, read when its turn comes). Run in this process, shards add straight into
        # ``total`` (Job.sums), and what is committed is the running sum through the shard: memory
        # holds one set of sums, not one per shard.
        total: dict[str, torch.Tensor] = {}
        held: dict[int, Any] = {}
        nxt = [0]
        done: set[int] = set()
        prefix_rel: list[str | None] = [None]  # the committed running sum's file
        if committing:
            rows = [r for r in catalog.fit_shards(project.db, run_id, pass_key)
                    if r["factor_key"] == factor_key and r["shard"] < len(shards) and r["n"] == len(shards[r["shard"]])]
            by_path: dict[str, list[dict]] = {}
            for r in rows:
                by_path.setdefault(r["path"], []).append(r)
            for rel, group in by_path.items():
                covered = sorted(r["shard"] for r in group)
                if "-upto-" in rel:  # a running sum: valid only if every shard it covers is still recorded
                    last = int(rel.rsplit("-", 1)[1].split(".")[0])
                    if covered == list(range(last + 1)) and last + 1 > nxt[0]:
                        total = load_tensors(project.root, rel, group[0]["checksum"], "fitting shard")
                        nxt[0], prefix_rel[0] = last + 1, rel
            for rel, group in by_path.items():
                for r in group:
                    if "-upto-" not in rel and r["shard"] >= nxt[0]:
                        held[r["shard"]] = (r["path"], r["checksum"])
            done = set(range(nxt[0])) | set(held)
        monitor.start(pass_.phase, len(indices))
        monitor.advance(sum(len(shards[i]) for i in done))
        job = Job(pass_, worker_spec(project, settings.modules), settings.batching(), local=worker, sums=total)

        def fold() -> None:
            while nxt[0] in held:
                part = held.pop(nxt[0])
                if isinstance(part, tuple):
                    part = load_tensors(project.root, part[0], part[1], "fitting shard")
                add_into(total, part)
                nxt[0] += 1

        def commit(rel: str, covered: list[int], tensors: dict[str, torch.Tensor]) -> str:
            checksum = save_tensors(project.root, rel, tensors)
            # A running sum: every shard it covers now points to it.
            catalog.record_fit_shards(project.db, run_id, pass_key, factor_key, {i: len(shards[i]) for i in covered}, rel, checksum,
                                      running_sum="-upto-" in rel)
            return checksum

        def on_result(shard: Shard, out: dict[str, torch.Tensor]) -> None:
            done.add(shard.index)
            if out is not total:  # one shard's own sums (another process, or an executor without Job.sums)
                if committing:
                    rel = f"{ARTIFACTS}/runs/{run_id}/fit-{number}-{shard.index:06d}.safetensors"
                    checksum = commit(rel, [shard.index], out)
                    held[shard.index] = out if shard.index == nxt[0] else (rel, checksum)  # an early one waits on disk
                else:
                    held[shard.index] = out
                fold()
                return
            if shard.index != nxt[0]:
                raise InflqError(f"{pass_.phase}: the executor added shard {shard.index} to the sums out of order")
            nxt[0] += 1
            fold()  # shards committed earlier, out of order, that now follow
            if committing:
                old = prefix_rel[0]
                prefix_rel[0] = f"{ARTIFACTS}/runs/{run_id}/fit-{number}-upto-{nxt[0] - 1:06d}.safetensors"
                commit(prefix_rel[0], list(range(shard.index, nxt[0])), total)
                if old is not None and old != prefix_rel[0]:
                    (project.root / old).unlink(missing_ok=True)

        fold()
        executor.map(job, [s for s in shards if s.index not in done], on_result, monitor)
        if len(done) != len(shards) or nxt[0] != len(shards):
            raise InflqError(f"the executor returned {len(done)} of {len(shards)} {pass_.phase} shards; rerun with --resume")
        return total

    def _concat_pass(pass_: Pass, pass_key: str, number: str, shards: list[Shard], committing: bool) -> dict[str, torch.Tensor]:
        parts: dict[int, dict[str, torch.Tensor]] = {}
        if committing:
            for r in catalog.fit_shards(project.db, run_id, pass_key):
                if r["factor_key"] == factor_key and r["shard"] < len(shards) and r["n"] == len(shards[r["shard"]]):
                    parts[r["shard"]] = load_tensors(project.root, r["path"], r["checksum"], "fitting shard")
        monitor.start(pass_.phase, len(indices))
        monitor.advance(sum(len(shards[i]) for i in parts))

        def on_result(shard: Shard, out: dict[str, torch.Tensor]) -> None:
            parts[shard.index] = out
            if committing:
                rel = f"{ARTIFACTS}/runs/{run_id}/fit-{number}-{shard.index:06d}.safetensors"
                checksum = save_tensors(project.root, rel, out)
                catalog.record_fit_shards(project.db, run_id, pass_key, factor_key, {shard.index: len(shard)}, rel, checksum)

        job = Job(pass_, worker_spec(project, settings.modules), settings.batching(), local=worker)
        executor.map(job, [s for s in shards if s.index not in parts], on_result, monitor)
        if len(parts) != len(shards):
            raise InflqError(f"the executor returned {len(parts)} of {len(shards)} {pass_.phase} shards; rerun with --resume")
        return combine_results(pass_.combine, [parts[i] for i in sorted(parts)])

    own = getattr(executor, "fit_memory", None)  # executors written before fitting by module lack it
    budgets = [b for b in (fit_memory_bytes(settings.fit_memory), own() if own else None) if b is not None]
    # Independent pieces of the fit (EK-FAC's eigendecompositions) run as the executor's tasks: in
    # this process, in order, on the local executor; on the workers on Ray.
    ctx = FitContext(engine, run_pass, len(indices), settings.seed, monitor, indices=indices, sequences=store.many, pad_id=project.runtime.pad_id, project=project,
                     memory=min(budgets) if budgets else None,
                     tasks=getattr(executor, "run_tasks", None), remote_tasks=bool(getattr(executor, "remote_tasks", False)))  # executors not built on Executor may lack them
    if not estimator.fits_factors:
        estimator.prepare(ctx)
        return None
    key, key_src, data_fp = factor_key_source(project, estimator, engine, indices, settings.seed)
    factor_key = key
    row = catalog.factor_set_by_key(project.db, key)
    if row is not None and not settings.refit:
        estimator.load_factors(load_tensors(project.root, row["path"], row["checksum"], "factor artifact"))
        estimator.prepare(ctx)
        return row["id"]
    tokens = int(store.lengths()[indices].sum())
    widest = max(max(t.in_dim, t.out_features) for t in engine.tracked)
    if tokens < 2 * widest:
        monitor.warn(
            f"only {tokens} fitting tokens for covariances up to {widest} wide; factors will be unstable: fit on more data (--fit-sequences)"
        )
    started = time.perf_counter()
    tensors = estimator.fit(ctx)
    seconds = time.perf_counter() - started
    rel = f"{ARTIFACTS}/factors/{estimator.name}-{key}.safetensors"
    checksum = save_tensors(project.root, rel, tensors, {"key": json.dumps(key_src, sort_keys=True)})
    fs_id, stale = catalog.store_factor_set(project.db, {
        "key": key, "estimator": estimator.name, "settings": json.dumps(estimator.factor_settings(), sort_keys=True),
        "modules": json.dumps(engine.names), "model_fingerprint": project.model_fingerprint, "data_fingerprint": data_fp,
        "num_sequences": len(indices), "seed": settings.seed, "path": rel, "checksum": checksum, "seconds": seconds,
    }, replaces=row["id"] if row is not None else None, run_id=run_id)
    if run_id is not None:  # the factor set now holds what the fitting shards were kept for
        for rel_path in stale:
            (project.root / rel_path).unlink(missing_ok=True)
        for orphan in (project.root / ARTIFACTS / "runs" / str(run_id)).glob("fit-*"):  # a kill between commit and cleanup
            orphan.unlink(missing_ok=True)
    estimator.prepare(ctx)
    return fs_id
