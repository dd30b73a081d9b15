"""A query answered while it is typed (the TUI's live query, issue 16).

An *interactive* estimator (``Estimator.interactive``: it scores a new query without a pass over the
corpus, e.g. ``index``, from a stored gradient index) gives the top sequences of an unsaved query in
well under a second; :meth:`LiveScorer.exact` then re-scores those few sequences with the exact
estimator (the registry's default, EK-FAC), its factors cached as a run would cache them.
"""

from __future__ import annotations

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


@dataclass
class LiveProbe:
    """A probe scored against the live query: its score on the index rows' scale and its rank
    among them (1 + the number of corpus sequences scoring higher)."""

    id: int
    query_id: int
    label: str
    text: str
    score: float
    rank: int


@dataclass
class LiveTop:
    estimator: str
    indices: np.ndarray  # corpus indices, best first
    scores: np.ndarray
    seq_ids: list[str]
    texts: list[str]
    seconds: float
    probes: list[LiveProbe] = field(default_factory=list)  # best first
    num_rows: int = 0


def interactive_estimator() -> str | None:
    """The name of a registered interactive estimator (the first by name), or None."""
    names = [n for n, cls in sorted(get_registry().all("estimator").items()) if getattr(cls, "interactive", False)]
    return names[0] if names else None


class LiveScorer:
    """Scores unsaved queries of one project; what it prepares (an estimator with its factors or
    index, the engine) is kept for the next keystroke. Thread-safe: one query at a time."""

    def __init__(self, project: Project) -> None:
        self.project = project
        self._prepared: dict[str | None, object] = {}
        self._lock = threading.Lock()
        self._tokens: dict[str, np.ndarray] = {}

    def _prepare(self, estimator: str | None):
        from .runs import RunSettings, prepare_estimator

        if estimator not in self._prepared:
            settings = RunSettings(estimator=estimator)
            prepared = prepare_estimator(self.project, settings, Monitor())
            settings.resolve_batching(prepared.engine, self.project)
            self._prepared[estimator] = (prepared, settings)
        return self._prepared[estimator]

    def top(self, prompt: str, completion: str, k: int = 5, probes: list[dict] | None = None) -> LiveTop | None:
        """The interactive estimator's top ``k`` sequences for the query; None when no interactive
        estimator is registered or it cannot serve this project (e.g. no index built yet).
        ``probes`` (catalog rows: ``id``, ``query_id``, ``text``, ``label``) are scored too, where
        the estimator offers :meth:`inflq.Estimator.score_sequences`, and ranked among the corpus."""
        name = interactive_estimator()
        if name is None or not prompt.strip() or not completion.strip():
            return None
        from .runs import scoring_context

        t0 = time.perf_counter()
        with self._lock:
            try:
                prepared, settings = self._prepare(name)
                n = len(self.project.runtime.corpus)
                query = {"prompt": prompt, "completion": completion, "chat": 0}
                ctx = scoring_context(self.project, prepared.estimator, prepared.engine, [query], np.arange(n, dtype=np.int64), settings, Monitor())
                scores = prepared.estimator.score_candidates(ctx)
                probe_scores = None
                if scores is not None and probes:
                    tokens = [self._probe_tokens(p["text"]) for p in probes]
                    probe_scores = prepared.estimator.score_sequences(self.project, [query], tokens, Monitor())
            except InflqError:
                return None
        if scores is None:
            return None
        row = np.asarray(scores, dtype=np.float64).reshape(-1)
        finite = np.where(np.isfinite(row), row, -np.inf)
        best = np.argsort(-finite, kind="stable")[:k]
        rows = catalog.sequence_rows(self.project.db, [int(i) for i in best])
        texts = [self.project.runtime.decode(self.project.runtime.corpus.get(int(i))) for i in best]
        scored = []
        if probe_scores is not None:
            ranked = np.sort(finite)
            for p, s in zip(probes, np.asarray(probe_scores, dtype=np.float64).reshape(-1), strict=True):
                rank = 1 + int(len(ranked) - np.searchsorted(ranked, s, side="right"))
                scored.append(LiveProbe(int(p["id"]), int(p["query_id"]), p.get("label") or "", p["text"], float(s), rank))
            scored.sort(key=lambda p: -p.score)
        return LiveTop(name, best, row[best], [rows[int(i)]["seq_id"] for i in best], texts, time.perf_counter() - t0, scored, n)

    def _probe_tokens(self, text: str) -> np.ndarray:
        """A probe's tokens as a training sequence's (kept: probes are re-scored at every keystroke)."""
        if text not in self._tokens:
            self._tokens[text] = self.project.runtime.tokenize_sequence(text)
        return self._tokens[text]

    def exact(self, prompt: str, completion: str, indices: np.ndarray, estimator: str | None = None) -> np.ndarray:
        """Exact scores of the query against ``indices`` with ``estimator`` (default: the registry's
        default estimator), fitting its factors first if none are cached."""
        from .passes import ScorePass, Shard
        from .runs import LocalWorker, preconditioned_queries, query_gradients

        with self._lock:
            prepared, settings = self._prepare(estimator)
            grads = query_gradients(self.project, prepared.engine, [{"prompt": prompt, "completion": completion, "chat": 0}], None)
            qg = preconditioned_queries(prepared.estimator, grads, None)
            out = LocalWorker(self.project, prepared.engine).run(
                ScorePass(qg), Shard(0, np.sort(np.asarray(indices, dtype=np.int64))), settings.batching(), Monitor())
        order = np.argsort(np.argsort(np.asarray(indices)))  # back from sorted order to the caller's
        return out["scores"].numpy()[:, 0].astype(np.float64)[order]
