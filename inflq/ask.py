"""One new question, answered exactly (issue 24): the gradient index picks, exact EK-FAC decides.

``inflq ask PROJECT PROMPT COMPLETION`` and the TUI's converging live query both go through
:class:`Asker`:

1. an *interactive* estimator (``Estimator.interactive``, the gradient index's ``index``) scores
   the question against every stored row, one matrix product with no pass over the corpus, and
   its top ``depth`` sequences (its bottom ``depth`` for the most negative) are the candidates;
2. the exact estimator (the registry's default, EK-FAC, with full-rank query gradients unless a
   rank is asked for) scores those candidates with its cached factors (fitted and cached first
   when none are), through the same :class:`inflq.ScorePass` a run uses, in blocks if the caller
   wants to show them as they come.

What the user reads are the exact scores of the candidates: the same numbers ``inflq run
--estimator ekfac --rank full`` computes for those sequences. What the index decides is which
sequences get scored, so the answer is the exact top of the candidates; how often that is the
exact top of the whole corpus is the index's recall at that depth (docs/gradient-index.md).

Nothing here writes to the project unless asked: :func:`save_answer` records the question as a
query of an investigation with its result set (``inflq ask --save -i INV``). The only other write
is the exact estimator's factors, fitted and cached when none are (``Asker.factors_cached`` says
so beforehand, so front ends can tell the user).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from . import catalog
from .errors import InflqError
from .plugins import get_registry
from .progress import Monitor

if TYPE_CHECKING:
    from .project import Project

# How deep the index's ranking is re-scored by default: this share of the corpus, and at least
# DEPTH_MIN sequences (all of a smaller corpus). Chosen from the budget curves in
# docs/gradient-index.md ("Choosing the default budget and depth").
DEPTH_SHARE = 0.05
DEPTH_MIN = 100


def default_depth(num_sequences: int) -> int:
    """The default number of candidates the index picks for exact re-scoring."""
    return int(min(num_sequences, max(DEPTH_MIN, math.ceil(DEPTH_SHARE * num_sequences))))


def interactive_estimator() -> str | None:
    """The name of a registered interactive estimator (the first by name), or None."""
    names = [n for n, cls in sorted(get_registry().all("estimator").items()) if getattr(cls, "interactive", False)]
    return names[0] if names else None


def query_dict(prompt: str, completion: str, chat: bool = False, measurement: str | None = None, alternative: str | None = None) -> dict:
    """A question as the catalog holds a query (without an id: it is not saved). ``measurement``:
    its measurement's spec (``None``: the default); ``alternative``: for one that compares."""
    from .measuring import default_measurement

    return {"id": None, "investigation_id": None, "position": None, "prompt": prompt, "completion": completion,
            "chat": int(bool(chat)), "tags": "[]", "notes": "", "created_at": None, "edited_at": None,
            "measurement": measurement or default_measurement(), "alternative": alternative or None}


@dataclass
class Answer:
    """The exact scores of one question's candidates.

    ``indices`` are the candidates in the order they were picked (the index's ranking, best first
    for the top; all sequences in corpus order with no index), ``scores`` and ``module_scores``
    (``[candidates, modules]``, ``modules`` order) their exact scores, ``preview`` their index scores."""

    query: dict
    indices: np.ndarray
    scores: np.ndarray
    module_scores: np.ndarray
    modules: list[str]
    layers: list[int | None]
    preview: np.ndarray | None
    depth: int
    num_sequences: int
    estimator: str
    index: str | None
    side: str = "top"
    fitted: bool = False
    seconds: dict[str, float] = field(default_factory=dict)

    def order(self, side: str = "top") -> np.ndarray:
        """Positions of the candidates by exact score, highest first (``bottom``: lowest first);
        ties in the order they were picked."""
        if side not in ("top", "bottom"):
            raise InflqError("side must be top or bottom")
        return np.argsort(-self.scores if side == "top" else self.scores, kind="stable")

    def layer_scores(self, pos: int) -> dict[str, float]:
        """The candidate's exact score by layer (modules outside a layer under their own name)."""
        out: dict[str, float] = {}
        for name, layer, v in zip(self.modules, self.layers, self.module_scores[pos], strict=True):
            key = str(layer) if layer is not None else name
            out[key] = out.get(key, 0.0) + float(v)
        return out


def answer_rows(project: Project, answer: Answer, k: int, side: str = "top", result_set_id: int | None = None) -> list[dict]:
    """The top (or bottom) ``k`` candidates as ``inflq top --json`` shows stored results (module and
    layer scores as objects, as :func:`inflq.reading.decoded` gives them)."""
    picks = answer.order(side)[: max(0, int(k))]
    seqs = catalog.sequence_rows(project.db, [int(answer.indices[p]) for p in picks])
    rows = []
    for rank, p in enumerate(picks, 1):
        idx = int(answer.indices[p])
        rows.append({
            "result_set_id": result_set_id, "query_id": answer.query.get("id"), "side": side, "rank": rank, "seq_idx": idx,
            "seq_id": seqs[idx]["seq_id"], "score": float(answer.scores[p]),
            "module_scores": dict(zip(answer.modules, map(float, answer.module_scores[p]), strict=True)),
            "layer_scores": answer.layer_scores(int(p)),
            "text": project.runtime.decode(project.runtime.corpus.get(idx)),
        })
    return rows


class Asker:
    """Answers new questions about one project; what it prepares (the index, the exact estimator
    with its factors, the last question's preconditioned gradient) is kept for the next one.
    Thread-safe: one computation at a time.

    ``estimator``: the exact estimator's spec (default: the registry's default, EK-FAC); ``index``:
    the interactive estimator's key (default: its newest complete index); ``rank``: the query
    gradients' rank (``None``: full rank, exact); ``fit_sequences`` and ``seed`` as for a run, to
    find the factors a run cached."""

    def __init__(self, project: Project, estimator: str | None = None, index: str | None = None, rank: int | None = None,
                 fit_sequences: int | None = None, seed: int | None = None, modules: str | None = None) -> None:
        from .settings import RunSettings

        self.project = project
        self.settings = RunSettings(estimator=estimator, rank=rank, fit_sequences=fit_sequences, modules=modules,
                                    seed=project.config.seed if seed is None else int(seed))
        self.settings.resolve_defaults(get_registry())
        self.index_key = index
        self.lock = threading.RLock()
        self._exact = None  # (estimator, engine)
        self._index = None  # the prepared interactive estimator
        self._index_parts = None  # its engine and run settings (what a ScoringContext needs)
        self._query: tuple[tuple, object] | None = None  # the last question and its preconditioned gradients
        self.fitted = False
        self.fit_seconds = 0.0

    # -- the two estimators ----------------------------------------------------------------------
    @property
    def estimator(self) -> str:
        return str(self.settings.estimator)

    def index_spec(self) -> str:
        name = interactive_estimator()
        if name is None:
            raise InflqError("no interactive estimator is installed (the gradient index plugin, inflq.index); ask with --no-index to score every sequence exactly")
        return name if self.index_key is None else f"{name}:key={self.index_key}"

    def _engine(self):
        return self.project.runtime.engine(self.settings.modules)

    def factors_cached(self) -> bool:
        """Whether the exact estimator's factors are cached (or it fits none): else the first
        exact score fits them, which takes a fitting run's time. Reads only."""
        from .runs import cached_factor_set, make_estimator

        if self._exact is not None:
            return True
        return cached_factor_set(self.project, make_estimator(self.estimator), self._engine(), self.settings) is not None

    def prepare_exact(self, monitor: Monitor | None = None):
        """The exact estimator with its factors (fitted and cached if none are): ``(estimator, engine)``."""
        from .runs import prepare_estimator

        with self.lock:
            if self._exact is None:
                self.project.require_model()
                cached = self.factors_cached()
                engine = self._engine()
                t = time.perf_counter()
                prepared = prepare_estimator(self.project, self.settings, monitor or Monitor(), engine=engine)
                self.settings.resolve_batching(engine, self.project)
                if not cached:
                    self.fitted, self.fit_seconds = True, time.perf_counter() - t
                self._exact = (prepared.estimator, engine)
            return self._exact

    def prepare_index(self, monitor: Monitor | None = None):
        """The interactive estimator, its index found and checked (an error says how to build one)."""
        from .runs import prepare_estimator
        from .settings import RunSettings

        with self.lock:
            if self._index is None:
                self.project.require_model()
                spec = self.index_spec()
                settings = RunSettings(estimator=spec, modules=self.settings.modules)
                try:
                    prepared = prepare_estimator(self.project, settings, monitor or Monitor())
                except InflqError as exc:
                    raise InflqError(f"{exc}; or ask with --no-index to score every sequence exactly") from None
                self._index, self._index_parts = prepared.estimator, (prepared.engine, settings)
            return self._index

    def index_context(self, queries: list[dict], indices: np.ndarray, monitor: Monitor | None = None):
        """The :class:`inflq.ScoringContext` the interactive estimator scores ``queries`` against the
        corpus sequences ``indices`` in (nothing committed: no run)."""
        from .runs import scoring_context

        est = self.prepare_index(monitor)
        engine, settings = self._index_parts
        return scoring_context(self.project, est, engine, queries, np.asarray(indices, dtype=np.int64), settings, monitor or Monitor())

    # -- scoring ---------------------------------------------------------------------------------
    def check_query(self, query: dict) -> None:
        """The question tokenizes, its completion is measurable and its measurement has what it
        needs (as ``query add`` checks)."""
        from .queries import check_query

        check_query(self.project.runtime, query)

    def preview(self, query: dict, monitor: Monitor | None = None) -> np.ndarray:
        """The interactive estimator's scores of every corpus sequence ``[sequences]`` (float64)."""
        est = self.prepare_index(monitor)
        n = len(self.project.runtime.corpus)
        with self.lock:
            out = est.score_candidates(self.index_context([query], np.arange(n, dtype=np.int64), monitor))
        return np.asarray(out, dtype=np.float64).reshape(-1)

    def _gradients(self, query: dict, monitor: Monitor | None):
        """The question's preconditioned gradient under the exact estimator (kept for the next block)."""
        from .runs import preconditioned_query_gradients, query_compression

        estimator, engine = self.prepare_exact(monitor)
        key = (query["prompt"], query["completion"], bool(query.get("chat")), query.get("measurement"), query.get("alternative"))
        if self._query is None or self._query[0] != key:
            compression = None if self.settings.rank is None else query_compression(self.settings, self.project.runtime.corpus.lengths(), estimator)
            qg = preconditioned_query_gradients(self.project, estimator, engine, [query], self.settings.batch_size, compression)
            self._query = (key, qg)
        return self._query[1]

    def exact(self, query: dict, indices: np.ndarray, monitor: Monitor | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Exact scores of the question against the corpus sequences ``indices`` (in that order):
        ``(scores [n] float64, module scores [n, modules] float64)``."""
        from .passes import ScorePass, Shard
        from .runs import LocalWorker

        indices = np.asarray(indices, dtype=np.int64)
        with self.lock:
            qg = self._gradients(query, monitor)
            _, engine = self._exact
            if not len(indices):
                return np.zeros(0), np.zeros((0, len(qg.names)))
            out = LocalWorker(self.project, engine).run(ScorePass(qg, per_module=True), Shard(0, indices), self.settings.batching(), monitor)
        return out["scores"].numpy()[:, 0].astype(np.float64), out["module_scores"].numpy()[:, 0, :].astype(np.float64)

    def modules(self) -> tuple[list[str], list[int | None]]:
        """The exact estimator's modules (in module-score order) and their layers."""
        with self.lock:
            qg = self._query[1] if self._query is not None else None
            _, engine = self.prepare_exact()
        names = list(qg.names) if qg is not None else list(engine.names)
        layer = {t.name: t.layer for t in engine.tracked}
        return names, [layer[n] for n in names]

    def ask(self, query: dict, depth: int | None = None, bottom: bool = False, use_index: bool = True, monitor: Monitor | None = None) -> Answer:
        """The question's candidates (the index's top ``depth``, its bottom with ``bottom``; every
        sequence without ``use_index``) scored exactly."""
        monitor = monitor or Monitor()
        self.check_query(query)
        n = len(self.project.runtime.corpus)
        seconds: dict[str, float] = {}
        preview = None
        if use_index:
            t = time.perf_counter()
            self.prepare_index(monitor)
            seconds["index load"] = time.perf_counter() - t
            t = time.perf_counter()
            scores = self.preview(query, monitor)
            depth = default_depth(n) if depth is None else int(depth)
            if depth < 1:
                raise InflqError("--depth must be at least 1")
            cand = pick(scores, depth, bottom)
            preview = scores[cand]
            seconds["index"] = time.perf_counter() - t
        else:
            cand = np.arange(n, dtype=np.int64)
        t = time.perf_counter()
        self.prepare_exact(monitor)
        seconds["factors"] = time.perf_counter() - t
        t = time.perf_counter()
        monitor.start("exact scores", len(cand))
        exact, parts = self.exact(query, cand, monitor)
        seconds["exact"] = time.perf_counter() - t
        names, layers = self.modules()
        return Answer(query, cand, exact, parts, names, layers, preview, len(cand), n, self.estimator,
                      self.index_spec() if use_index else None, "bottom" if bottom else "top", self.fitted, seconds)


def pick(scores: np.ndarray, depth: int, bottom: bool = False) -> np.ndarray:
    """The ``depth`` highest (``bottom``: lowest) of ``scores``, best first, ties by position."""
    scores = np.asarray(scores, dtype=np.float64)
    key = np.where(np.isfinite(scores), -scores if not bottom else scores, np.inf)
    depth = min(int(depth), len(scores))
    if depth < len(scores):
        part = np.argpartition(key, depth - 1)[:depth]
        return part[np.lexsort((part, key[part]))].astype(np.int64)
    return np.lexsort((np.arange(len(key)), key)).astype(np.int64)


def save_answer(project: Project, investigation: str, answer: Answer, asker: Asker, top_k: int = 20) -> tuple[int, int, int]:
    """Record the question as a query of ``investigation`` with its result set, as a run of the
    exact estimator over the index's candidates would (the run's filter spec names them):
    ``(query id, run id, result set id)``. ``inflq top -i INV --query ID`` then shows it."""
    import dataclasses

    import torch

    from .queries import add_query
    from .runs import Scorer, result_record, save_queries, start_run, store_result_set

    q = answer.query
    catalog.investigation(project.db, investigation)  # a missing investigation fails before any write
    estimator, engine = asker.prepare_exact()
    qg = asker._gradients(q, None)
    name = interactive_estimator()
    if answer.index is None:
        filter_spec = get_registry().default("filter")
    else:
        key = (asker.prepare_index().describe() or {}).get("key")
        has_filter = name in get_registry().all("filter")
        filter_spec = (f"{name}:k={answer.depth}" + (f",key={key}" if key else "") + (",side=bottom" if answer.side == "bottom" else "")
                       if has_filter else f"{name} {answer.side} {answer.depth}")
    settings = dataclasses.replace(asker.settings, filter=filter_spec, top_k=max(int(top_k), 1))
    qid = add_query(project, investigation, q["prompt"], q["completion"], chat=bool(q.get("chat")),
                    measurement=q.get("measurement"), alternative=q.get("alternative"))
    query_row = catalog.query(project.db, qid)
    run_id = start_run(project, investigation, settings)
    try:
        t = time.perf_counter()
        cand = np.sort(answer.indices)
        order = np.argsort(answer.indices, kind="stable")
        scores = answer.scores[order].astype(np.float32)[None, :]
        parts = torch.from_numpy(answer.module_scores[order].astype(np.float32))
        scorers = [Scorer(engine, qg)]
        saved = save_queries(project, run_id, scorers, settings.rank)
        # Every candidate's per-module scores are known: one "shard" holding them all, so that
        # the record's top and bottom need no second pass.
        kept = [(0, len(cand), lambda: {"extreme_query": torch.zeros(len(cand), dtype=torch.int64),
                                        "extreme_row": torch.arange(len(cand)), "extreme_modules": parts})]
        record = result_record(project, run_id, investigation, [query_row], settings, estimator, None, scorers, cand, scores, saved, Monitor(), kept=kept)
        rs_id = store_result_set(project, record)
        catalog.finish_run(project.db, run_id, "done", seconds=sum(answer.seconds.values()) + time.perf_counter() - t)
    except BaseException as exc:
        catalog.finish_run(project.db, run_id, "failed", error=str(exc) or type(exc).__name__)
        raise
    return qid, run_id, rs_id
