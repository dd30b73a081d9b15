"""Approximate top-k search through FAISS (``pip install 'inflq[faiss]'``), re-ranked exactly.

FAISS's inverted-file index with 8-bit scalar quantisation (``IndexIVFScalarQuantizer``, inner
product) over the stored rows, ``scale × rows[i]``, or for ``cosine`` over the rows divided by
``sqrt(self-influence)`` (the queries likewise), so that its inner product is the cosine in the
preconditioner's metric. It is built from the memory-mapped float16 shards block by block (a
training sample of rows for the coarse quantiser, then every block added; the rows are never
loaded whole: FAISS keeps ``width`` bytes a row) and cached beside the shards, in the index's
content-keyed folder (``faiss-<metric>-ivf<nlist>-sq8.index``): built once, reused by every later
search (and kept in memory by this process).

A search asks FAISS for ``refine × k`` candidates per query, probing ``nprobe`` of the ``nlist``
lists, then scores those candidates exactly (float32, from the stored rows) and keeps the best
``k``: the scores returned are the exact scan's own for the rows found; what can differ is which
rows are found (``recall``, measured by ``benchmarks/bench_index.py --faiss``). The lowest scores
(``largest=False``) are the highest of the negated queries.
"""

from __future__ import annotations

import math
import os
import threading
import warnings

import numpy as np
import torch

from ..errors import InflqError
from ..progress import Monitor
from .store import IndexStore

METRICS = ("inner", "cosine")
SEARCHES = ("exact", "faiss")
NPROBE = 32
REFINE = 4
_TRAIN_PER_LIST = 40  # FAISS warns below 39 training points per list
_MAX_TRAIN = 65536
_cache: dict[str, object] = {}
_lock = threading.Lock()


def require_faiss():
    """The ``faiss`` module, or a one-line error naming the extra."""
    try:
        import faiss
    except ImportError:
        raise InflqError("approximate search needs FAISS: pip install 'inflq[faiss]' (or search=exact)") from None
    return faiss


def check_search(search: str) -> None:
    if search not in SEARCHES:
        raise InflqError(f"unknown index search {search!r}; choose {', '.join(SEARCHES)}")


def default_nlist(num_rows: int) -> int:
    """``sqrt(n)`` lists (1,000 at a million rows: training and adding cost ``n·nlist·width``
    each), at most one per 40 rows (FAISS's training minimum), at least 1."""
    return max(1, min(int(math.sqrt(num_rows)), num_rows // _TRAIN_PER_LIST))


def _vectors(rows: np.ndarray, scale: np.ndarray, self_influence: np.ndarray, metric: str) -> np.ndarray:
    """The float32 vectors FAISS indexes for stored rows: ``scale × row``, for ``cosine`` divided
    by ``sqrt(self-influence)`` (widened by torch: numpy's float16 conversion is 10x slower)."""
    factor = np.asarray(scale, dtype=np.float32)
    if metric == "cosine":
        factor = factor / np.sqrt(np.maximum(np.asarray(self_influence, dtype=np.float32), np.finfo(np.float32).tiny))
    with warnings.catch_warnings():  # a read-only memory map; torch only reads it
        warnings.simplefilter("ignore", UserWarning)
        wide = torch.from_numpy(np.asarray(rows)).to(torch.float32)
    wide *= torch.from_numpy(np.ascontiguousarray(factor))[:, None]
    return wide.numpy()


def _train_sample(store: IndexStore, n: int, metric: str, block_rows: int) -> np.ndarray:
    """``n`` rows spread evenly over the index, gathered block by block."""
    want = np.unique(np.linspace(0, store.num_rows - 1, n).astype(np.int64))
    parts = []
    for b in store.blocks(block_rows):
        lo, hi = np.searchsorted(want, [b.start, b.start + len(b.indices)])
        if lo < hi:
            local = want[lo:hi] - b.start
            parts.append(_vectors(np.asarray(b.rows[local]), b.scale[local], b.self_influence[local], metric))
    return np.concatenate(parts)


def faiss_path(store: IndexStore, metric: str, nlist: int) -> os.PathLike:
    return store.path / f"faiss-{metric}-ivf{nlist}-sq8.index"


def faiss_index(store: IndexStore, metric: str = "inner", nlist: int | None = None, block_rows: int = 8192, monitor: Monitor | None = None):
    """The FAISS index of ``store``'s rows for ``metric``: from this process's memory, else from
    its file beside the shards, else built (progress as the ``faiss`` phase; cancellable between
    blocks) and written there atomically."""
    faiss = require_faiss()
    if metric not in METRICS:
        raise InflqError(f"unknown index metric {metric!r}; choose {', '.join(METRICS)}")
    nlist = int(nlist or default_nlist(store.num_rows))
    if nlist < 1 or nlist > store.num_rows:
        raise InflqError(f"nlist must be between 1 and the index's {store.num_rows} rows, not {nlist}")
    path = faiss_path(store, metric, nlist)
    with _lock:
        cached = _cache.get(str(path))
        if cached is not None:
            return cached
        index = None
        if path.exists():
            try:
                index = faiss.read_index(str(path))
            except RuntimeError:  # a damaged cache file: built again below
                path.unlink()
        if index is None:
            monitor = monitor or Monitor()
            monitor.start("faiss", store.num_rows, f"building a FAISS index ({nlist} lists) over {store.num_rows:,} rows")
            quantizer = faiss.IndexFlatIP(store.width)
            index = faiss.IndexIVFScalarQuantizer(quantizer, store.width, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
            index.train(_train_sample(store, min(store.num_rows, max(_TRAIN_PER_LIST * nlist, 4096), _MAX_TRAIN), metric, block_rows))
            for b in store.blocks(block_rows):
                monitor.check()
                index.add(_vectors(b.rows, b.scale, b.self_influence, metric))
                monitor.advance(len(b.indices))
            tmp = path.with_name(path.name + ".tmp")
            faiss.write_index(index, str(tmp))
            os.replace(tmp, path)
        _cache[str(path)] = index
        return index


def faiss_top_k(
    store: IndexStore, queries, k: int, metric: str = "inner", largest: bool = True, nprobe: int = NPROBE, refine: int = REFINE,
    nlist: int | None = None, block_rows: int = 8192, monitor: Monitor | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """As :func:`inflq.index.top_k`, through FAISS: each query's ``refine × k`` approximate
    candidates (``nprobe`` lists probed), scored exactly, the best ``k`` kept; ``(scores [nq, k]
    float32, corpus indices [nq, k] int64)``, best first. A query with fewer than ``k`` rows found
    in its probed lists is padded with ``-inf`` (``+inf`` for the lowest) and index ``-1``."""
    if nprobe < 1 or refine < 1:
        raise InflqError("FAISS search needs nprobe >= 1 and refine >= 1")
    index = faiss_index(store, metric, nlist, block_rows, monitor)
    index.nprobe = min(int(nprobe), index.nlist)
    q = queries.vectors.to(torch.float32)
    if metric == "cosine":
        q = q / torch.sqrt(queries.self_influence.clamp_min(torch.finfo(torch.float32).tiny))[:, None]
    sign = 1.0 if largest else -1.0
    _, found = index.search(np.ascontiguousarray((sign * q).numpy()), min(store.num_rows, k * refine))
    pad = -np.inf if largest else np.inf
    values = np.full((q.shape[0], k), pad, dtype=np.float32)
    which = np.full((q.shape[0], k), -1, dtype=np.int64)
    union = np.unique(found[found >= 0])  # every query's candidates read once, scored by all queries at once
    if len(union) == 0:
        return values, which
    rows, scale, self_inf = store.rows_at(union)
    exact = (q @ torch.from_numpy(_vectors(rows, scale, self_inf, metric)).T).numpy()  # [nq, len(union)]
    for j in range(q.shape[0]):
        cols = np.searchsorted(union, np.unique(found[j][found[j] >= 0]))
        if len(cols) == 0:
            continue
        s = exact[j, cols]
        order = np.argsort(-sign * s, kind="stable")[:k]
        values[j, : len(order)] = s[order]
        which[j, : len(order)] = store.indices[union[cols[order]]]
    return values, which
