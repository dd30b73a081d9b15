"""Scoring: the queries' gradients, preconditioned by the estimator; the candidates a filter
chooses; and each candidate's score per query, shard by shard. An estimator over several models
(``Estimator.checkpoints``, e.g. TracIn) scores with each model and sums the weighted scores."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import catalog, layout
from ..artifacts import load_tensors, save_tensors
from ..base import Estimator, Executor, FilterContext, Job, ScoringContext
from ..contractions import Compression, QueryGradients
from ..engine import GradientEngine, SequenceGradients
from ..errors import InflqError
from ..measuring import measure
from ..passes import ScorePass, Shard, make_shards
from ..progress import Monitor
from ..project import Project
from ..settings import RunSettings
from .committed import run_committed_pass
from .workers import LocalWorker, checkpoint_engine, worker_spec


@dataclass
class Scorer:
    """One model to score with: its engine and the queries' preconditioned gradients under it.
    ``checkpoint``: the checkpoint's resolved path (its gradients already weighted); ``None``:
    the project's model."""

    engine: GradientEngine
    queries: QueryGradients
    checkpoint: str | None = None


def query_gradients(project: Project, engine: GradientEngine, queries: list[dict], batch_size: int | None) -> SequenceGradients:
    """Gradients of each query's measurement loss, the negative of its measurement (the query's
    :class:`inflq.Measurement`; ``logprob``: ``-log p(completion | prompt)``): ``[nq, out, in_dim]``
    per module, with their token factors (only measured tokens carry gradient), ``batch_size``
    queries at a time (``None``: 8). Every estimator's query gradients come from here."""
    measured = [measure(project.runtime, q) for q in queries]
    return engine.measurement_gradients(measured, project.runtime.pad_id, batch_size)


def query_compression(settings: RunSettings, lengths: np.ndarray, estimator: Estimator | None = None) -> Compression:
    """The run's query compression: rank ``settings.rank``, full rank where scoring sequences of
    these ``lengths`` is cheaper that way, within ``settings.full_rank_mb``; full rank throughout
    for an estimator whose queries must not be compressed (:attr:`Estimator.full_rank_queries`)."""
    if estimator is not None and estimator.full_rank_queries:
        return Compression(None, None, int(settings.full_rank_mb) << 20)
    tokens = float(np.mean(lengths)) if len(lengths) and settings.full_rank_mb > 0 else None
    return Compression(settings.rank, tokens, int(settings.full_rank_mb) << 20)


def honour_full_rank(estimator: Estimator, settings: RunSettings, monitor: Monitor) -> None:
    """A run of an estimator whose queries must not be compressed (:attr:`Estimator.full_rank_queries`)
    holds them at full rank, so its settings say rank ``None`` (recorded with the run and its result
    set, shown by ``inflq top`` and the TUI); a rank asked for is reported as not applied (a warning
    when it is not the default one)."""
    if not estimator.full_rank_queries or settings.rank is None:
        return
    say = monitor.note if settings.rank == RunSettings().rank else monitor.warn
    say(f"estimator {estimator.name} keeps its query gradients at full rank (compressing them would change its scores): "
        f"rank {settings.rank} not applied")
    settings.rank = None


def full_rank_query_bytes(engine: GradientEngine, num_queries: int) -> int:
    """Bytes of ``num_queries`` preconditioned query gradients held at full rank (float32)."""
    return 4 * num_queries * sum(t.out_features * t.in_dim for t in engine.tracked)


def check_full_rank_memory(project: Project, estimator: Estimator, engine: GradientEngine, num_queries: int, cap: int) -> None:
    """For an estimator whose queries must not be compressed: a one-line error, before any work,
    when they would exceed ``cap`` bytes at full rank (``--full-rank-memory``), rather than memory
    running out while scoring or the queries being compressed after all."""
    if not estimator.full_rank_queries:
        return
    need = full_rank_query_bytes(engine, num_queries) * max(1, len(estimator.checkpoints(project) or ()))
    if need > cap:
        raise InflqError(
            f"estimator {estimator.name} keeps its query gradients at full rank: {num_queries} queries need "
            f"{need / 2**20:,.1f} MiB, more than the {cap / 2**20:,.0f} MiB allowed; raise --full-rank-memory to "
            f"{-(-need // 2**20):,}, or score fewer queries or modules (--modules)"
        )


def preconditioned_queries(estimator: Estimator, grads: dict[str, torch.Tensor], rank: int | None | Compression) -> QueryGradients:
    qg = estimator.precondition_queries(grads, rank)
    if estimator.full_rank_queries and qg.left:
        raise InflqError(
            f"estimator {estimator.name} declares full_rank_queries, but its precondition_queries factorised "
            f"{', '.join(sorted(qg.left))}: hand its rank on to QueryGradients.from_preconditioned"
        )
    for key, q in qg.tensors().items():
        if not torch.isfinite(q).all():
            raise InflqError(f"the preconditioned query gradient of {key.partition('/')[2]} is not finite; increase the damping")
    return qg


# Dense query gradients held at once while preconditioning (:func:`preconditioned_query_gradients`):
# 0.34 GB per query on GPT-2 small, so one query at a time there, all of them on small models.
QUERY_CHUNK_BYTES = 256 << 20


def preconditioned_query_gradients(
    project: Project,
    estimator: Estimator,
    engine: GradientEngine,
    queries: list[dict],
    batch_size: int | None,
    compression: Compression | int | None,
    weight: float = 1.0,
    chunk_bytes: int = QUERY_CHUNK_BYTES,
) -> QueryGradients:
    """The queries' preconditioned gradients (times ``weight``), formed and preconditioned a few
    queries at a time: as many as hold ``chunk_bytes`` of dense gradients, at least one. Memory then
    holds a few queries' dense gradients and every query's compressed ones, instead of every query's
    dense gradients at once (which grew with the number of queries). Which modules stay at full rank
    is planned once for all the queries, so the parts join; each query is preconditioned and
    compressed on its own either way, so the result is the one of all queries at once."""
    per_query = full_rank_query_bytes(engine, 1)
    size = max(1, int(chunk_bytes) // max(1, per_query))
    policy = Compression.of(compression)
    if estimator.full_rank_queries:  # whatever the caller asked: this estimator's scores need them whole
        policy = dataclasses.replace(policy, rank=None, tokens=None)
    policy = policy.fixed({t.name: (len(queries), t.out_features, t.in_dim) for t in engine.tracked})
    parts = []
    for s in range(0, len(queries), size):
        grads = query_gradients(project, engine, queries[s : s + size], batch_size)
        if weight != 1.0:  # preconditioning is linear: weighting the gradients weights the result
            grads = {n: v * float(weight) for n, v in grads.items()}
        parts.append(preconditioned_queries(estimator, grads, policy))
        del grads
    return QueryGradients.concat(parts)


def scorers_for(
    project: Project, estimator: Estimator, engine: GradientEngine, queries: list[dict], settings: RunSettings, compression: Compression | int | None
) -> list[Scorer]:
    """The models the estimator scores with, each with the queries' preconditioned gradients: per
    checkpoint its engine and gradients multiplied by the checkpoint's weight (``Estimator.checkpoints``),
    else the project's ``engine`` alone."""
    check_full_rank_memory(project, estimator, engine, len(queries), Compression.of(compression).full_rank_bytes)
    ckpts = estimator.checkpoints(project)
    if not ckpts:
        return [Scorer(engine, preconditioned_query_gradients(project, estimator, engine, queries, settings.batch_size, compression))]
    out = []
    for path, weight in ckpts:
        c_engine = checkpoint_engine(project, path, settings.modules)
        try:
            qg = preconditioned_query_gradients(project, estimator, c_engine, queries, settings.batch_size, compression, float(weight))
        except InflqError as exc:
            raise InflqError(f"checkpoint {path}: {exc}") from None
        out.append(Scorer(c_engine, qg, str(Path(path).resolve())))
    return out


def scorer_tensors(scorers: list[Scorer]) -> dict[str, torch.Tensor]:
    """The scorers' query gradients in one flat tensor dict: one model's as they are, several
    keyed ``checkpoint<c>/<key>`` in the order of the estimator's checkpoints."""
    if scorers[-1].checkpoint is None:
        return scorers[-1].queries.tensors()
    return {f"checkpoint{c}/{k}": v for c, s in enumerate(scorers) for k, v in s.queries.tensors().items()}


def split_checkpoint_tensors(tensors: dict[str, torch.Tensor], count: int) -> list[dict[str, torch.Tensor]]:
    """The inverse of :func:`scorer_tensors` for ``count`` checkpoints."""
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(count)]
    for key, v in tensors.items():
        head, _, rest = key.partition("/")
        out[int(head[len("checkpoint"):])][rest] = v
    return out


def filter_context(
    project: Project, queries: list[dict], seed: int, monitor: Monitor, make_filter: Callable[[str], object], modules: str | None = None
) -> FilterContext:
    """What a filter sees of the project and the ``queries`` (tokenised as a run measures them)."""
    store = project.runtime.corpus
    toks = [project.runtime.tokenize_query(q["prompt"], q["completion"], bool(q["chat"])) for q in queries]
    return FilterContext(
        num_sequences=len(store), query_tokens=[q.tokens for q in toks],
        query_completion_starts=[q.completion_start for q in toks], sequences=store.many,
        metadata=functools.partial(catalog.metadata_column, project.db), artifacts_dir=project.root / layout.ARTIFACTS,
        corpus_fingerprint=store.key, tokenizer_fingerprint=project.current_tokenizer_fingerprint(),
        seed=seed, monitor=monitor, make_filter=make_filter, project=project, modules=modules,
        query_measurements=[measure(project.runtime, q) for q in queries],
    )


def choose_candidates(project: Project, run_id: int, filt, ctx: Callable[[], FilterContext], num_queries: int) -> tuple[np.ndarray, np.ndarray]:
    """``(candidate corpus indices, mask [queries, candidates])``: chosen by ``filt`` at a run's
    first attempt and saved, reused on resume."""
    cand_rel = layout.candidates(run_id)
    if (project.root / cand_rel).exists():
        c = load_tensors(project.root, cand_rel, None, "candidate list")
        return c["indices"].numpy(), c["mask"].numpy().astype(bool)
    per_query = filt.candidates(ctx())
    cand = np.unique(np.concatenate([np.asarray(p, dtype=np.int64) for p in per_query])) if per_query else np.zeros(0, np.int64)
    mask = np.zeros((num_queries, len(cand)), dtype=bool)
    for qi, p in enumerate(per_query):
        mask[qi, np.searchsorted(cand, np.asarray(p, dtype=np.int64))] = True
    save_tensors(project.root, cand_rel, {"indices": torch.from_numpy(cand), "mask": torch.from_numpy(mask.astype(np.uint8))})
    return cand, mask


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


@dataclass
class ScoredShards:
    """A run's committed score shards: ``kept`` per shard ``(first column, columns, loader)``
    when they carry their own extremes' per-module scores (one scorer), else ``None``."""

    scores: np.ndarray  # [queries, candidates], NaN where not a candidate
    kept: list[tuple[int, int, Callable[[], dict[str, torch.Tensor]]]] | None


def score_shards(
    project: Project, run_id: int, scorers: list[Scorer], cand: np.ndarray, mask: np.ndarray,
    settings: RunSettings, executor: Executor, monitor: Monitor,
) -> ScoredShards:
    """Score the candidates shard by shard with every scorer, committing each shard once all
    scorers have scored it; shards committed before (a resumed run) are not scored again."""
    shards = make_shards(cand, settings.shard_size)
    done = set(catalog.score_shards(project.db, run_id))
    todo = [s for s in shards if s.index not in done]
    monitor.start("scoring", len(cand) * len(scorers))
    monitor.advance(sum(len(s) for s in shards if s.index in done) * len(scorers))
    partial: dict[int, torch.Tensor] = {}

    def accumulate(shard: Shard, out: dict[str, torch.Tensor]) -> None:
        partial[shard.index] = partial.get(shard.index, 0) + out["scores"].to(torch.float32)

    for s in scorers[:-1]:
        job = Job(ScorePass(s.queries), worker_spec(project, settings.modules, s.checkpoint), settings.batching(), local=LocalWorker(project, s.engine))
        executor.map(job, todo, accumulate, monitor)

    # With one model to score with, the pass also yields per-module scores, and each shard
    # keeps those of its own top and bottom K per query: the layer breakdown of the results
    # then needs no second pass. (Summed over checkpoints, the K are known only at the end.)
    per_module = len(scorers) == 1
    starts = dict(zip((s.index for s in shards), np.cumsum([0] + [len(s) for s in shards[:-1]]), strict=True))

    def commit(shard: Shard, out: dict[str, torch.Tensor]) -> None:
        rel = layout.score_shard(run_id, shard.index)
        tensors = {"scores": out["scores"].to(torch.float32) + partial.pop(shard.index, 0)}
        if per_module:
            cols = slice(int(starts[shard.index]), int(starts[shard.index]) + len(shard))
            tensors.update(shard_extremes(tensors["scores"].numpy(), out["module_scores"], mask[:, cols], settings.top_k))
        checksum = save_tensors(project.root, rel, tensors)
        catalog.record_score_shard(project.db, run_id, shard.index, len(shard), rel, checksum)

    last = scorers[-1]
    job = Job(ScorePass(last.queries, keep_parts=per_module), worker_spec(project, settings.modules, last.checkpoint), settings.batching(),
              local=LocalWorker(project, last.engine))
    executor.map(job, todo, commit, monitor)
    # Assemble the score matrix from committed shards.
    rows = catalog.score_shards(project.db, run_id)

    def shard_file(s: Shard) -> dict[str, torch.Tensor]:
        return load_tensors(project.root, rows[s.index]["path"], rows[s.index]["checksum"], "shard")

    scores = torch.cat([shard_file(s)["scores"] for s in shards]).T.numpy()
    scores = np.where(mask, scores, np.nan).astype(np.float32)
    kept = [(int(starts[s.index]), len(s), lambda s=s: shard_file(s)) for s in shards] if per_module else None
    return ScoredShards(scores, kept)


# An estimator's own passes over the candidates (ScoringContext.run_pass) commit their shards under
# pass keys with this prefix, apart from the fit's; they are dropped when the run is done.
CANDIDATE_PASSES = "candidates:"


def scoring_context(
    project: Project, estimator: Estimator, engine: GradientEngine, queries: list[dict], cand: np.ndarray, settings: RunSettings,
    monitor: Monitor, *, executor: Executor | None = None, run_id: int | None = None, preconditioned: QueryGradients | None = None,
) -> ScoringContext:
    """What :meth:`inflq.Estimator.score_candidates` receives. Its ``run_pass`` runs a pass over
    ``cand`` in shards of ``settings.shard_size`` on ``executor``; with a ``run_id``, each shard is
    committed to the run as it arrives (``fit_shards``, pass key ``candidates:<n>:<phase>``) and a
    resumed run reads the committed ones back. Without an executor, passes run in this process."""
    count = itertools.count()
    # What the estimator's passes ran over: shards committed for other candidates are stale.
    data_key = hashlib.sha256(f"{estimator.spec()}|{settings.seed}|{settings.shard_size}".encode() + np.asarray(cand, np.int64).tobytes()).hexdigest()[:24]
    worker = LocalWorker(project, engine)

    def run_pass(pass_) -> dict[str, torch.Tensor]:
        n = next(count)
        pass_.seed = settings.seed
        job = Job(pass_, worker_spec(project, settings.modules), settings.batching(), local=worker)
        return run_committed_pass(
            project, executor, job, make_shards(cand, settings.shard_size), monitor, run_id=run_id,
            pass_key=f"{CANDIDATE_PASSES}{n}:{pass_.phase}", data_key=data_key, shard_path=functools.partial(layout.candidate_pass_shard, run_id, n),
        )

    grads = functools.cache(lambda: query_gradients(project, engine, queries, settings.batch_size))
    return ScoringContext(project, queries, np.asarray(cand, np.int64), monitor, engine, run_pass, grads, preconditioned, settings.seed)


def forget_candidate_passes(project: Project, run_id: int) -> None:
    """Drop a finished run's committed shards of the estimator's own passes (it kept what it needed)."""
    for rel in catalog.forget_fit_shards(project.db, run_id, CANDIDATE_PASSES):
        (project.root / rel).unlink(missing_ok=True)


def estimator_scores(project: Project, estimator: Estimator, ctx: ScoringContext, mask: np.ndarray) -> ScoredShards | None:
    """The candidates' scores from the estimator itself (:meth:`inflq.Estimator.score_candidates`,
    e.g. from a stored gradient index or a pass of its own), NaN where not a candidate; ``None``
    when it leaves them to the scoring passes (the default) or sums over checkpoints."""
    if estimator.checkpoints(project):
        return None
    out = estimator.score_candidates(ctx)
    if out is None:
        return None
    out = np.asarray(out, dtype=np.float32)
    if out.shape != mask.shape:
        raise InflqError(f"estimator {estimator.name} returned scores of shape {out.shape} for {mask.shape[0]} queries and {mask.shape[1]} candidates")
    return ScoredShards(np.where(mask, out, np.nan).astype(np.float32), None)


def pick_extremes(scores: np.ndarray, top_k: int) -> list[tuple[int, str, int, int]]:
    """The top and bottom ``top_k`` per query row: ``(query row, side, rank, column)``."""
    k = max(1, top_k)
    picks: list[tuple[int, str, int, int]] = []
    for qi in range(scores.shape[0]):
        top, bottom = extremes(scores[qi], ~np.isnan(scores[qi]), k)
        picks.extend((qi, "top", r + 1, int(col)) for r, col in enumerate(top))
        picks.extend((qi, "bottom", r + 1, int(col)) for r, col in enumerate(bottom))
    return picks


def extreme_module_scores(
    project: Project, scorers: list[Scorer], cand: np.ndarray, need: set[tuple[int, int]], num_queries: int,
    settings: RunSettings, monitor: Monitor, kept=None,
) -> dict[tuple[int, int], np.ndarray]:
    """Per-module scores of the ``(query row, column)`` pairs in ``need``.

    ``kept``: per score shard, ``(first column, columns, loader)``, the loader returning the shard's
    file with the per-module scores of its own extremes (:func:`shard_extremes`). Picks found
    there need no recomputation; the others (shards written without them: recomputed by
    ``inflq doctor``, or by an older inflq, or scored over several checkpoints) are rescored."""
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
        for s in scorers:  # summed over checkpoints (TracIn)
            parts = LocalWorker(project, s.engine).run(ScorePass(s.queries, per_module=True), Shard(0, seq_idx), settings.batching(), monitor)
            module_scores = module_scores + parts["module_scores"].numpy()  # [len(cols), nq, M]
        for i, col in enumerate(cols):
            for qi in range(num_queries):
                found.setdefault((qi, col), module_scores[i, qi])
    return found


def save_queries(project: Project, run_id: int, scorers: list[Scorer], rank: int | None) -> tuple[str, str]:
    """Save the run's preconditioned query gradients for on-demand attribution: ``(path, checksum)``."""
    rel = layout.query_gradients(run_id)
    return rel, save_tensors(project.root, rel, scorer_tensors(scorers), {"rank": json.dumps(rank)})
