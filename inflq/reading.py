"""Reading results back: top sequences, the full score matrix, and on-demand attributions
(layer, token) and probe scores. Shared by the CLI, the TUI and notebooks."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from . import catalog
from .artifacts import load_arrays, load_tensors
from .base import AttributionContext, AttributionResult, Shard
from .errors import InflqError
from .plugins import get_registry
from .progress import Monitor
from .project import Project

if TYPE_CHECKING:  # the engine (torch) loads only for scoring; reading results back needs NumPy only
    from .contractions import QueryGradients


def result_sets(project: Project, investigation: str | None = None) -> list[dict]:
    return catalog.result_sets_of(project.db, None if investigation is None else catalog.investigation(project.db, investigation)["id"])


def result_set(project: Project, investigation: str, result_set_id: int | None = None) -> dict:
    """A result set by id, or the investigation's latest."""
    sets = result_sets(project, investigation)
    if result_set_id is not None:
        for rs in sets:
            if rs["id"] == result_set_id:
                return rs
        raise InflqError(f"no result set {result_set_id} in investigation {investigation!r}; see `inflq runs`")
    if not sets:
        raise InflqError(f"investigation {investigation!r} has no results yet; run `inflq run` first")
    return sets[-1]


def estimator_summary(rs: dict) -> str:
    """One line on how a result set was estimated: the damping actually used (mean over modules),
    the query rank, and an iterative estimator's convergence residual when it recorded one."""
    settings = json.loads(rs["settings"] or "{}")
    est = settings.get("estimator_settings") or {}
    parts = []
    per_module = est.get("damping_per_module")
    if isinstance(per_module, dict) and per_module:
        mean = sum(per_module.values()) / len(per_module)
        how = f"{est['damping']:.3g}" if est.get("damping") is not None else f"{est.get('damping_factor', 0.1):g} × mean eigenvalue"
        parts.append(f"damping {how} (λ mean {mean:.3g})")
    rank = settings.get("rank")
    full = settings.get("full_rank_modules")
    if rank is None or (full is not None and len(full) == len(settings.get("modules") or ())):
        parts.append("full rank")
    elif full:
        parts.append(f"rank {rank} ({len(full)} of {len(settings.get('modules') or ())} modules full rank, where cheaper)")
    else:
        parts.append(f"rank {rank}")
    if est.get("residual") is not None:
        parts.append(f"residual {est['residual']:.3g}")
    return ", ".join(parts)


# Catalog columns that hold JSON text (lists and objects stored as one SQLite value).
JSON_COLUMNS = ("tags", "layer_scores", "module_scores")


def decoded(row: dict) -> dict:
    """``row`` with its JSON-text columns (tags, layer and module scores) as lists and objects: what
    ``--json`` output and exports show, so that no one has to parse JSON inside JSON."""
    return {k: (json.loads(v) if k in JSON_COLUMNS and isinstance(v, str) else v) for k, v in row.items()}


def top(project: Project, result_set_id: int, query_id: int, side: str = "top", k: int = 20, offset: int = 0) -> list[dict]:
    """The stored top (most positive) or bottom (most negative) sequences of one query."""
    if side not in ("top", "bottom"):
        raise InflqError("side must be top or bottom")
    return catalog.stored_results(project.db, result_set_id, query_id, side, k, offset)


def scores(project: Project, rs: dict) -> tuple[np.ndarray, np.ndarray]:
    """``(indices, scores[nq_at_run, len(indices)])`` of a result set, NaN where not a candidate."""
    t = load_arrays(project.root, rs["scores_path"], rs["scores_checksum"], "score matrix")
    return t["indices"], t["scores"]


def score_matrix(project: Project, investigation: str, result_set_id: int | None = None) -> np.ndarray:
    """float32 ``[queries, corpus sequences]`` in corpus order, queries in the order added,
    NaN for sequences not scored (and for queries added after the run)."""
    rs = result_set(project, investigation, result_set_id)
    queries = catalog.queries(project.db, investigation)
    idx, sc = scores(project, rs)
    order = json.loads(rs["settings"])["query_ids"]
    n = len(project.runtime.corpus)
    out = np.full((len(queries), n), np.nan, dtype=np.float32)
    row_of = {qid: i for i, qid in enumerate(order)}
    for qi, q in enumerate(queries):
        if q["id"] in row_of and row_of[q["id"]] < sc.shape[0]:
            out[qi, idx] = sc[row_of[q["id"]]]
    return out


def query_scores(project: Project, rs: dict, query_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``(corpus indices, scores)`` of one query in a result set (NaN where not a candidate)."""
    ids = json.loads(rs["settings"]).get("query_ids") or []
    if query_id not in ids:
        raise InflqError(f"query {query_id} was not part of result set {rs['id']}; run the investigation again")
    idx, sc = scores(project, rs)
    return idx, sc[ids.index(query_id)]


def distribution(project: Project, investigation: str, query_id: int, result_set_id: int | None = None) -> np.ndarray:
    """All finite scores of one query (for the complementary-CDF plot)."""
    _, row = query_scores(project, result_set(project, investigation, result_set_id), query_id)
    return row[np.isfinite(row)]


@dataclass
class ScoringSession:
    """Everything needed to score arbitrary sequences against a result set's queries: its
    preconditioned query gradients and an engine over the same modules.

    An estimator over training checkpoints (TracIn) scores with each checkpoint's model:
    ``checkpoints`` then holds, per checkpoint, its engine and its query gradients (already
    weighted by its learning rate), and every score and attribution is their sum,
    ``Σ_c η_c ⟨∇ℓ_q(θ_c), ∇L(z, θ_c)⟩`` split by token or module. ``qg`` and ``engine`` are then the
    last checkpoint's."""

    project: Project
    qg: QueryGradients
    query_ids: list[int]
    engine: object
    checkpoints: list[tuple[object, QueryGradients]] | None = None

    @classmethod
    def for_result_set(cls, project: Project, rs: dict) -> ScoringSession:
        from .contractions import QueryGradients
        from .runs import checkpoint_engine, split_checkpoint_tensors

        settings = json.loads(rs["settings"])
        tensors = load_tensors(project.root, rs["queries_path"], rs["queries_checksum"], "query gradients")
        modules = ",".join(settings["modules"])
        paths = settings.get("checkpoints")
        if paths:
            parts = [
                (checkpoint_engine(project, project.path(path), modules), QueryGradients.from_tensors(t, settings.get("rank")))
                for path, t in zip(paths, split_checkpoint_tensors(tensors, len(paths)), strict=True)
            ]
            return cls(project, parts[-1][1], settings["query_ids"], parts[-1][0], parts)
        qg = QueryGradients.from_tensors(tensors, settings.get("rank"))
        return cls(project, qg, settings["query_ids"], project.runtime.engine(modules))

    @classmethod
    def for_queries(cls, project: Project, query_ids: list[int], estimator: str | None = None, rank: int | None = None, monitor: Monitor | None = None, **run) -> ScoringSession:
        """Fit (or reuse cached) factors and precondition the given queries, without a corpus run."""
        from .runs import RunSettings, prepare_estimator, scorers_for

        settings = RunSettings(estimator=estimator, rank=rank, **run)
        prepared = prepare_estimator(project, settings, monitor)
        queries = [catalog.query(project.db, q) for q in query_ids]
        scorers = scorers_for(project, prepared.estimator, prepared.engine, queries, settings, rank)
        parts = [(s.engine, s.queries) for s in scorers] if scorers[-1].checkpoint else None
        return cls(project, scorers[-1].queries, list(query_ids), scorers[-1].engine, parts)

    def breakdown(self, tokens: np.ndarray, query_id: int) -> tuple[np.ndarray, np.ndarray]:
        """``(module_scores [M], token_module_scores [T, M])`` for one sequence and query, summed
        over the checkpoints for a checkpoint estimator."""
        qi = self.query_ids.index(query_id)
        import torch

        from .engine import make_batch

        names = self.qg.names
        module = np.zeros(len(names))
        per_tok = np.zeros((len(tokens), len(names)))
        for engine, qg in self.checkpoints or [(self.engine, self.qg)]:
            caps, _ = engine.capture(make_batch([tokens], self.project.runtime.pad_id, engine.device), "data")
            per_tok += torch.stack([qg.token_scores(n, caps[n])[0, :, qi] for n in names], dim=1).cpu().numpy().astype(np.float64)
            module += torch.stack([qg.module_scores(n, caps[n])[0, qi] for n in names]).cpu().numpy().astype(np.float64)
        return module, per_tok

    def attribute(self, tokens: np.ndarray, query_id: int, kind: str = "token") -> AttributionResult:
        module, per_tok = self.breakdown(tokens, query_id)
        by_name = {t.name: t for t in self.engine.tracked}
        ctx = AttributionContext(
            tracked=[by_name[n] for n in self.qg.names], module_scores=module,
            token_module_scores=lambda: per_tok, tokens=self.project.runtime.token_strings(tokens),
        )
        return get_registry().create("attribution", kind).attribute(ctx)

    def score_texts(self, texts: list[str], query_id: int) -> list[AttributionResult]:
        """Token attributions of hand-written probe sequences (their totals are the scores)."""
        return [self.attribute(self.project.runtime.tokenize_sequence(t), query_id, "token") for t in texts]


def self_influence(project: Project, estimator: str | None = None, indices: np.ndarray | None = None, monitor: Monitor | None = None, batch_size: int = 8, **run) -> tuple[np.ndarray, np.ndarray]:
    """``∇L(z)ᵀ (G + λI)⁻¹ ∇L(z)`` of training sequences (all, or ``indices``)."""
    from .passes import SelfInfluencePass
    from .runs import LocalWorker, RunSettings, prepare_estimator

    monitor = monitor or Monitor()
    settings = RunSettings(estimator=estimator, batch_size=batch_size, **run)
    prepared = prepare_estimator(project, settings, monitor)
    est, engine = prepared.estimator, prepared.engine
    idx = np.arange(len(project.runtime.corpus), dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64)
    monitor.start("self-influence", len(idx))
    out = LocalWorker(project, engine).run(SelfInfluencePass(est), Shard(0, idx), batch_size, monitor)
    return idx, out["scores"][:, 0].numpy()
