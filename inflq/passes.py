"""Passes: streamed loops over training sequences, the unit of work that executors distribute.

A pass turns one batch of captures into tensors. Results over a shard are combined by summing
(factor statistics) or concatenating (per-sequence scores); executors reduce shards the same way.
Sums are accumulated in place, batch by batch, into one running sum per key: memory holds the
running sums and one batch, however many sequences a shard or a pass has.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from .base import Pass, Shard
from .batching import Batching
from .engine import Captured, GradientEngine, make_batch
from .errors import InflqError
from .linalg import DeviceSums, add_into
from .progress import Monitor

if TYPE_CHECKING:
    from .base import Estimator
    from .contractions import QueryGradients


def make_shards(indices: np.ndarray, shard_size: int) -> list[Shard]:
    indices = np.asarray(indices, dtype=np.int64)
    return [Shard(i, indices[s : s + shard_size]) for i, s in enumerate(range(0, len(indices), shard_size))]


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
    batch_size: int | Batching,
    monitor: Monitor | None = None,
    into: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Run ``pass_`` over one shard in batches. ``sequences(indices)`` returns token arrays;
    ``batch_size`` is a :class:`~inflq.batching.Batching` (a token budget) or a number of sequences.

    Sequences are batched in order of length (stable, so deterministic), which keeps padding, and
    the compute spent on it, small; concatenated results come back in the shard's order. A batch
    that does not fit in device memory is halved and retried, down to one sequence.

    A ``sum`` pass adds each batch into running sums as it goes (:meth:`Pass.accumulate`): into
    ``into`` when given (the sums of the shards before this one, which this call extends and
    returns), else into new sums for this shard alone. On a CUDA device the shard's batches are
    summed on the device (:class:`inflq.linalg.DeviceSums`) and added into those CPU sums once.
    """
    parts: list[dict[str, torch.Tensor]] = []
    summing = pass_.combine == "sum"
    # On an accelerator a shard's batches are summed there, and added into the CPU's sums once at
    # the shard's end (DeviceSums); on the CPU straight into them.
    on_device = summing and engine.device.type == "cuda"
    sums: dict[str, torch.Tensor] = DeviceSums(engine.device) if on_device else (into if into is not None else {})
    pass_.flush(discard=True)
    engine.buffers_for(pass_.phase)  # another phase's work buffers go before this one's are made
    all_tokens = sequences(shard.indices)
    lengths = np.fromiter((len(t) for t in all_tokens), dtype=np.int64, count=len(all_tokens))
    order = np.argsort(lengths, kind="stable")
    lengths = lengths[order]
    pos = 0
    batching = Batching.of(batch_size)
    while pos < len(order):
        chunk = order[pos : batching.end(lengths, pos)]
        toks = [all_tokens[i] for i in chunk]
        seeds = [sequence_seed(pass_.seed, pass_.phase, int(shard.indices[i])) for i in chunk]
        batch = make_batch(toks, pad_id, engine.device, sample_seeds=seeds)
        started = False  # a group of this batch has reached the pass (its sums, or its pending scores)
        results: list[dict[str, torch.Tensor]] = []
        try:
            # One group of sequences at a time where the engine splits the batch (large models on
            # the CPU): the pass consumes each group's captures before the next is captured, so
            # memory holds one group's (0.3 GB on GPT-2 small), not the batch's (1.2 GB).
            for group, captures, _ in engine.capture_parts(batch, pass_.labels, reuse=pass_.transient_captures):
                if summing:
                    started = True  # before adding: an addition may fail half-way
                    pass_.accumulate(engine, group, captures, sums)
                else:
                    out = pass_.process(engine, group, captures)  # leaves nothing behind if it fails
                    started = True
                    if out:
                        results.append(out)
                del captures
        except torch.OutOfMemoryError:
            if started:  # part of this batch is in the sums (or the pass's pending rows) already: a retry would count it twice
                raise InflqError(
                    f"out of device memory in the {pass_.phase} pass, part-way through a batch; use a smaller --batch-tokens"
                ) from None
            if len(chunk) == 1:
                raise InflqError("one sequence does not fit in device memory: use a shorter context or a larger device") from None
            batching = batching.halved(len(chunk))
            if engine.device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        for result in results:
            parts.append({k: v.detach().to("cpu") for k, v in result.items()})
        pos += len(chunk)
        if monitor is not None:
            monitor.advance(len(chunk))
    tail = pass_.flush()
    if summing:
        if tail:
            add_into(sums, tail)
        return add_into(into if into is not None else {}, sums) if on_device else sums
    if tail:
        parts.append({k: v.detach().to("cpu") for k, v in tail.items()})
    out = combine_results(pass_.combine, parts)
    if pass_.combine == "concat" and out:
        inverse = torch.from_numpy(np.argsort(order, kind="stable"))
        out = {k: v[inverse] for k, v in out.items()}
    return out


class ScorePass(Pass):
    """Scores training sequences against a batch of preconditioned query gradients.

    Produces ``scores [B, nq]`` and, when ``per_module`` (a pass run for the per-module scores,
    such as a layer breakdown) or ``keep_parts`` (a run's scoring pass, whose driver keeps the
    parts of each shard's top and bottom K), ``module_scores [B, nq, M]`` in
    ``query_gradients.names`` order.

    Where a module is contracted through the sequence gradients ``DW`` (see
    :meth:`QueryGradients.contraction`), the dot products with the queries are deferred and run
    for groups of about four sequences per query (at most ``group_bytes`` of ``DW``) at once: one
    matrix product reads the queries' full-rank gradients once per group instead of once per batch,
    which on short sequences was half the cost (the batch size bounds activation memory; the group
    bounds this buffer).
    """

    phase = "scoring"
    labels = "data"
    combine = "concat"
    transient_captures = True  # sequence gradients are copied into the pass's buffers, scores computed

    def __init__(
        self, query_gradients: QueryGradients, per_module: bool = False, group_bytes: int = 256 << 20, keep_parts: bool = False
    ) -> None:
        self.query_gradients = query_gradients
        self.per_module = per_module
        self.keep_parts = keep_parts
        self.group_bytes = int(group_bytes)
        self._on_device: tuple[torch.device, QueryGradients] | None = None
        self._reset()

    def _reset(self) -> None:
        # Batches whose scores are not all computed yet: per module, scores or None (waiting in
        # the module's buffer of sequence gradients, filled up to _rows[name]).
        self._pending: list[list[torch.Tensor | None]] = []
        self._sizes: list[int] = []
        self._rows: dict[str, int] = {}
        self._pending_bytes = 0
        self._ready: list[dict[str, torch.Tensor]] = []  # computed, not yet returned

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_on_device=None, _pending=[], _sizes=[], _rows={}, _pending_bytes=0, _buffers={}, _ready=[])
        return state

    def _queries(self, device: torch.device) -> QueryGradients:
        if self._on_device is None or self._on_device[0] != device:
            self._on_device = (device, self.query_gradients.to(device))
            self._buffers: dict[str, torch.Tensor] = {}
        return self._on_device[1]

    def _buffer(self, name: str, rows: int, width: int, group_rows: int, device: torch.device) -> torch.Tensor:
        """The module's buffer of flattened sequence gradients, with room for ``rows`` rows."""
        buf = self._buffers.get(name)
        if buf is None or buf.shape[0] < rows:
            # A quarter more than the last: batches of growing sizes then rarely grow it again
            # (each growth is fresh memory, faulted in page by page).
            more = 0 if buf is None else buf.shape[0] + buf.shape[0] // 4
            grown = torch.empty((max(rows, group_rows, more), width), dtype=torch.float32, device=device)
            if buf is not None and self._rows.get(name, 0):
                grown[: self._rows[name]] = buf[: self._rows[name]]
            self._buffers[name] = buf = grown
        return buf

    def process(self, engine, batch, captures):
        qg = self._queries(engine.device)
        B = batch.size
        ways = {n: qg.contraction(n, B, captures[n].activations.shape[1]) for n in qg.names}
        dw_names = [n for n in qg.names if ways[n] == "dw"]
        widths = {n: captures[n].gradients.shape[-1] * captures[n].activations.shape[-1] for n in dw_names}
        size = 4 * B * sum(widths.values())
        # Once a group holds a few times as many sequences as there are queries, reading the
        # queries is a small part of its cost: larger groups would only take memory.
        target = max(B, 4 * qg.num_queries)
        if self._pending and (self._pending_bytes + size > self.group_bytes or sum(self._sizes) + B > target):
            self._ready.append(self._dot_pending())  # kept if this batch fails (out of memory) and is retried
        group_rows = max(B, min(target, B * max(1, self.group_bytes // max(1, size))))
        # A batch whose sequence gradients alone exceed the group (many short sequences on wide
        # layers: 1.3 GB for 800 sequences of a 2 x 128 GPT-2) is dotted now, a slice of its
        # sequences at a time: the buffers stay within the group's bytes.
        whole = size <= self.group_bytes
        rows_at_once = B if whole else max(1, self.group_bytes // max(1, 4 * sum(widths.values())))
        per: list[torch.Tensor | None] = []
        for name in qg.names:
            cap = captures[name]
            if ways[name] == "dw" and not whole:
                # (Nothing is pending here: the group was dotted above, so the buffer is free.)
                buf = self._buffer(name, rows_at_once, widths[name], rows_at_once, engine.device)
                parts = []
                for s in range(0, B, rows_at_once):
                    e = min(B, s + rows_at_once)
                    part = Captured(cap.activations[s:e], cap.gradients[s:e])
                    part.sequence_gradients(out=buf[: e - s].view(e - s, cap.gradients.shape[-1], -1))
                    parts.append(qg.dot(name, buf[: e - s]))
                per.append(torch.cat(parts))
            elif ways[name] == "dw":
                # DW[b] = Σ_t g_t ā_tᵀ, written straight into the module's buffer.
                r = self._rows.get(name, 0)
                buf = self._buffer(name, r + B, widths[name], group_rows, engine.device)
                cap.sequence_gradients(out=buf[r : r + B].view(B, cap.gradients.shape[-1], -1))
                per.append(None)
            else:
                per.append(qg.lowrank_scores(name, cap))
        if whole:
            for name in dw_names:  # only now, so a batch that failed half-way leaves no rows behind
                self._rows[name] = self._rows.get(name, 0) + B
        self._pending.append(per)
        self._sizes.append(B)
        self._pending_bytes += size if whole else 0
        if self._pending_bytes >= self.group_bytes or sum(self._sizes) >= target:
            return self.flush()
        ready, self._ready = self._ready, []
        return combine_results("concat", ready)

    def flush(self, discard=False):
        if discard:
            self._reset()
            return {}
        parts = self._ready + ([self._dot_pending()] if self._pending else [])
        self._ready = []
        return combine_results("concat", parts)

    def _dot_pending(self) -> dict[str, torch.Tensor]:
        """Scores of the pending batches (their dot products run now), in order; empties them.
        (Modules already dotted keep their scores if a later one fails and this is called again.)"""
        pending, sizes, rows = self._pending, self._sizes, self._rows
        qg = self._on_device[1]
        for m, name in enumerate(qg.names):
            # A module's contraction depends on each batch's length: dot the batches that chose "dw".
            waiting = [i for i, per in enumerate(pending) if per[m] is None]
            if not waiting:
                continue
            scores = qg.dot(name, self._buffers[name][: rows[name]])
            for i, part in zip(waiting, scores.split([sizes[i] for i in waiting]), strict=True):
                pending[i][m] = part
        stacked = [torch.stack(per, dim=-1) for per in pending]
        out = {"scores": torch.cat([x.sum(-1) for x in stacked])}
        if self.per_module or self.keep_parts:
            out["module_scores"] = torch.cat(stacked)
        # Emptied only once computed: a failed product leaves the pending batches as they were.
        self._pending, self._sizes, self._rows, self._pending_bytes = [], [], {}, 0
        return out


class SelfInfluencePass(Pass):
    """``∇L(z)ᵀ (G + λI)⁻¹ ∇L(z)`` for each training sequence, through the estimator's preconditioner."""

    phase = "self-influence"
    labels = "data"
    combine = "concat"
    transient_captures = True

    def __init__(self, estimator: Estimator) -> None:
        self.estimator = estimator

    def process(self, engine, batch, captures):
        grads = {n: c.sequence_gradients() for n, c in captures.items()}
        pre = self.estimator.precondition(grads)
        total = sum((pre[n] * grads[n]).sum(dim=(1, 2)) for n in grads)
        return {"scores": total[:, None]}
