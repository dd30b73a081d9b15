"""Answering queries from an index: project, precondition, then one blocked GEMM over the rows.

A query's row is captured exactly as a training row is (same projections, the measurement's loss
``-log p(completion | prompt)`` on the completion tokens), then preconditioned by the damped
projected inverse. Its score against stored row ``r`` is ``⟨(G' + λI)⁻¹ q', r⟩``: positive when the
training sequence makes the completion more likely, as inflq's scores are. ``cosine`` divides by
``sqrt(q'ᵀ(G' + λI)⁻¹q' · rᵀ(G' + λI)⁻¹r)``: the cosine in the preconditioner's metric (the rows'
self-influences are stored at the damping of the build).

Rows are read memory-mapped, ``block_rows`` at a time, and multiplied by all queries at once;
only each query's running top-k (or the requested columns) is kept. The product runs in float16
on the stored rows as they are (queries scaled to at most 1 in magnitude, so that no product of
``width <= 32768`` terms overflows): widening every block to float32 first moved 3x the bytes and
took as long as the product itself. The scores' rounding is then float16's, ``~5e-4`` of the
largest, as the rows' own storage is; ``precise=True`` widens the rows and multiplies in float32.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..engine import GradientEngine, make_batch, measurement_batches
from ..errors import InflqError
from .approx import METRICS, NPROBE, REFINE, check_search, faiss_top_k
from .fit import IndexModel
from .store import Block, IndexStore

if TYPE_CHECKING:
    from ..base import MeasurementTerm

HALF_WIDTH = 32768  # widest rows multiplied in float16: |scaled query · row| <= width < 65504


@dataclass
class PreparedQueries:
    """Preconditioned projected query gradients ``[nq, width]`` and ``q'ᵀ (G' + λI)⁻¹ q'`` ``[nq]``."""

    vectors: torch.Tensor
    self_influence: torch.Tensor
    _half: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def num_queries(self) -> int:
        return int(self.vectors.shape[0])

    def half(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The vectors divided by their largest magnitude, in float16, and those magnitudes."""
        if self._half is None:
            scale = self.vectors.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
            self._half = ((self.vectors / scale[:, None]).to(torch.float16), scale)
        return self._half


def query_rows(
    model: IndexModel,
    engine: GradientEngine,
    tokens: Sequence[np.ndarray],
    completion_starts: Sequence[int],
    pad_id: int,
    batch_size: int = 8,
) -> torch.Tensor:
    """Projected gradients ``[nq, width]`` of each query's ``-log p(completion | prompt)``
    (completion tokens only), captured and projected token by token like the rows."""
    parts = []
    for s in range(0, len(tokens), max(1, batch_size)):
        batch = make_batch(list(tokens[s : s + batch_size]), pad_id, engine.device, loss_from=list(completion_starts[s : s + batch_size]))
        captures, _ = engine.capture(batch, "data")
        parts.append(model.rows_from_captures(captures).cpu())
    return torch.cat(parts)


def measured_rows(model: IndexModel, engine: GradientEngine, measured: Sequence[Sequence[MeasurementTerm]], pad_id: int, batch_size: int = 8) -> torch.Tensor:
    """Projected gradients ``[nq, width]`` of each query's measurement loss (``measured[q]``: its
    :class:`inflq.MeasurementTerm` s), the batches of :func:`inflq.engine.measurement_batches`: a
    row is linear in its sequence's token captures, so a query's row is the sum of its terms' rows."""
    parts = []
    for batch, groups in measurement_batches(measured, pad_id, engine.device, batch_size):
        captures, _ = engine.capture(batch, "data")
        rows = model.rows_from_captures(captures).cpu()
        parts.append(torch.stack([rows[g].sum(dim=0) for g in groups]) if any(len(g) > 1 for g in groups) else rows)
    return torch.cat(parts)


def prepare(model: IndexModel, rows: torch.Tensor) -> PreparedQueries:
    """Precondition projected query rows (from :func:`query_rows` or :meth:`IndexModel.rows_from_dense`)."""
    rows = rows.to("cpu", torch.float32)
    pre = model.precondition(rows)
    return PreparedQueries(pre, (pre * rows).sum(dim=1))


def _tensor(rows: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():  # a read-only memory map; torch only reads it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(rows)


def block_scores(queries: PreparedQueries, block: Block, metric: str = "inner", precise: bool = False) -> torch.Tensor:
    """Scores ``[nq, len(block)]`` of the queries against one block of rows (float32)."""
    if metric not in METRICS:
        raise InflqError(f"unknown index metric {metric!r}; choose {', '.join(METRICS)}")
    rows = _tensor(block.rows)
    if precise or rows.shape[1] > HALF_WIDTH:
        s = queries.vectors @ rows.to(torch.float32).T
    else:
        vectors, qscale = queries.half()
        s = (vectors @ rows.T).to(torch.float32)
        s *= qscale[:, None]
    s *= torch.from_numpy(np.ascontiguousarray(block.scale))[None, :]
    if metric == "cosine":
        norms = torch.sqrt(queries.self_influence.clamp_min(0))[:, None] * torch.sqrt(torch.from_numpy(np.ascontiguousarray(block.self_influence)).clamp_min(0))[None, :]
        s /= norms.clamp_min(torch.finfo(torch.float32).tiny)
    return s


def _check(store: IndexStore, queries: PreparedQueries) -> None:
    if queries.vectors.shape[1] != store.width:
        raise InflqError(f"queries of width {queries.vectors.shape[1]} against an index of width {store.width}")


def scores(
    store: IndexStore, queries: PreparedQueries, metric: str = "inner", indices: np.ndarray | None = None, block_rows: int = 8192,
    precise: bool = False,
) -> np.ndarray:
    """Scores ``[nq, n]`` (float32) against every stored row in corpus order, or against the rows
    of the sorted corpus ``indices`` (all of which the index must cover)."""
    _check(store, queries)
    if indices is not None and len(indices) == store.num_rows and np.array_equal(indices, store.indices):
        indices = None  # every row, in order: the plain scan, without copying each block's rows
    if indices is None:
        out = np.empty((queries.num_queries, store.num_rows), dtype=np.float32)
        for b in store.blocks(block_rows):
            out[:, b.start : b.start + len(b.indices)] = block_scores(queries, b, metric, precise).numpy()
        return out
    indices = np.asarray(indices, dtype=np.int64)
    pos = np.searchsorted(store.indices, indices)
    if np.any(pos >= store.num_rows) or np.any(store.indices[np.minimum(pos, store.num_rows - 1)] != indices):
        raise InflqError("the index does not cover every requested sequence; build it over the whole corpus")
    out = np.empty((queries.num_queries, len(indices)), dtype=np.float32)
    for b in store.blocks(block_rows):
        lo, hi = np.searchsorted(pos, [b.start, b.start + len(b.indices)])
        if lo == hi:
            continue
        local = pos[lo:hi] - b.start
        picked = Block(b.start, b.indices[local], np.asarray(b.rows[local]), b.scale[local], b.self_influence[local])
        out[:, lo:hi] = block_scores(queries, picked, metric, precise).numpy()
    return out


def top_k(
    store: IndexStore, queries: PreparedQueries, k: int, metric: str = "inner", block_rows: int = 8192, largest: bool = True,
    precise: bool = False, search: str = "exact", nprobe: int = NPROBE, refine: int = REFINE, nlist: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Each query's ``k`` highest (``largest=False``: lowest) scores over the whole index, best
    first: ``(scores [nq, k] float32, corpus indices [nq, k] int64)``. ``search="faiss"``: through
    an approximate FAISS index instead of the exact scan (:mod:`inflq.index.approx`: ``nprobe``,
    ``refine``, ``nlist``; the candidates it finds are scored exactly)."""
    _check(store, queries)
    check_search(search)
    k = min(int(k), store.num_rows)
    if k <= 0:
        raise InflqError("top_k needs k >= 1")
    if search == "faiss":
        return faiss_top_k(store, queries, k, metric, largest, nprobe, refine, nlist, block_rows)
    best_v: torch.Tensor | None = None
    best_i: torch.Tensor | None = None
    for b in store.blocks(block_rows):
        s = block_scores(queries, b, metric, precise)
        v, i = torch.topk(s, min(k, s.shape[1]), dim=1, largest=largest)
        i = torch.from_numpy(b.indices)[i]
        if best_v is not None:
            v, i = torch.cat([best_v, v], dim=1), torch.cat([best_i, i], dim=1)
            v, j = torch.topk(v, min(k, v.shape[1]), dim=1, largest=largest)
            i = torch.gather(i, 1, j)
        best_v, best_i = v, i
    return best_v.numpy(), best_i.numpy()


def candidates(
    store: IndexStore, queries: PreparedQueries, k: int, metric: str = "inner", block_rows: int = 8192, search: str = "exact",
    nprobe: int = NPROBE, largest: bool = True,
) -> list[np.ndarray]:
    """Each query's top-``k`` corpus indices (``largest=False``: its lowest ``k``), sorted (what
    :meth:`inflq.Filter.candidates` returns): the index as a candidate filter for an exact
    estimator (``search="faiss"``: approximately)."""
    _, which = top_k(store, queries, k, metric, block_rows, largest=largest, search=search, nprobe=nprobe)
    return [np.sort(row[row >= 0]) for row in which]


def self_influences(store: IndexStore, block_rows: int = 65536) -> np.ndarray:
    """Every stored row's ``rowᵀ (G' + λI)⁻¹ row`` (at the damping of the build), in row order."""
    return np.concatenate([b.self_influence for b in store.blocks(block_rows)]).astype(np.float32)
