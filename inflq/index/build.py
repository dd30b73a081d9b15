"""Building an index: one capture pass over the sequences, rows committed shard by shard.

The rows pass (:class:`RowPass`) is an ordinary concatenating :class:`inflq.Pass` over the
engine's captures with the data's own labels (each sequence's training loss): any executor runs
it. :func:`build_index` commits every shard as it arrives and skips the shards an earlier,
interrupted build committed; progress and cancellation go through the :class:`inflq.Monitor`
(a cancel lands within one batch; committed shards stay).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..base import FitContext, Pass, Shard
from ..engine import GradientEngine
from ..errors import InflqError
from ..passes import combine_results, make_shards, run_shard
from ..progress import Monitor
from .fit import IndexModel
from .store import IndexStore

# map_shards(pass_, shards, on_result, monitor): run a pass over shards, calling on_result(shard,
# tensors) as each finishes (an executor's ``map`` with its job bound).
MapShards = Callable[[Pass, list[Shard], Callable[[Shard, dict[str, torch.Tensor]], None], Monitor], None]


class RowPass(Pass):
    """Per sequence its row ``Σ_t (P_S g_t)(P_A ā_t)ᵀ`` per module (``rows [B, width]``) and
    self-influence ``rowᵀ (G' + λI)⁻¹ row`` (``self [B]``), with the training loss's labels."""

    phase = "index"
    labels = "data"
    combine = "concat"
    transient_captures = True  # rows are projections of the captures, computed before the next batch

    def __init__(self, model: IndexModel) -> None:
        self.model = model

    def process(self, engine, batch, captures):
        rows = self.model.rows_from_captures(captures)
        return {"rows": rows, "self": self.model.self_influence(rows)}


def local_map(engine: GradientEngine, sequences: Callable[[np.ndarray], list], pad_id: int, batch_size) -> MapShards:
    """Shards run one after another in this process (what the local executor does)."""

    def run(pass_: Pass, shards: list[Shard], on_result, monitor: Monitor) -> None:
        for shard in shards:
            on_result(shard, run_shard(engine, sequences, pass_, shard, pad_id, batch_size, monitor))

    return run


def local_fit_context(
    engine: GradientEngine,
    sequences: Callable[[np.ndarray], list],
    indices: np.ndarray,
    pad_id: int,
    seed: int = 0,
    batch_size=8,
    shard_size: int = 256,
    monitor: Monitor | None = None,
) -> FitContext:
    """A :class:`inflq.FitContext` over ``indices`` that runs passes in this process, seeding
    sampled labels as a project's fit does: for scripts, tests and benchmarks without a project
    (index fits and estimators' fits alike)."""
    monitor = monitor or Monitor()
    indices = np.asarray(indices, dtype=np.int64)

    def run_pass(pass_: Pass) -> dict[str, torch.Tensor]:
        pass_.seed = seed
        monitor.start(pass_.phase, len(indices))
        if pass_.combine == "sum":
            total: dict[str, torch.Tensor] = {}
            for shard in make_shards(indices, shard_size):
                run_shard(engine, sequences, pass_, shard, pad_id, batch_size, monitor, into=total)
            return total
        parts = [run_shard(engine, sequences, pass_, s, pad_id, batch_size, monitor) for s in make_shards(indices, shard_size)]
        return combine_results(pass_.combine, parts)

    return FitContext(engine, run_pass, len(indices), seed, monitor, indices=indices, sequences=sequences, pad_id=pad_id)


def build_index(
    root: Path,
    key: str,
    model: IndexModel,
    indices: np.ndarray,
    map_shards: MapShards,
    monitor: Monitor | None = None,
    shard_size: int = 4096,
    source: dict | None = None,
) -> IndexStore:
    """Write the rows of ``indices`` (sorted corpus indices) into the index folder ``key`` under
    ``root``, resuming an interrupted build of the same key: shards already committed are skipped.
    ``map_shards`` runs :class:`RowPass` over the remaining shards (:func:`local_map`, or an
    executor's ``map``). Returns the store, complete."""
    monitor = monitor or Monitor()
    indices = np.asarray(indices, dtype=np.int64)
    if len(indices) == 0:
        raise InflqError("no sequences to index")
    if np.any(np.diff(indices) <= 0):
        raise InflqError("index rows must cover sorted, distinct corpus indices")
    store = IndexStore.create(root, key, model, indices, shard_size, source)
    shards = make_shards(indices, shard_size)
    done = store.committed()
    monitor.start("index", len(indices))
    monitor.advance(sum(len(shards[i]) for i in done))

    def on_result(shard: Shard, out: dict[str, torch.Tensor]) -> None:
        store.commit(shard.index, out["rows"], out["self"])

    map_shards(RowPass(model), [s for s in shards if s.index not in done], on_result, monitor)
    if not store.complete:
        raise InflqError(f"the executor returned {len(store.committed())} of {store.num_shards} index shards; build again to resume")
    return store
