"""Fitting an estimator's factors, or loading them from the cache: the fitting passes run shard by
shard on an executor, each shard committed as it arrives when the fit belongs to a run, so that a
killed fit resumes from its last committed shard."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from .. import catalog, layout
from ..artifacts import load_tensors, save_tensors
from ..base import Estimator, Executor, FitContext, Job
from ..engine import GradientEngine
from ..errors import InflqError
from ..passes import Pass, Shard, add_into, make_shards
from ..progress import Monitor
from ..project import Project
from ..settings import RunSettings
from .committed import run_committed_pass
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


class _OrderedSums:
    """A sum pass's shards reduced in shard order, so that a resumed fit equals an uninterrupted one:
    ``total`` holds shards ``[0, next)``; a shard that arrives early waits in ``held`` (its sums, or
    ``(path, checksum)`` of its committed file, read when its turn comes)."""

    def __init__(self, load: Callable[[str, str], dict[str, torch.Tensor]]) -> None:
        self.total: dict[str, torch.Tensor] = {}
        self.held: dict[int, Any] = {}
        self.next = 0
        self.load = load

    def resume(self, rows: list[dict]) -> str | None:
        """Start from a pass's committed rows; returns the committed running sum's file, if any.
        A file that the rows of shards 0..k all name holds their running sum (one shard's own sums
        are the running sum of shard 0 alone); any other file holds one shard's own sums."""
        by_path: dict[str, list[dict]] = {}
        for r in rows:
            by_path.setdefault(r["path"], []).append(r)
        prefix = None
        for rel, group in by_path.items():
            covered = sorted(r["shard"] for r in group)
            if covered == list(range(len(covered))) and len(covered) > self.next:
                self.total, self.next, prefix = self.load(rel, group[0]["checksum"]), len(covered), rel
        for rel, group in by_path.items():
            for r in group:
                if rel != prefix and r["shard"] >= self.next:
                    self.held[r["shard"]] = (rel, r["checksum"])
        return prefix

    def done(self) -> set[int]:
        return set(range(self.next)) | set(self.held)

    def add(self, index: int, part: Any) -> None:
        """A shard's own sums (or its committed file), folded in once every shard before it is."""
        self.held[index] = part
        self.fold()

    def added_in_place(self, index: int, phase: str) -> None:
        """The executor added shard ``index`` into :attr:`total` itself (``Job.sums``)."""
        if index != self.next:
            raise InflqError(f"{phase}: the executor added shard {index} to the sums out of order")
        self.next += 1
        self.fold()

    def fold(self) -> None:
        while self.next in self.held:
            part = self.held.pop(self.next)
            add_into(self.total, self.load(*part) if isinstance(part, tuple) else part)
            self.next += 1


class _FitPasses:
    """``FitContext.run_pass``: each of a fit's passes over the fitting sequences, its shards run on
    the executor and, when the fit belongs to a run and its factor set's key is known, committed as
    they arrive (``fit_shards`` rows and their files), so that a killed fit resumes from them."""

    def __init__(self, project: Project, engine: GradientEngine, executor: Executor, settings: RunSettings,
                 monitor: Monitor, indices: np.ndarray, run_id: int | None) -> None:
        self.project, self.executor, self.settings, self.monitor, self.run_id = project, executor, settings, monitor, run_id
        self.indices = indices
        self.shards = make_shards(indices, settings.shard_size)
        self.worker = LocalWorker(project, engine)
        self.factor_key: str | None = None
        self.count = 0  # passes run so far: a pass is named by its place in the fit

    def __call__(self, pass_: Pass) -> dict[str, torch.Tensor]:
        # A pass over one group of modules (a fit by module) is named by its group too, so that a
        # resume under another grouping never reads another group's committed sums.
        group = "" if pass_.modules is None else hashlib.sha256("\n".join(pass_.modules).encode()).hexdigest()[:8]
        key = f"{self.count}:{pass_.phase}" + (f":{group}" if group else "")
        number = f"{self.count}" + (f"-{group}" if group else "")  # the committed files' names
        self.count += 1
        pass_.seed = self.settings.seed
        if pass_.combine == "sum":
            return self._sum_pass(pass_, key, number)
        return self._concat_pass(pass_, key, number)

    @property
    def committing(self) -> bool:
        return self.run_id is not None and self.factor_key is not None

    def _committed(self, key: str) -> list[dict]:
        """The pass's committed rows for this factor set (a shard since resized is not committed)."""
        if not self.committing:
            return []
        return [r for r in catalog.fit_shards(self.project.db, self.run_id, key)
                if r["factor_key"] == self.factor_key and r["shard"] < len(self.shards) and r["n"] == len(self.shards[r["shard"]])]

    def _load(self, rel: str, checksum: str) -> dict[str, torch.Tensor]:
        return load_tensors(self.project.root, rel, checksum, "fitting shard")

    def _commit(self, key: str, rel: str, covered: list[int], tensors: dict[str, torch.Tensor], running_sum: bool = False) -> str:
        checksum = save_tensors(self.project.root, rel, tensors)
        catalog.record_fit_shards(self.project.db, self.run_id, key, self.factor_key, {i: len(self.shards[i]) for i in covered},
                                  rel, checksum, running_sum=running_sum)
        return checksum

    def _run(self, pass_: Pass, done: set[int], on_result, sums: dict | None = None) -> None:
        self.monitor.start(pass_.phase, len(self.indices))
        self.monitor.advance(sum(len(self.shards[i]) for i in done))
        job = Job(pass_, worker_spec(self.project, self.settings.modules), self.settings.batching(), local=self.worker, sums=sums)
        self.executor.map(job, [s for s in self.shards if s.index not in done], on_result, self.monitor)

    def _incomplete(self, pass_: Pass, returned: int) -> InflqError:
        return InflqError(f"the executor returned {returned} of {len(self.shards)} {pass_.phase} shards; rerun with --resume")

    def _sum_pass(self, pass_: Pass, key: str, number: str) -> dict[str, torch.Tensor]:
        # Run in this process, shards add straight into the running sums (``Job.sums``), and what
        # is committed is the running sum through the shard: memory and disk hold one set of sums.
        sums = _OrderedSums(self._load)
        prefix = sums.resume(self._committed(key))

        def on_result(shard: Shard, out: dict[str, torch.Tensor]) -> None:
            nonlocal prefix
            if out is not sums.total:  # one shard's own sums (another process, or an executor without Job.sums)
                if self.committing:
                    rel = layout.fit_shard(self.run_id, number, shard.index)
                    checksum = self._commit(key, rel, [shard.index], out)
                    out = out if shard.index == sums.next else (rel, checksum)  # an early one waits on disk
                sums.add(shard.index, out)
                return
            first = sums.next
            sums.added_in_place(shard.index, pass_.phase)
            if self.committing:  # every shard the running sum covers now points to it
                old, prefix = prefix, layout.fit_running_sum(self.run_id, number, sums.next - 1)
                self._commit(key, prefix, list(range(first, sums.next)), sums.total, running_sum=True)
                if old is not None and old != prefix:
                    (self.project.root / old).unlink(missing_ok=True)

        sums.fold()
        self._run(pass_, sums.done(), on_result, sums=sums.total)
        if sums.next != len(self.shards):
            raise self._incomplete(pass_, len(sums.done()))
        return sums.total

    def _concat_pass(self, pass_: Pass, key: str, number: str) -> dict[str, torch.Tensor]:
        # The same committed, resumable pass an estimator runs over the candidates (ScoringContext.run_pass).
        job = Job(pass_, worker_spec(self.project, self.settings.modules), self.settings.batching(), local=self.worker)
        return run_committed_pass(self.project, self.executor, job, self.shards, self.monitor, run_id=self.run_id if self.committing else None,
                                  pass_key=key, data_key=self.factor_key or "", shard_path=functools.partial(layout.fit_shard, self.run_id, number))


def _factor_key(project: Project, estimator: Estimator, engine: GradientEngine, indices: np.ndarray, seed: int) -> tuple[str, dict]:
    """The factor set's cache key, and what it hashes: everything that determines the factors."""
    data_fp = hashlib.sha256(project.runtime.corpus.key.encode() + indices.tobytes()).hexdigest()[:32]  # the fingerprint, and the loss mask where there is one
    key_src = {
        "estimator": estimator.name,
        "settings": estimator.factor_settings(),
        "modules": engine.names,
        "model": project.model_fingerprint,
        "data": data_fp,
        "seed": seed,
        "dtype": str(next(engine.model.parameters()).dtype),
    }
    return hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:24], key_src


LOCKS = layout.LOCKS  # lock files, in the project folder; never packed (sharing packs artifacts/, corpus/, plugins/)


@contextlib.contextmanager
def factor_lock(project: Project, key: str, monitor: Monitor) -> Iterator[bool]:
    """Hold the lock on factor cache key ``key`` (a file lock under the project folder, released by
    the OS if the holder dies); yields whether another process held it first, i.e. whether the
    factors may have appeared meanwhile. Waiting can be cancelled (the monitor). A read-only
    project fits nothing, so it takes no lock."""
    from filelock import FileLock, Timeout

    if getattr(project, "readonly", False):
        yield False
        return
    (project.root / LOCKS).mkdir(exist_ok=True)
    lock = FileLock(str(project.root / LOCKS / f"factors-{key}.lock"))
    waited = False
    while True:
        try:
            lock.acquire(timeout=0.25, poll_interval=0.05)
            break
        except Timeout:
            if not waited:
                monitor.warn(f"another process is fitting these factors (key {key}); waiting for its fit rather than fitting them twice")
                waited = True
            monitor.check()
    try:
        yield waited
    finally:
        lock.release()
def cached_factor_set(project: Project, estimator: Estimator, engine: GradientEngine, settings: RunSettings) -> dict | None:
    """The catalog's factor set that :func:`ensure_factors` would load for these settings, or
    ``None`` when it would fit (none cached, or ``settings.refit``). An estimator that fits nothing
    has nothing to cache: ``{}``. Reads only."""
    if not estimator.fits_factors:
        return {}
    if settings.refit:
        return None
    indices = fit_indices(len(project.runtime.corpus), settings.fit_sequences, settings.seed)
    return catalog.factor_set_by_key(project.db, _factor_key(project, estimator, engine, indices, settings.seed)[0])


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
    passes = _FitPasses(project, engine, executor, settings, monitor, indices, run_id)
    budgets = [b for b in (fit_memory_bytes(settings.fit_memory), executor.fit_memory()) if b is not None]
    ctx = FitContext(engine, passes, len(indices), settings.seed, monitor, indices=indices, sequences=store.many,
                     pad_id=project.runtime.pad_id, project=project, memory=min(budgets) if budgets else None,
                     tasks=executor.run_tasks, remote_tasks=executor.remote_tasks)
    if not estimator.fits_factors:
        estimator.prepare(ctx)
        return None
    key, key_src = _factor_key(project, estimator, engine, indices, settings.seed)
    passes.factor_key = key  # from here on, the passes commit their shards
    row = catalog.factor_set_by_key(project.db, key)
    if row is not None and not settings.refit:
        estimator.load_factors(load_tensors(project.root, row["path"], row["checksum"], "factor artifact"))
        estimator.prepare(ctx)
        return row["id"]
    # One fit per cache key at a time: a second run with the same settings waits for the first
    # one's fit and reuses its factors instead of fitting them again (and failing on the key).
    with factor_lock(project, key, monitor) as waited:
        # Another process may have stored them since the look above (while this one waited, or
        # just before it took the lock): reuse them, unless asked to refit the very set seen above.
        fresh = catalog.factor_set_by_key(project.db, key)
        if fresh is not None and (not settings.refit or row is None or fresh["id"] != row["id"]):
            if waited or row is None:
                monitor.note(f"reusing factor set {fresh['id']}, which another process fitted meanwhile")
            estimator.load_factors(load_tensors(project.root, fresh["path"], fresh["checksum"], "factor artifact"))
            estimator.prepare(ctx)
            return fresh["id"]
        return _fit_and_store(project, estimator, engine, ctx, settings, monitor, run_id, key, key_src, indices, store, fresh)


def _fit_and_store(project, estimator, engine, ctx, settings, monitor, run_id, key, key_src, indices, store, row) -> int:
    """Fit the factors (the lock on their key held) and record them as a factor set."""
    tokens = int(store.lengths()[indices].sum())
    widest = max(max(t.in_dim, t.out_features) for t in engine.tracked)
    if tokens < 2 * widest:
        monitor.warn(f"only {tokens} fitting tokens for covariances up to {widest} wide; factors will be unstable: fit on more data (--fit-sequences)")
    started = time.perf_counter()
    tensors = estimator.fit(ctx)
    seconds = time.perf_counter() - started
    rel = layout.factor_set(estimator.name, key)
    # The file carries what its factor set's row holds, so that a lost catalog's factors can be
    # re-linked (`inflq check --repair`) instead of fitted again.
    checksum = save_tensors(project.root, rel, tensors, {"key": json.dumps(key_src, sort_keys=True),
                                                         "factor_set": json.dumps({"num_sequences": len(indices), "seconds": seconds})})
    fs_id, stale = catalog.store_factor_set(project.db, {
        "key": key, "estimator": estimator.name, "settings": json.dumps(estimator.factor_settings(), sort_keys=True),
        "modules": json.dumps(engine.names), "model_fingerprint": project.model_fingerprint, "data_fingerprint": key_src["data"],
        "num_sequences": len(indices), "seed": settings.seed, "path": rel, "checksum": checksum, "seconds": seconds,
    }, replaces=row["id"] if row is not None else None, run_id=run_id)
    if run_id is not None:  # the factor set now holds what the fitting shards were kept for
        for rel_path in stale:
            (project.root / rel_path).unlink(missing_ok=True)
        for orphan in layout.fit_files(project.root, run_id):  # a kill between commit and cleanup
            orphan.unlink(missing_ok=True)
    estimator.prepare(ctx)
    return fs_id
