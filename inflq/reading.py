"""Reading results back: top sequences, the full score matrix, and on-demand attributions
(layer, token) and probe scores. Shared by the CLI, the TUI and notebooks."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from . import catalog, layout
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
        other = catalog.get_result_set(project.db, result_set_id)
        if other is not None:
            name = catalog.investigation(project.db, other["investigation_id"])["name"]
            raise InflqError(f"result set {result_set_id} belongs to investigation {name!r}, not {investigation!r}; add -i {name}")
        raise InflqError(f"no result set {result_set_id} in investigation {investigation!r}; see `inflq runs`")
    if not sets:
        others = sorted({catalog.investigation(project.db, rs["investigation_id"])["name"] for rs in result_sets(project)})
        hint = f"; results are in {_names(others)} (pick one with -i NAME)" if others else ""
        raise InflqError(f"investigation {investigation!r} has no results yet; run `inflq run` first{hint}")
    return sets[-1]


def investigation_queries(project: Project, investigation: str) -> list[dict]:
    """The investigation's queries, in the order added (the rows of :func:`score_matrix`), as
    catalog rows: ``id``, ``prompt``, ``completion``, ``chat``."""
    return catalog.queries(project.db, investigation)
def _names(names: list[str]) -> str:
    quoted = [repr(n) for n in names]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]


def query_of(project: Project, investigation: str, query_id: int) -> dict:
    """Query ``query_id``, which must belong to ``investigation``: else an error that names the
    investigation it is in and how to pick it (``-i NAME``)."""
    q = catalog.query(project.db, query_id)
    inv = catalog.investigation(project.db, investigation)
    if q["investigation_id"] != inv["id"]:
        name = catalog.investigation(project.db, q["investigation_id"])["name"]
        raise InflqError(f"query {query_id} is in investigation {name!r}, not {investigation!r}; add -i {name}")
    return q


def scored_by(rs: dict, query_id: int) -> bool:
    """Whether result set ``rs`` scored query ``query_id`` (queries added after its run were not)."""
    return query_id in (json.loads(rs["settings"] or "{}").get("query_ids") or [])


def require_scored(rs: dict, query_id: int, investigation: str) -> None:
    """An error unless result set ``rs`` scored query ``query_id``: it was added after the run."""
    if not scored_by(rs, query_id):
        raise InflqError(f"query {query_id} was added after run {rs['run_id']} (result set {rs['id']}), which did not score it; "
                         f"score it with `inflq run PROJECT -i {investigation}`")


def estimator_summary(rs: dict) -> str:
    """One line on how a result set was estimated: what its estimator's :meth:`inflq.Estimator.summarize`
    makes of the ``describe()`` recorded with it (the built-in EK-FAC: the damping actually used; LiSSA:
    also its convergence residual; a plugin: its own line, by default its short scalar entries), then
    the rank its queries were held at."""
    from .base import Estimator

    settings = json.loads(rs["settings"] or "{}")
    est = settings.get("estimator_settings") or {}
    parts = []
    if settings.get("scores_from") == "estimator" or "index_settings" in est:
        # The estimator scored every candidate itself (a stored gradient index): no query rank
        # or damping of a run's passes applies to the scores; the rank is that of attributions.
        what = [f"width {est['width']}"] if est.get("width") else []
        what += [f"{est['metric']} product" if est.get("metric") == "inner" else str(est["metric"])] if est.get("metric") else []
        source = f"the stored gradient index {est['key']}" if est.get("key") else f"{rs['estimator']}'s stored gradients"
        parts.append(f"scores from {source}" + (f" ({', '.join(what)})" if what else ""))
        rank = settings.get("rank")
        parts.append("attribution at full rank" if rank is None else f"attribution at rank {rank}")
        return ", ".join(parts)
    # A result set outlives its plugin: without it, the default rendering of what it recorded.
    cls = get_registry().all("estimator").get((rs.get("estimator") or "").split(":")[0], Estimator)
    try:
        parts.append(cls.summarize(est))
    except Exception:  # a plugin's summary must not take `inflq top` down
        parts.append(Estimator.summarize(est))
    rank = settings.get("rank")
    full = settings.get("full_rank_modules")
    if rank is None or (full is not None and len(full) == len(settings.get("modules") or ())):
        parts.append("full rank")
    elif full:
        parts.append(f"rank {rank} ({len(full)} of {len(settings.get('modules') or ())} modules full rank, where cheaper)")
    else:
        parts.append(f"rank {rank}")
    return ", ".join(p for p in parts if p)


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


def scored_queries(rs: dict) -> list[int]:
    """The ids of the queries a result set scored, in its rows' order (queries added to the
    investigation after its run are not among them)."""
    return list(json.loads(rs["settings"]).get("query_ids") or [])


def query_scores(project: Project, rs: dict, query_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``(corpus indices, scores)`` of one query in a result set (NaN where not a candidate)."""
    ids = json.loads(rs["settings"]).get("query_ids") or []
    if query_id not in ids:
        raise InflqError(f"query {query_id} was not part of result set {rs['id']} (run {rs['run_id']}); run the investigation again to score it")
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
        if query_id not in self.query_ids:
            raise InflqError(f"query {query_id} is not among the queries these gradients were computed for ({', '.join(map(str, self.query_ids))})")
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


def self_influence(project: Project, estimator: str | None = None, indices: np.ndarray | None = None, monitor: Monitor | None = None,
                   batch_size: int = 8, cache: bool = True, info: dict | None = None, **run) -> tuple[np.ndarray, np.ndarray]:
    """``∇L(z)ᵀ (G + λI)⁻¹ ∇L(z)`` of training sequences (all, or ``indices``).

    Computed scores are kept in the project (``self_influence``, an artifact addressed by a hash of
    what determines them: the estimator and its settings, its factor set, the tracked modules, the
    model, the corpus and the sequences), so asking again reads them back (``cache=False``:
    recompute). The batch size is not part of the key: it changes the scores only by rounding.
    ``info``, when given, is filled with ``cached`` (read back or not), ``path`` and ``created_at``."""
    import hashlib
    import time

    from .artifacts import save_tensors
    from .passes import SelfInfluencePass
    from .runs import LocalWorker, RunSettings, prepare_estimator

    monitor = monitor or Monitor()
    settings = RunSettings(estimator=estimator, batch_size=batch_size, **run)
    prepared = prepare_estimator(project, settings, monitor)
    est, engine = prepared.estimator, prepared.engine
    idx = np.arange(len(project.runtime.corpus), dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64)
    fs = catalog.factor_set(project.db, prepared.factor_set_id) if prepared.factor_set_id is not None else None
    key_src = {
        "estimator": est.name, "settings": est.settings, "factors": fs["key"] if fs else None, "modules": engine.names,
        "model": project.model_fingerprint, "corpus": project.runtime.corpus.fingerprint, "seed": settings.seed,
        "fit_sequences": settings.fit_sequences, "dtype": str(next(engine.model.parameters()).dtype),
        "indices": hashlib.sha256(idx.tobytes()).hexdigest(),
    }
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True, default=str).encode()).hexdigest()[:24]
    row = catalog.self_influence_by_key(project.db, key) if cache else None
    if row is not None:
        try:
            t = load_tensors(project.root, row["path"], row["checksum"], "self-influence scores")
            if info is not None:
                info.update(cached=True, path=row["path"], created_at=row["created_at"])
            return t["indices"].numpy(), t["scores"].numpy()
        except InflqError as exc:  # a damaged or missing cache is recomputed
            monitor.warn(f"{exc}; recomputing")
    monitor.start("self-influence", len(idx))
    started = time.perf_counter()
    out = LocalWorker(project, engine).run(SelfInfluencePass(est), Shard(0, idx), batch_size, monitor)
    vals = out["scores"][:, 0].float()
    if not project.readonly:
        import torch

        rel = layout.self_influence_scores(est.name, key)
        checksum = save_tensors(project.root, rel, {"indices": torch.from_numpy(idx), "scores": vals}, {"key": json.dumps(key_src, sort_keys=True, default=str)})
        catalog.store_self_influence(project.db, {
            "key": key, "estimator": est.spec() if hasattr(est, "spec") else est.name, "settings": json.dumps(key_src, sort_keys=True, default=str),
            "factor_set_id": prepared.factor_set_id, "num_sequences": len(idx), "path": rel, "checksum": checksum,
            "seconds": time.perf_counter() - started,
        })
        if info is not None:
            info.update(cached=False, path=rel, created_at=None)
    return idx, vals.numpy()


def find_sequence(project: Project, seq_id: str) -> dict:
    """The ``sequences`` row of ``seq_id`` (``document id:chunk``), or of a document id whose
    document is one chunk; otherwise an error that says what ids look like."""
    row = catalog.sequence_by_id(project.db, seq_id)
    if row is not None:
        return row
    chunks = catalog.sequence_by_id(project.db, f"{seq_id}:0")
    if chunks is not None:
        if catalog.sequence_by_id(project.db, f"{seq_id}:1") is None:
            return chunks
        raise InflqError(f"document {seq_id!r} has several chunks; give one: {seq_id}:0, {seq_id}:1, …")
    raise InflqError(f"no training sequence {seq_id!r}; ids look like <document id>:<chunk> (see `inflq top`)")


@dataclass
class SequenceScore:
    """One sequence's score for one query of a result set, and its rank among the scored."""

    query_id: int
    score: float  # NaN: not a candidate of this query
    rank: int | None  # 1 = most positive; None when not scored
    scored: int  # how many sequences the result set scored for the query


def sequence_scores(project: Project, rs: dict, seq_idx: int) -> list[SequenceScore]:
    """A sequence's score and rank for every query a result set scored."""
    idx, sc = scores(project, rs)
    ids = json.loads(rs["settings"]).get("query_ids") or []
    where = np.flatnonzero(idx == seq_idx)
    out = []
    for qi, qid in enumerate(ids[: sc.shape[0]]):
        row = sc[qi]
        finite = np.isfinite(row)
        if not len(where) or not finite[where[0]]:
            out.append(SequenceScore(qid, float("nan"), None, int(finite.sum())))
            continue
        v = float(row[where[0]])
        out.append(SequenceScore(qid, v, int((row[finite] > v).sum()) + 1, int(finite.sum())))
    return out


@dataclass
class GroupShare:
    """One value of a metadata field, for one query: its share of the query's total positive
    influence, and of the sequences scored (the share it would get if influence were spread evenly)."""

    value: str
    share: float  # of the query's total positive influence (NaN when the query has none)
    positive: float  # the sum of this group's positive scores
    sequences: int  # sequences of this group that were scored
    sequence_share: float  # of all scored sequences


@dataclass
class FieldShares:
    """How one query's positive influence splits over the values of a metadata field."""

    query_id: int
    field: str
    total_positive: float
    scored: int
    groups: list[GroupShare]  # largest share first


def metadata_fields(project: Project) -> list[str]:
    """The corpus metadata fields :func:`influence_by` can group by (``source``, and the other fields
    of the corpus's records), sorted."""
    return catalog.metadata_fields(project.db)


def influence_by(project: Project, rs: dict, field_name: str, query_ids: list[int] | None = None) -> list[FieldShares]:
    """Each query's share of its total positive influence by the value of a corpus metadata field
    (``source``, or a field of the corpus's records, e.g. ``kind``), over the sequences the result
    set scored (with a candidate filter: its candidates only). Sequences without the field are
    grouped under ``""``. The API of ``inflq top --by FIELD`` and the TUI's Distribution tab."""
    known = catalog.metadata_fields(project.db)
    if field_name not in known and field_name not in ("doc_id",):
        raise InflqError(f"no sequence has a metadata field {field_name!r}; the corpus has {', '.join(known) or 'none'}")
    column = catalog.metadata_column(project.db, field_name)
    idx, sc = scores(project, rs)
    ids = json.loads(rs["settings"]).get("query_ids") or []
    values = column[idx]
    out = []
    for qid in query_ids if query_ids is not None else ids[: sc.shape[0]]:
        if qid not in ids:
            raise InflqError(f"query {qid} was not part of result set {rs['id']} (run {rs['run_id']}); run the investigation again to score it")
        row = sc[ids.index(qid)].astype(np.float64)
        finite = np.isfinite(row)
        pos = np.where(finite & (row > 0), row, 0.0)
        total = float(pos.sum())
        scored = int(finite.sum())
        groups = []
        for value in sorted(set(values[finite].tolist())):
            mask = finite & (values == value)
            part = float(pos[mask].sum())
            n = int(mask.sum())
            groups.append(GroupShare(str(value), part / total if total > 0 else float("nan"), part, n, n / scored if scored else float("nan")))
        groups.sort(key=lambda g: (-(g.positive), g.value))
        out.append(FieldShares(qid, field_name, total, scored, groups))
    return out
