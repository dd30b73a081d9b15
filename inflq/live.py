"""A query answered while it is typed (the TUI's live query, issues 16 and 24).

An *interactive* estimator (``Estimator.interactive``: it scores a new query without a pass over the
corpus, e.g. ``index``, from a stored gradient index) ranks every sequence for an unsaved query in
well under a second: the preview. The exact estimator (the registry's default, EK-FAC, its factors
cached as a run would cache them) then re-scores the preview's top candidates block by block
(:meth:`LiveScorer.exact_parts`), so that a front end can show the list converging to the exact
top of the candidates and stop between blocks when the query changes. Both go through
:class:`inflq.ask.Asker`, the engine of ``inflq ask``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from . import catalog
from .ask import Asker, default_depth, interactive_estimator, pick
from .errors import InflqError
from .progress import Monitor

if TYPE_CHECKING:
    from .project import Project

__all__ = ["LiveProbe", "LiveScorer", "LiveTop", "interactive_estimator"]

RANKED = 16  # the preview ranks this many times the default depth at once (re-scoring deeper rarely needs more)


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
    """The preview of a live query: its top ``k`` by the interactive estimator, and the ranking the
    exact re-scoring follows (``ranking``: every corpus index, best first; ``row``: the preview
    score of every corpus sequence, in corpus order)."""

    estimator: str
    indices: np.ndarray  # corpus indices, best first
    scores: np.ndarray
    seq_ids: list[str]
    texts: list[str]
    seconds: float
    probes: list[LiveProbe] = field(default_factory=list)  # best first
    num_rows: int = 0
    ranking: np.ndarray | None = None
    row: np.ndarray | None = None

    def candidates(self, depth: int) -> np.ndarray:
        """The preview's top ``depth`` corpus indices, best first."""
        assert self.ranking is not None and self.row is not None
        if int(depth) > len(self.ranking) and len(self.ranking) < len(self.row):
            self.ranking = pick(self.row, int(depth))
        return self.ranking[: int(depth)]


def _query(prompt: str, completion: str, measurement: str | None, alternative: str | None) -> dict:
    """An unsaved query as the scorers read one."""
    return {"prompt": prompt, "completion": completion, "chat": 0, "measurement": measurement, "alternative": alternative or None}


class LiveScorer:
    """Scores unsaved queries of one project; what it prepares (an estimator with its factors or
    index, the engine) is kept for the next keystroke. Thread-safe: one computation at a time."""

    def __init__(self, project: Project) -> None:
        self.project = project
        self.asker = Asker(project)
        self._tokens: dict[str, np.ndarray] = {}
        self._texts: dict[int, tuple[str, str]] = {}

    @property
    def lock(self):
        return self.asker.lock

    def default_depth(self) -> int:
        return default_depth(len(self.project.runtime.corpus))

    def top(
        self, prompt: str, completion: str, k: int = 5, probes: list[dict] | None = None, measurement: str | None = None, alternative: str | None = None
    ) -> LiveTop | None:
        """The interactive estimator's top ``k`` sequences for the query (and its whole ranking, for
        the exact re-scoring); None when no interactive estimator is registered or it cannot serve
        this project (e.g. no index built yet). ``probes`` (catalog rows: ``id``, ``query_id``,
        ``text``, ``label``) are scored too, where the estimator offers
        :meth:`inflq.Estimator.score_sequences`, and ranked among the corpus. ``measurement``,
        ``alternative``: what the query measures (default: the registry's measurement)."""
        name = interactive_estimator()
        if name is None or not prompt.strip() or not completion.strip():
            return None
        t0 = time.perf_counter()
        query = _query(prompt, completion, measurement, alternative)
        with self.lock:
            try:
                row = self.asker.preview(query)
                probe_scores = None
                if probes:
                    tokens = [self._probe_tokens(p["text"]) for p in probes]
                    probe_scores = self.asker.prepare_index().score_sequences(self.project, [query], tokens, Monitor())
            except InflqError:
                return None
        ranking = pick(row, max(k, RANKED * default_depth(len(row))))  # deeper on demand: LiveTop.candidates
        best = ranking[:k]
        seq_ids, texts = self.describe(best)
        scored = []
        if probe_scores is not None:
            ranked = np.sort(np.where(np.isfinite(row), row, -np.inf))
            for p, s in zip(probes, np.asarray(probe_scores, dtype=np.float64).reshape(-1), strict=True):
                rank = 1 + int(len(ranked) - np.searchsorted(ranked, s, side="right"))
                scored.append(LiveProbe(int(p["id"]), int(p["query_id"]), p.get("label") or "", p["text"], float(s), rank))
            scored.sort(key=lambda p: -p.score)
        return LiveTop(name, best, row[best], seq_ids, texts, time.perf_counter() - t0, scored, len(row), ranking, row)

    def describe(self, indices) -> tuple[list[str], list[str]]:
        """The sequence ids and texts of corpus ``indices`` (kept: the same rows come back often)."""
        todo = [int(i) for i in indices if int(i) not in self._texts]
        if todo:
            rows = catalog.sequence_rows(self.project.db, todo)
            for i in todo:
                self._texts[i] = (rows[i]["seq_id"], self.project.runtime.decode(self.project.runtime.corpus.get(i)))
        return [self._texts[int(i)][0] for i in indices], [self._texts[int(i)][1] for i in indices]

    def _probe_tokens(self, text: str) -> np.ndarray:
        """A probe's tokens as a training sequence's (kept: probes are re-scored at every keystroke)."""
        if text not in self._tokens:
            self._tokens[text] = self.project.runtime.tokenize_sequence(text)
        return self._tokens[text]

    def factors_cached(self) -> bool:
        return self.asker.factors_cached()

    def exact_parts(
        self, prompt: str, completion: str, indices: np.ndarray, measurement: str | None = None, alternative: str | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact scores of the query against corpus ``indices`` (in that order) with the exact
        estimator (fitting its factors first if none are cached), and their per-module scores
        ``[n, modules]`` (:meth:`modules` names them and their layers)."""
        return self.asker.exact(_query(prompt, completion, measurement, alternative), indices)

    def exact(
        self, prompt: str, completion: str, indices: np.ndarray, estimator: str | None = None, measurement: str | None = None,
        alternative: str | None = None,
    ) -> np.ndarray:
        """Exact scores of the query against ``indices`` (default estimator: the registry's
        default), fitting its factors first if none are cached."""
        if estimator is not None and estimator != self.asker.estimator:
            return Asker(self.project, estimator).exact(_query(prompt, completion, measurement, alternative), indices)[0]
        return self.exact_parts(prompt, completion, indices, measurement, alternative)[0]

    def modules(self) -> tuple[list[str], list[int | None]]:
        return self.asker.modules()
