"""Runs: fit (or reuse) an estimator's factors, compute the queries' preconditioned gradients,
choose candidates, and score them shard by shard. Each finished shard is committed at once, so a
crash or Ctrl-C loses at most the shard in flight and ``resume`` continues from there."""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import catalog
from .artifacts import load_tensors, save_tensors
from .base import Estimator, Executor, FilterContext, FitContext, Job
from .batching import Batching
from .engine import GradientEngine, SequenceGradients, make_batch
from .errors import Cancelled, InflqError
from .options import parse_spec, parse_specs
from .passes import Pass, ScorePass, Shard, add_into, combine_results, make_shards, run_shard
from .progress import Monitor
from .project import ARTIFACTS, Project, _rel
from .scoring import Compression, QueryGradients
from .settings import RunSettings


@dataclass
class RunResult:
    run_id: int
    result_set_id: int
    seconds: float
    phases: dict[str, float] = field(default_factory=dict)


class LocalWorker:
    """The in-process worker context: the project's model, engine and token store."""

    def __init__(self, project: Project, engine: GradientEngine) -> None:
        self.engine = engine
        self.corpus = project.corpus
        self.pad_id = project.pad_id

    def run(
        self, pass_: Pass, shard: Shard, batch_size: int | Batching, monitor: Monitor | None, into: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """:func:`run_shard` here; ``into``: running sums to extend (see ``Job.sums``)."""
        return run_shard(self.engine, self.corpus.many, pass_, shard, self.pad_id, batch_size, monitor, into=into)


_WORKERS: dict[str, LocalWorker] = {}


def build_worker(spec: dict[str, Any]) -> LocalWorker:
    """Rebuild (once per process) the worker context that :func:`worker_spec` describes, e.g. on
    a remote executor's worker. The project folder and model path must be readable there."""
    key = json.dumps(spec, sort_keys=True)
    if key not in _WORKERS:
        project = Project.open(spec["root"])
        project.set_runtime(spec.get("device"), spec.get("dtype"))
        engine = checkpoint_engine(project, spec["checkpoint"], spec.get("modules")) if spec.get("checkpoint") else project.engine(spec.get("modules"))
        _WORKERS[key] = LocalWorker(project, engine)
    return _WORKERS[key]


def checkpoint_engine(project: Project, path: str | Path, modules: str | None) -> GradientEngine:
    """An engine over a training checkpoint of the project's model (TracIn), loaded like the
    project's model (local safetensors only) on the project's device and dtype."""
    from .engine import select_modules
    from .modeling import load_model, pick_dtype

    path = Path(path)
    if path.resolve() == project.model_path.resolve():
        return project.engine(modules)
    dev = project.device
    model = load_model(path, dev, pick_dtype(project.config.dtype, dev))
    return GradientEngine(model, select_modules(model, modules or project.config.modules))


def worker_spec(project: Project, modules: str | None) -> dict[str, Any]:
    """A picklable description from which a remote worker can rebuild the local context."""
    return {
        "root": str(project.root.resolve()),
        "model": str(project.model_path.resolve()),
        "device": project.config.device,
        "dtype": project.config.dtype,
        "modules": modules or project.config.modules,
    }


def make_estimator(project: Project, spec: str) -> Estimator:
    s = parse_spec(spec)
    return project.registry.create("estimator", s.name, s.options)  # type: ignore[return-value]


def make_executor(project: Project, spec: str) -> Executor:
    s = parse_spec(spec)
    return project.registry.create("executor", s.name, s.options)  # type: ignore[return-value]


def make_filter(project: Project, spec: str):
    parts = parse_specs(spec)
    if len(parts) == 1:
        return project.registry.create("filter", parts[0].name, parts[0].options)
    union = project.registry.get("filter", "union")
    return union(of=spec)


def _fit_indices(n: int, fit_sequences: int | None, seed: int) -> np.ndarray:
    if fit_sequences is None or fit_sequences >= n:
        return np.arange(n, dtype=np.int64)
    if fit_sequences <= 0:
        raise InflqError("--fit-sequences must be positive")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=fit_sequences, replace=False)).astype(np.int64)


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
    in shard order, so a resumed fit equals an uninterrupted one."""
    store = project.corpus
    settings.resolve_batching(engine, project)  # callers outside a run (sessions, integrity) leave it open
    indices = _fit_indices(len(store), settings.fit_sequences, settings.seed)
    worker = LocalWorker(project, engine)
    factor_key: str | None = None  # set below once the factors' cache key is known
    pass_count = [0]

    def run_pass(pass_: Pass) -> dict[str, torch.Tensor]:
        pass_key = f"{pass_count[0]}:{pass_.phase}"
        pass_count[0] += 1
        pass_.seed = settings.seed
        shards = make_shards(indices, settings.shard_size)
        committing = run_id is not None and factor_key is not None
        number = pass_key.split(":")[0]
        if pass_.combine != "sum":
            return _concat_pass(pass_, pass_key, shards, committing)
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
            rows = [r for r in project.db["fit_shards"].rows_where("run_id = ? AND pass_key = ?", [run_id, pass_key])
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
            with project.db.atomic():
                for i in covered:
                    project.db["fit_shards"].upsert({
                        "run_id": run_id, "pass_key": pass_key, "shard": i, "n": len(shards[i]),
                        "factor_key": factor_key, "path": rel, "checksum": checksum, "seconds": 0.0,
                    }, pk=("run_id", "pass_key", "shard"))
                if "-upto-" in rel:  # every shard the running sum covers now points to it
                    project.db.execute(
                        "UPDATE fit_shards SET path = ?, checksum = ? WHERE run_id = ? AND pass_key = ? AND shard <= ?",
                        [rel, checksum, run_id, pass_key, covered[-1]],
                    )
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

    def _concat_pass(pass_: Pass, pass_key: str, shards: list[Shard], committing: bool) -> dict[str, torch.Tensor]:
        parts: dict[int, dict[str, torch.Tensor]] = {}
        if committing:
            for r in project.db["fit_shards"].rows_where("run_id = ? AND pass_key = ?", [run_id, pass_key]):
                if r["factor_key"] == factor_key and r["shard"] < len(shards) and r["n"] == len(shards[r["shard"]]):
                    parts[r["shard"]] = load_tensors(project.root, r["path"], r["checksum"], "fitting shard")
        monitor.start(pass_.phase, len(indices))
        monitor.advance(sum(len(shards[i]) for i in parts))

        def on_result(shard: Shard, out: dict[str, torch.Tensor]) -> None:
            parts[shard.index] = out
            if committing:
                rel = f"{ARTIFACTS}/runs/{run_id}/fit-{pass_key.split(':')[0]}-{shard.index:06d}.safetensors"
                checksum = save_tensors(project.root, rel, out)
                with project.db.atomic():
                    project.db["fit_shards"].upsert({
                        "run_id": run_id, "pass_key": pass_key, "shard": shard.index, "n": len(shard),
                        "factor_key": factor_key, "path": rel, "checksum": checksum, "seconds": 0.0,
                    }, pk=("run_id", "pass_key", "shard"))

        job = Job(pass_, worker_spec(project, settings.modules), settings.batching(), local=worker)
        executor.map(job, [s for s in shards if s.index not in parts], on_result, monitor)
        if len(parts) != len(shards):
            raise InflqError(f"the executor returned {len(parts)} of {len(shards)} {pass_.phase} shards; rerun with --resume")
        return combine_results(pass_.combine, [parts[i] for i in sorted(parts)])

    ctx = FitContext(engine, run_pass, len(indices), settings.seed, monitor, indices=indices, sequences=store.many, pad_id=project.pad_id, project=project)
    if not estimator.fits_factors:
        estimator.prepare(ctx)
        return None
    data_fp = hashlib.sha256(store.fingerprint.encode() + indices.tobytes()).hexdigest()[:32]
    key_src = {
        "estimator": estimator.name,
        "settings": estimator.factor_settings(),
        "modules": engine.names,
        "model": project.model_fingerprint,
        "data": data_fp,
        "seed": settings.seed,
        "dtype": str(next(engine.model.parameters()).dtype),
    }
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:24]
    factor_key = key
    row = next(project.db["factor_sets"].rows_where("key = ?", [key]), None)
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
    with project.db.atomic():
        if row is not None:
            project.db.execute("DELETE FROM factor_sets WHERE id = ?", [row["id"]])
        fs_id = project.db["factor_sets"].insert({
            "key": key, "estimator": estimator.name, "settings": json.dumps(estimator.factor_settings(), sort_keys=True),
            "modules": json.dumps(engine.names), "model_fingerprint": project.model_fingerprint, "data_fingerprint": data_fp,
            "num_sequences": len(indices), "seed": settings.seed, "path": rel, "checksum": checksum, "seconds": seconds,
            "created_at": catalog.now(),
        }).last_pk
        if run_id is not None:
            stale = [r["path"] for r in project.db["fit_shards"].rows_where("run_id = ?", [run_id])]
            project.db.execute("DELETE FROM fit_shards WHERE run_id = ?", [run_id])
    if run_id is not None:  # the factor set now holds what the fitting shards were kept for
        for rel_path in stale:
            (project.root / rel_path).unlink(missing_ok=True)
        for orphan in (project.root / ARTIFACTS / "runs" / str(run_id)).glob("fit-*"):  # a kill between commit and cleanup
            orphan.unlink(missing_ok=True)
    estimator.prepare(ctx)
    return fs_id


def query_gradients(project: Project, engine: GradientEngine, queries: list[dict], batch_size: int | None) -> SequenceGradients:
    """Gradients of each query's measurement loss ``-log p(completion | prompt)``: ``[nq, out, in_dim]``
    per module, with their token factors (only completion tokens carry gradient), ``batch_size``
    queries at a time (``None``: 8)."""
    toks = [project.tokenize_query(q["prompt"], q["completion"], bool(q.get("chat"))) for q in queries]
    parts = []
    size = max(1, batch_size or 8)
    for s in range(0, len(toks), size):
        chunk = toks[s : s + size]
        batch = make_batch([t.tokens for t in chunk], project.pad_id, engine.device, loss_from=[t.completion_start for t in chunk])
        parts.append(engine.sequence_gradients(batch, "data"))
    return SequenceGradients.concat(parts)


def query_compression(settings: RunSettings, lengths: np.ndarray) -> Compression:
    """The run's query compression: rank ``settings.rank``, full rank where scoring sequences of
    these ``lengths`` is cheaper that way, within ``settings.full_rank_mb``."""
    tokens = float(np.mean(lengths)) if len(lengths) and settings.full_rank_mb > 0 else None
    return Compression(settings.rank, tokens, int(settings.full_rank_mb) << 20)


def preconditioned_queries(estimator: Estimator, grads: dict[str, torch.Tensor], rank: int | None | Compression) -> QueryGradients:
    qg = estimator.precondition_queries(grads, rank)
    for key, q in qg.tensors().items():
        if not torch.isfinite(q).all():
            raise InflqError(f"the preconditioned query gradient of {key.partition('/')[2]} is not finite; increase the damping")
    return qg


@contextlib.contextmanager
def _recording_outcome(project: Project, run_id: int, executor: Executor) -> Iterator[float]:
    """Record a cancelled or failed run in the catalog (the error re-raised), and close the executor.
    Yields the start time."""
    started = time.perf_counter()
    try:
        yield started
    except Cancelled:
        with project.db.atomic():
            project.db["runs"].update(run_id, {"status": "cancelled", "finished_at": catalog.now(), "seconds": time.perf_counter() - started})
        raise
    except BaseException as exc:
        with project.db.atomic():
            project.db["runs"].update(run_id, {"status": "failed", "error": str(exc) or type(exc).__name__, "finished_at": catalog.now()})
        raise
    finally:
        executor.close()


def _record_batching(project: Project, run_id: int, settings: RunSettings, engine: GradientEngine, monitor: Monitor) -> None:
    """Choose the batching a run left open and record it with the run, so that a resumed run and
    the catalog say how its batches were made."""
    if settings.resolve_batching(engine, project):
        with project.db.atomic():
            project.db["runs"].update(run_id, {"settings": settings.to_json()})
    monitor.note(f"batches: {settings.batching().describe()}")


def start_run(project: Project, investigation: str, settings: RunSettings, kind: str = "scores") -> int:
    inv = project.investigation(investigation)
    with project.db.atomic():
        return project.db["runs"].insert({
            "investigation_id": inv["id"], "kind": kind, "estimator": settings.estimator, "filter": settings.filter,
            "executor": settings.executor, "settings": settings.to_json(), "status": "running", "phase": "starting",
            "done": 0, "total": 0, "model_fingerprint": project.model_fingerprint,
            "corpus_fingerprint": project.corpus_fingerprint_recorded, "started_at": catalog.now(),
        }).last_pk


def _record_progress(project: Project, run_id: int, monitor: Monitor, inner):
    last = [0.0]

    def on_progress(ev):
        if inner is not None:
            inner(ev)
        now = time.perf_counter()
        if now - last[0] > 0.5 or ev.done >= ev.total:
            last[0] = now
            try:
                with project.db.atomic():
                    project.db["runs"].update(run_id, {"phase": ev.phase, "done": ev.done, "total": ev.total})
            except Exception:
                pass  # progress is advisory; a busy catalog must not fail the run

    return on_progress


def run_investigation(
    project: Project,
    investigation: str,
    settings: RunSettings | None = None,
    monitor: Monitor | None = None,
    resume: int | None = None,
    executor: str | None = None,
) -> RunResult:
    """Score the investigation's queries against the candidates. ``resume``: a run id to continue.
    ``executor``: an executor spec that overrides the settings' (e.g. to resume a run elsewhere)."""
    monitor = monitor or Monitor()
    if resume is not None:
        row = next(project.db["runs"].rows_where("id = ?", [resume]), None)
        if row is None:
            raise InflqError(f"no run {resume} to resume; see `inflq runs`")
        if row["kind"] == "factors":
            raise InflqError(f"run {resume} is a factor fit: continue it with `inflq factors fit --resume {resume}`")
        if row["status"] == "done":
            raise InflqError(f"run {resume} is already complete")
        settings = RunSettings.from_json(row["settings"])
        investigation = project.investigation(row["investigation_id"])["name"]
        run_id = resume
    else:
        settings = settings or RunSettings()
        run_id = None
    if executor is not None:  # where shards run never changes their result
        settings.executor = executor
    project.require_model()
    queries = project.queries(investigation)
    if not queries:
        raise InflqError(f"investigation {investigation!r} has no queries; add one with `inflq query add`")
    estimator = make_estimator(project, settings.estimator)
    filt = make_filter(project, settings.filter)
    executor = make_executor(project, settings.executor)
    store = project.corpus
    if run_id is None:
        run_id = start_run(project, investigation, settings)
    else:
        with project.db.atomic():
            project.db["runs"].update(run_id, {"status": "running", "error": None, "executor": settings.executor, "settings": settings.to_json()})
    monitor.on_progress = _record_progress(project, run_id, monitor, monitor.on_progress)
    phases: dict[str, float] = {}
    with _recording_outcome(project, run_id, executor) as started:
        engine = project.engine(settings.modules)
        _record_batching(project, run_id, settings, engine, monitor)
        t = time.perf_counter()
        factor_set = ensure_factors(project, estimator, engine, executor, settings, monitor, run_id=run_id)
        phases["factors"] = time.perf_counter() - t
        with project.db.atomic():
            project.db["runs"].update(run_id, {"factor_set_id": factor_set})
        # Candidates are fixed at the first attempt and reused on resume.
        cand_rel = f"{ARTIFACTS}/runs/{run_id}/candidates.safetensors"
        t = time.perf_counter()
        if (project.root / cand_rel).exists():
            c = load_tensors(project.root, cand_rel, None, "candidate list")
            cand, mask = c["indices"].numpy(), c["mask"].numpy().astype(bool)
        else:
            toks = [project.tokenize_query(q["prompt"], q["completion"], bool(q["chat"])) for q in queries]
            ctx = FilterContext(
                num_sequences=len(store), query_tokens=[q.tokens for q in toks],
                query_completion_starts=[q.completion_start for q in toks], sequences=store.many,
                metadata=project.metadata_column, artifacts_dir=project.root / ARTIFACTS,
                corpus_fingerprint=store.fingerprint, tokenizer_fingerprint=project.current_tokenizer_fingerprint(),
                seed=settings.seed, monitor=monitor, make_filter=lambda s: make_filter(project, s),
            )
            per_query = filt.candidates(ctx)
            cand = np.unique(np.concatenate([np.asarray(p, dtype=np.int64) for p in per_query])) if per_query else np.zeros(0, np.int64)
            mask = np.zeros((len(queries), len(cand)), dtype=bool)
            for qi, p in enumerate(per_query):
                mask[qi, np.searchsorted(cand, np.asarray(p, dtype=np.int64))] = True
            save_tensors(project.root, cand_rel, {"indices": torch.from_numpy(cand), "mask": torch.from_numpy(mask.astype(np.uint8))})
        phases["candidates"] = time.perf_counter() - t
        if len(cand) == 0:
            raise InflqError("the filter chose no candidate sequences; loosen it (e.g. --filter all)")
        # Preconditioned query gradients, low rank, saved for on-demand attribution.
        t = time.perf_counter()
        monitor.start("query gradients", len(queries))
        # Estimators over training checkpoints (TracIn) score with each checkpoint's model and sum
        # the weighted scores; the others use the project's model once.
        compression = query_compression(settings, store.lengths()[cand])
        scorers = _checkpoint_scorers(project, estimator, queries, settings, compression)
        if scorers is None:
            grads = query_gradients(project, engine, queries, settings.batch_size)
            qg = preconditioned_queries(estimator, grads, compression)
            scorers = [(engine, qg, None)]
        engine, qg = scorers[-1][0], scorers[-1][1]
        monitor.advance(len(queries))
        q_rel = f"{ARTIFACTS}/runs/{run_id}/queries.safetensors"
        q_sum = save_tensors(project.root, q_rel, checkpoint_query_tensors([s[1] for s in scorers]) if scorers[-1][2] else qg.tensors(),
                             {"rank": json.dumps(settings.rank)})
        phases["query gradients"] = time.perf_counter() - t
        # Score in shards, committing each one.
        t = time.perf_counter()
        shards = make_shards(cand, settings.shard_size)
        done = {r["shard"] for r in project.db["run_shards"].rows_where("run_id = ?", [run_id])}
        todo = [s for s in shards if s.index not in done]
        monitor.start("scoring", len(cand) * len(scorers))
        monitor.advance(sum(len(s) for s in shards if s.index in done) * len(scorers))
        partial: dict[int, torch.Tensor] = {}

        def accumulate(shard: Shard, out: dict[str, torch.Tensor]) -> None:
            partial[shard.index] = partial.get(shard.index, 0) + out["scores"].to(torch.float32)

        for c_engine, c_qg, c_path in scorers[:-1]:
            spec = {**worker_spec(project, settings.modules), "checkpoint": c_path}
            executor.map(Job(ScorePass(c_qg), spec, settings.batching(), local=LocalWorker(project, c_engine)), todo, accumulate, monitor)

        # With one model to score with, the pass also yields per-module scores, and each shard
        # keeps those of its own top and bottom K per query: the layer breakdown of the results
        # then needs no second pass. (Summed over checkpoints, the K are known only at the end.)
        per_module = len(scorers) == 1
        starts = dict(zip((s.index for s in shards), np.cumsum([0] + [len(s) for s in shards[:-1]]), strict=True))

        def commit(shard: Shard, out: dict[str, torch.Tensor]) -> None:
            rel = f"{ARTIFACTS}/runs/{run_id}/shard-{shard.index:06d}.safetensors"
            tensors = {"scores": out["scores"].to(torch.float32) + partial.pop(shard.index, 0)}
            if per_module:
                cols = slice(int(starts[shard.index]), int(starts[shard.index]) + len(shard))
                tensors.update(shard_extremes(tensors["scores"].numpy(), out["module_scores"], mask[:, cols], settings.top_k))
            checksum = save_tensors(project.root, rel, tensors)
            with project.db.atomic():
                project.db["run_shards"].upsert({"run_id": run_id, "shard": shard.index, "n": len(shard), "path": rel, "checksum": checksum, "seconds": 0.0}, pk=("run_id", "shard"))

        spec = {**worker_spec(project, settings.modules), "checkpoint": scorers[-1][2]} if scorers[-1][2] else worker_spec(project, settings.modules)
        job = Job(ScorePass(qg, keep_parts=per_module), spec, settings.batching(), local=LocalWorker(project, engine))
        executor.map(job, todo, commit, monitor)
        phases["scoring"] = time.perf_counter() - t
        # Assemble the score matrix from committed shards.
        rows = {r["shard"]: r for r in project.db["run_shards"].rows_where("run_id = ?", [run_id])}

        def shard_file(s: Shard) -> dict[str, torch.Tensor]:
            return load_tensors(project.root, rows[s.index]["path"], rows[s.index]["checksum"], "shard")

        scores = torch.cat([shard_file(s)["scores"] for s in shards]).T.numpy()
        scores = np.where(mask, scores, np.nan).astype(np.float32)
        t = time.perf_counter()
        kept = [(int(starts[s.index]), len(s), lambda s=s: shard_file(s)) for s in shards] if per_module else None
        rs_id = _store_result_set(project, run_id, investigation, queries, settings, estimator, filt, engine, qg, cand, scores, q_rel, q_sum, monitor, scorers=scorers, kept=kept)
        phases["top results"] = time.perf_counter() - t
        seconds = time.perf_counter() - started
        with project.db.atomic():
            project.db["runs"].update(run_id, {"status": "done", "phase": "done", "finished_at": catalog.now(), "seconds": seconds})
        return RunResult(run_id, rs_id, seconds, phases)


def fit_factors(
    project: Project,
    settings: RunSettings,
    monitor: Monitor | None = None,
    investigation: str = "default",
    resume: int | None = None,
) -> tuple[int, int | None, float]:
    """Fit (or find) the estimator's factors without scoring, as a run of kind ``factors`` so that
    fitting shards are committed and ``resume`` (that run's id) continues an interrupted fit.
    Returns ``(run id, factor set id, seconds)``; the factor set is ``None`` for estimators that
    fit nothing."""
    monitor = monitor or Monitor()
    if resume is not None:
        row = next(project.db["runs"].rows_where("id = ?", [resume]), None)
        if row is None or row["kind"] != "factors":
            raise InflqError(f"run {resume} is not a factor fit; see `inflq runs`")
        if row["status"] == "done":
            raise InflqError(f"run {resume} is already complete")
        settings = RunSettings.from_json(row["settings"])
        run_id = resume
        with project.db.atomic():
            project.db["runs"].update(run_id, {"status": "running", "error": None})
    else:
        run_id = None
    project.require_model()
    estimator = make_estimator(project, settings.estimator)
    executor = make_executor(project, settings.executor)
    if run_id is None:
        run_id = start_run(project, investigation, settings, kind="factors")
    monitor.on_progress = _record_progress(project, run_id, monitor, monitor.on_progress)
    with _recording_outcome(project, run_id, executor) as started:
        engine = project.engine(settings.modules)
        _record_batching(project, run_id, settings, engine, monitor)
        fs_id = ensure_factors(project, estimator, engine, executor, settings, monitor, run_id=run_id)
        seconds = time.perf_counter() - started
        with project.db.atomic():
            project.db["runs"].update(run_id, {
                "status": "done", "phase": "done", "factor_set_id": fs_id, "finished_at": catalog.now(), "seconds": seconds,
            })
        return run_id, fs_id, seconds


def _checkpoint_scorers(
    project: Project, estimator: Estimator, queries: list[dict], settings: RunSettings, compression: Compression
) -> list[tuple[GradientEngine, QueryGradients, str]] | None:
    """For an estimator with checkpoints: per checkpoint, its engine and its query gradients,
    preconditioned and multiplied by the checkpoint's weight. ``None`` for the others."""
    ckpts = estimator.checkpoints(project)
    if not ckpts:
        return None
    out = []
    for path, weight in ckpts:
        c_engine = checkpoint_engine(project, path, settings.modules)
        # Preconditioning is linear, so weighting the gradients weights the preconditioned ones.
        grads = {n: v * float(weight) for n, v in query_gradients(project, c_engine, queries, settings.batch_size).items()}
        try:
            qg = preconditioned_queries(estimator, grads, compression)
        except InflqError as exc:
            raise InflqError(f"checkpoint {path}: {exc}") from None
        out.append((c_engine, qg, str(Path(path).resolve())))
    return out


def checkpoint_query_tensors(per_checkpoint: list[QueryGradients]) -> dict[str, torch.Tensor]:
    """Every checkpoint's (weighted, preconditioned) query gradients in one flat tensor dict,
    keyed ``checkpoint<c>/<key>`` in the order of the estimator's checkpoints."""
    return {f"checkpoint{c}/{k}": v for c, qg in enumerate(per_checkpoint) for k, v in qg.tensors().items()}


def split_checkpoint_tensors(tensors: dict[str, torch.Tensor], count: int) -> list[dict[str, torch.Tensor]]:
    """The inverse of :func:`checkpoint_query_tensors`."""
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(count)]
    for key, v in tensors.items():
        head, _, rest = key.partition("/")
        out[int(head[len("checkpoint"):])][rest] = v
    return out


def extremes(row: np.ndarray, valid: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top and the bottom ``k`` columns of ``row`` among ``valid`` ones, best (worst) first;
    ties in column order (so that a shard's own extremes hold every global one that it contains)."""
    cols = np.flatnonzero(valid)
    order = cols[np.argsort(-row[cols], kind="stable")]
    return order[:k], order[::-1][:k]


def shard_extremes(scores: np.ndarray, module_scores: torch.Tensor, mask: np.ndarray, top_k: int) -> dict[str, torch.Tensor]:
    """Per-module scores of one shard's top and bottom ``top_k`` per query (``scores [n, nq]``,
    ``module_scores [n, nq, M]``, ``mask [nq, n]``): ``extreme_query``, ``extreme_row`` (within
    the shard) and ``extreme_modules [p, M]``."""
    k = max(1, top_k)
    valid = mask & ~np.isnan(scores.T)
    pairs = sorted({(qi, int(c)) for qi in range(scores.shape[1]) for side in extremes(scores[:, qi], valid[qi], k) for c in side})
    q = torch.tensor([p[0] for p in pairs], dtype=torch.int64)
    r = torch.tensor([p[1] for p in pairs], dtype=torch.int64)
    parts = module_scores[r, q].to(torch.float32) if pairs else torch.zeros((0, module_scores.shape[-1]))
    return {"extreme_query": q, "extreme_row": r, "extreme_modules": parts.contiguous()}


def _store_result_set(project, run_id, investigation, queries, settings, estimator, filt, engine, qg, cand, scores, q_rel, q_sum, monitor, scorers=None, kept=None) -> int:
    """Save the full score matrix and the top and bottom K per query with per-module scores.

    ``kept``: per score shard, ``(first column, columns, loader)``, the loader returning the shard's
    file with the per-module scores of its own extremes (:func:`shard_extremes`). Picks found
    there need no recomputation; the others (shards written without them: recomputed by
    ``inflq doctor``, or by an older inflq, or scored over several checkpoints) are rescored."""
    k = max(1, settings.top_k)
    picks: list[tuple[int, str, int, int]] = []  # (query row, side, rank, column)
    for qi in range(len(queries)):
        top, bottom = extremes(scores[qi], ~np.isnan(scores[qi]), k)
        picks.extend((qi, "top", r + 1, int(col)) for r, col in enumerate(top))
        picks.extend((qi, "bottom", r + 1, int(col)) for r, col in enumerate(bottom))
    need = {(p[0], p[3]) for p in picks}
    found: dict[tuple[int, int], np.ndarray] = {}
    for first, n, load in kept or []:
        if not any(first <= col < first + n for _, col in need):
            continue
        t = load()
        if "extreme_row" not in t:
            continue
        for q, r, parts in zip(t["extreme_query"].tolist(), t["extreme_row"].tolist(), t["extreme_modules"].numpy(), strict=True):
            if (q, first + r) in need:
                found[(q, first + r)] = parts
    cols = sorted({col for qi, col in need if (qi, col) not in found})
    if cols:
        seq_idx = cand[cols]
        monitor.start("layer breakdown", len(cols))
        module_scores = 0
        for c_engine, c_qg, _ in scorers or [(engine, qg, None)]:  # summed over checkpoints (TracIn)
            worker = LocalWorker(project, c_engine)
            parts = worker.run(ScorePass(c_qg, per_module=True), Shard(0, seq_idx), settings.batching(), monitor)
            module_scores = module_scores + parts["module_scores"].numpy()  # [len(cols), nq, M]
        for i, col in enumerate(cols):
            for qi in range(len(queries)):
                found.setdefault((qi, col), module_scores[i, qi])
    seq_idx = cand[sorted({p[3] for p in picks})]
    names = qg.names
    layers = {n: t.layer for n, t in zip(engine.names, engine.tracked, strict=False)}
    seqs = project.sequence_rows(list(map(int, seq_idx)))
    store = project.corpus
    rs_rel = f"{ARTIFACTS}/results/run-{run_id}.safetensors"
    rs_sum = save_tensors(project.root, rs_rel, {"indices": torch.from_numpy(cand), "scores": torch.from_numpy(scores)})
    inv = project.investigation(investigation)
    text_cache: dict[int, str] = {}
    with project.db.atomic():
        rs_id = project.db["result_sets"].insert({
            "run_id": run_id, "investigation_id": inv["id"], "name": f"run {run_id}: {settings.estimator} / {settings.filter}",
            "estimator": settings.estimator, "filter": filt.spec() if hasattr(filt, "spec") else settings.filter,
            "settings": json.dumps({**json.loads(settings.to_json()), "estimator_settings": estimator.describe(), "modules": names, "full_rank_modules": sorted(qg.full), "query_ids": [q["id"] for q in queries],
                                    # Checkpoint estimators (TracIn): the models whose query gradients the queries artifact holds, in order.
                                    **({"checkpoints": [_rel(c_path, project.root) for _, _, c_path in scorers]} if scorers and scorers[-1][2] else {})}, default=float),
            "num_candidates": int(len(cand)), "scores_path": rs_rel, "scores_checksum": rs_sum,
            "queries_path": q_rel, "queries_checksum": q_sum, "created_at": catalog.now(),
        }).last_pk
        out_rows = []
        for qi, side, rank, col in picks:
            idx = int(cand[col])
            ms = found[(qi, col)]
            by_layer: dict[str, float] = {}
            for n, v in zip(names, ms, strict=False):
                key = str(layers[n]) if layers[n] is not None else n
                by_layer[key] = by_layer.get(key, 0.0) + float(v)
            if idx not in text_cache:
                text_cache[idx] = project.decode(store.get(idx))
            out_rows.append({
                "result_set_id": rs_id, "query_id": queries[qi]["id"], "side": side, "rank": rank, "seq_idx": idx,
                "seq_id": seqs[idx]["seq_id"], "score": float(scores[qi, col]),
                "module_scores": json.dumps(dict(zip(names, map(float, ms), strict=False))), "layer_scores": json.dumps(by_layer),
                "text": text_cache[idx],
            })
        project.db["results"].insert_all(out_rows, batch_size=1000)
    return rs_id


def interrupted_run(project: Project, investigation: str, kind: str = "scores") -> dict | None:
    """The investigation's most recent run of ``kind`` that did not finish (cancelled, failed, or
    left ``running`` by a killed process): what a bare ``--resume`` continues."""
    inv = project.investigation(investigation)
    return next(project.db["runs"].rows_where(
        "investigation_id = ? AND kind = ? AND status != 'done'", [inv["id"], kind], order_by="id desc", limit=1), None)


def committed_work(project: Project, run_id: int) -> str:
    """What a cancelled or failed run has committed, so what a resume keeps and what it redoes.
    Work is committed a whole shard at a time (``shard_size`` sequences, fitting and scoring
    alike); the shard in flight when a run stops is computed again."""
    row = project.db["runs"].get(run_id)
    shard_size = RunSettings.from_json(row["settings"]).shard_size
    parts = []
    if row["factor_set_id"] is not None:
        parts.append(f"its factors (factor set {row['factor_set_id']})")
    else:
        for key, n_shards, n_seqs in project.db.execute(
                "SELECT pass_key, count(*), sum(n) FROM fit_shards WHERE run_id = ? GROUP BY pass_key ORDER BY pass_key", [run_id]).fetchall():
            parts.append(f"{n_seqs} sequences of the {key.split(':', 1)[1]} pass in {n_shards} shard{'s' if n_shards != 1 else ''}")
    n_shards, n_seqs = project.db.execute("SELECT count(*), coalesce(sum(n), 0) FROM run_shards WHERE run_id = ?", [run_id]).fetchone()
    if n_shards:
        parts.append(f"{n_seqs} scored sequences in {n_shards} shard{'s' if n_shards != 1 else ''}")
    unit = f"work is committed one shard ({shard_size} sequences) at a time, and the shard in flight is computed again"
    if not parts:
        return f"nothing committed yet, so a resume starts from the beginning ({unit})"
    return "committed: " + ", ".join(parts) + f"; {unit}"
