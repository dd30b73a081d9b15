"""Passes: streamed loops over training sequences, the unit of work that executors distribute.

A pass turns one batch of captures into tensors. Results over a shard are combined by summing
(factor statistics) or concatenating (per-sequence scores); executors reduce shards the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

from .engine import Batch, Captured, GradientEngine, make_batch
from .errors import InflqError
from .progress import Monitor

if TYPE_CHECKING:
    from .base import Estimator
    from .scoring import QueryGradients


@dataclass(frozen=True)
class Shard:
    """A numbered slice of the sequences a pass visits (indices into the corpus)."""

    index: int
    indices: np.ndarray

    def __len__(self) -> int:
        return int(len(self.indices))


def make_shards(indices: np.ndarray, shard_size: int) -> list[Shard]:
    indices = np.asarray(indices, dtype=np.int64)
    return [Shard(i, indices[s : s + shard_size]) for i, s in enumerate(range(0, len(indices), shard_size))]


class Pass:
    """One streamed pass. Subclasses set ``phase``, ``labels``, ``combine`` and implement ``process``."""

    phase: ClassVar[str] = "pass"
    labels: ClassVar[str] = "data"  # "data" or "sampled"
    combine: ClassVar[str] = "sum"  # "sum" or "concat"
    seed: int = 0

    def process(self, engine: GradientEngine, batch: Batch, captures: dict[str, Captured]) -> dict[str, torch.Tensor]:
        """Results for this batch, or (passes that group work across batches) ``{}`` and later
        results from :meth:`flush`; concatenated results must come out in batch order."""
        raise NotImplementedError

    def flush(self, discard: bool = False) -> dict[str, torch.Tensor]:
        """Results held back by :meth:`process` (called at the end of every shard); ``discard``
        drops them (called at the start of a shard, after a failure elsewhere)."""
        return {}


def combine_results(kind: str, parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Reduce per-batch (or per-shard) results: elementwise sum, or concatenation along dim 0."""
    if not parts:
        return {}
    if kind == "sum":
        out = {k: v.clone() for k, v in parts[0].items()}
        for p in parts[1:]:
            for k, v in p.items():
                out[k] += v
        return out
    return {k: torch.cat([p[k] for p in parts], dim=0) for k in parts[0]}


def sequence_seed(seed: int, phase: str, index: int) -> int:
    """A per-sequence seed for sampled labels, independent of batching and sharding."""
    h = (int(seed) * 1_000_003 + sum(map(ord, phase)) * 7919 + int(index)) & 0x7FFFFFFFFFFFFFFF
    return h


def run_shard(
    engine: GradientEngine,
    sequences: callable,
    pass_: Pass,
    shard: Shard,
    pad_id: int,
    batch_size: int,
    monitor: Monitor | None = None,
) -> dict[str, torch.Tensor]:
    """Run ``pass_`` over one shard in batches. ``sequences(indices)`` returns token arrays.

    Sequences are batched in order of length (stable, so deterministic), which keeps padding, and
    the compute spent on it, small; concatenated results come back in the shard's order. A batch
    that does not fit in device memory is halved and retried, down to one sequence.
    """
    parts: list[dict[str, torch.Tensor]] = []
    pass_.flush(discard=True)
    all_tokens = sequences(shard.indices)
    order = np.argsort(np.fromiter((len(t) for t in all_tokens), dtype=np.int64, count=len(all_tokens)), kind="stable")
    pos = 0
    size = max(1, int(batch_size))
    while pos < len(order):
        chunk = order[pos : pos + size]
        toks = [all_tokens[i] for i in chunk]
        seeds = [sequence_seed(pass_.seed, pass_.phase, int(shard.indices[i])) for i in chunk]
        batch = make_batch(toks, pad_id, engine.device, sample_seeds=seeds)
        try:
            captures, _ = engine.capture(batch, pass_.labels)
            result = pass_.process(engine, batch, captures)
        except torch.OutOfMemoryError:
            if size == 1:
                raise InflqError("one sequence does not fit in device memory: use a shorter context or a larger device") from None
            size = max(1, size // 2)
            if engine.device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        if result:
            parts.append({k: v.detach().to("cpu") for k, v in result.items()})
        pos += len(chunk)
        if monitor is not None:
            monitor.advance(len(chunk))
    tail = pass_.flush()
    if tail:
        parts.append({k: v.detach().to("cpu") for k, v in tail.items()})
    out = combine_results(pass_.combine, parts)
    if pass_.combine == "concat" and out:
        inverse = torch.from_numpy(np.argsort(order, kind="stable"))
        out = {k: v[inverse] for k, v in out.items()}
    return out


class ScorePass(Pass):
    """Scores training sequences against a batch of preconditioned query gradients.

    Produces ``scores [B, nq]`` and, when ``per_module``, ``module_scores [B, nq, M]`` in
    ``query_gradients.names`` order.

    Where a module is contracted through the sequence gradients ``DW`` (see
    :meth:`QueryGradients.contraction`), the dot products with the queries are deferred and run
    for up to ``group_bytes`` of ``DW`` at once: one matrix product reads the queries' full-rank
    gradients once per group instead of once per batch, which on short sequences is most of the
    cost (the batch size bounds activation memory; the group bounds this buffer).
    """

    phase = "scoring"
    labels = "data"
    combine = "concat"

    def __init__(self, query_gradients: QueryGradients, per_module: bool = False, group_bytes: int = 256 << 20) -> None:
        self.query_gradients = query_gradients
        self.per_module = per_module
        self.group_bytes = int(group_bytes)
        self._on_device: tuple[torch.device, QueryGradients] | None = None
        self._pending: list[tuple[list[torch.Tensor | None], dict[str, torch.Tensor]]] = []
        self._pending_bytes = 0

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_on_device"] = None
        state["_pending"] = []
        state["_pending_bytes"] = 0
        return state

    def _queries(self, device: torch.device) -> QueryGradients:
        if self._on_device is None or self._on_device[0] != device:
            self._on_device = (device, self.query_gradients.to(device))
        return self._on_device[1]

    def process(self, engine, batch, captures):
        qg = self._queries(engine.device)
        per: list[torch.Tensor | None] = []
        dws: dict[str, torch.Tensor] = {}
        for name in qg.names:
            cap = captures[name]
            B, T, _ = cap.activations.shape
            if qg.contraction(name, B, T) == "dw":
                dws[name] = qg.sequence_gradients(cap)
                per.append(None)
            else:
                per.append(qg.lowrank_scores(name, cap))
        size = sum(d.numel() * d.element_size() for d in dws.values())
        out = self.flush() if self._pending and self._pending_bytes + size > self.group_bytes else {}
        self._pending.append((per, dws))
        self._pending_bytes += size
        if self._pending_bytes >= self.group_bytes:
            later = self.flush()
            out = combine_results("concat", [p for p in (out, later) if p])
        return out

    def flush(self, discard=False):
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        if discard or not pending:
            return {}
        qg = self._on_device[1]
        for m, name in enumerate(qg.names):
            # A module's contraction depends on each batch's length: dot those that chose "dw".
            waiting = [(per, d[name]) for per, d in pending if per[m] is None]
            if not waiting:
                continue
            dw = waiting[0][1] if len(waiting) == 1 else torch.cat([d for _, d in waiting])
            for (per, _), part in zip(waiting, qg.dot(name, dw).split([d.shape[0] for _, d in waiting]), strict=True):
                per[m] = part
        scores = [torch.stack(per, dim=-1) for per, _ in pending]
        out = {"scores": torch.cat([x.sum(-1) for x in scores])}
        if self.per_module:
            out["module_scores"] = torch.cat(scores)
        return out


class SelfInfluencePass(Pass):
    """``∇L(z)ᵀ (G + λI)⁻¹ ∇L(z)`` for each training sequence, through the estimator's preconditioner."""

    phase = "self-influence"
    labels = "data"
    combine = "concat"

    def __init__(self, estimator: Estimator) -> None:
        self.estimator = estimator

    def process(self, engine, batch, captures):
        grads = {n: torch.einsum("bto,bti->boi", c.gradients, c.activations) for n, c in captures.items()}
        pre = self.estimator.precondition(grads)
        total = sum((pre[n] * grads[n]).sum(dim=(1, 2)) for n in grads)
        return {"scores": total[:, None]}
