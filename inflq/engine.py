"""The shared gradient engine: every estimator, filter-free score and attribution goes through it.

It runs a causal LM on a batch of token sequences and captures, for each *tracked* linear module,
the per-token input activations ``ā_t`` (with a trailing 1 where the module has a bias) and the
per-token gradients ``g_t`` of a loss with respect to the module's outputs. Everything the method
needs is a contraction of these two: covariances (``Σ ā āᵀ``, ``Σ g gᵀ``), per-sequence gradients
(``DW = Σ_t g_t ā_tᵀ``), and scores (``Σ_t g_tᵀ Q ā_t``).

Weight gradients are never formed by autograd: parameters are frozen while capturing and the input
embeddings are made to require grad instead, so the backward pass computes activation gradients only.
"""

from __future__ import annotations

import contextlib
import ctypes
import fnmatch
import itertools
import os
import platform
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from .errors import InflqError, NumericalError

if TYPE_CHECKING:
    from .base import MeasurementTerm

try:  # GPT-2 style models use a transposed linear layer ("Conv1D"); tracked natively.
    from .modeling import import_transformers  # (one thread imports transformers at a time)

    Conv1D = import_transformers().Conv1D
except ImportError:  # pragma: no cover - transformers always ships it today
    Conv1D = ()  # type: ignore[assignment]

PRESETS = ("all", "mlp", "attention", "lora")
_MLP = re.compile(r"(^|\.)(mlp|feed_forward|ffn|moe|block_sparse_moe)(\.|$)")
_ATTN = re.compile(r"(^|\.)(attn|attention|self_attn|self_attention|cross_attn)(\.|$)")
_LAYER = re.compile(r"\.(\d+)(\.|$)")
_LORA = re.compile(r"(^|\.)lora_[AB](\.|$)")  # a PEFT LoRA adapter's A and B Linear layers
# Where the true Fisher's labels are sampled: the positions of the training loss (a next token
# exists), not every real token. Part of fitted factors' cache key and recorded with them: factors
# fitted under an older rule are never reused in silence.
SAMPLED_AT = "loss positions"
_SAMPLE_BLOCK = 1 << 24  # logits per block of the sampler's in-place CDF (64 MiB in float32)
# GradientEngine.capture on the CPU: a batch whose captures would exceed _SPLIT_ABOVE bytes runs in
# passes of _PASS_BYTES of captures, at least _PASS_TOKENS padded tokens each (GPT-2 small: 2 x 256).
_SPLIT_ABOVE = 1 << 30
_PASS_BYTES = 1 << 28
_PASS_TOKENS = 512
_LOSS_ROWS = 256  # positions per block of the cross-entropy (256 x 50,257 float32 logits: 51 MB)


# glibc malloc, chosen per process from the workload (:func:`tune_allocator`, issue 27). Freed
# memory is either kept by the heap for the next batch (no page faults) or returned to the system
# (memory bounded whatever the allocation pattern, at a page fault per 4 KiB touched again).
_KEEP_BELOW = 512 << 20  # a batch's captures at the token budget: up to this, the heap keeps freed memory
_MMAP_SMALL = 1 << 20  # beyond it, blocks of 1 MiB and more get mappings of their own, unmapped when freed
_MMAP_LARGE = 32 << 20  # glibc's own ceiling for the threshold (HEAP_MAX_SIZE / 2 on 64-bit)
_TRIM_LARGE = 1 << 30  # ... and the heap's top is returned only when more than this is free there
_allocator_policy: str | None = None


def tune_allocator(batch_bytes: int) -> str:
    """Choose glibc's malloc policy for this process, once, from one batch's captures
    (``batch_bytes`` at the token budget); returns the policy in force: ``"keep"``, ``"bounded"``,
    or ``"default"`` (the user set ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_``, which
    stand; not glibc Linux).

    * ``keep`` (batches of at most 512 MiB of captures: narrow models, short sequences): blocks up to
      32 MiB come from the heap, and up to 1 GiB of freed memory stays with it
      (``M_MMAP_THRESHOLD`` 32 MiB, ``M_TRIM_THRESHOLD`` 1 GiB), so every batch's activations, logits
      and gradients reuse the pages of the batch before. Returning them to the system and faulting
      them in again cost as much system time as the computing itself on a 4 × 128 GPT-2's short
      sequences (11 M page faults, 24 s of system time in a 35 s fit; docs/benchmarks.md).
    * ``bounded`` (larger batches: real widths): every block of 1 MiB or more gets a mapping of its
      own, returned when freed (``M_MMAP_THRESHOLD`` 1 MiB). glibc's own dynamic threshold served the
      6-25 MB tensors of GPT-2 small's batches from a heap that fragmented and kept gigabytes
      (issue 17); at these widths a page fault is small next to the work per value (about 13 %
      of a fit's time at 768 wide).
    """
    global _allocator_policy
    if _allocator_policy is None:
        _allocator_policy = "default"
        user = any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"))
        if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc" and not user:
            try:
                mallopt = ctypes.CDLL(None).mallopt  # -3: M_MMAP_THRESHOLD, -1: M_TRIM_THRESHOLD
                if batch_bytes <= _KEEP_BELOW:
                    if mallopt(-3, _MMAP_LARGE) == 1 and mallopt(-1, _TRIM_LARGE) == 1:
                        _allocator_policy = "keep"
                elif mallopt(-3, _MMAP_SMALL) == 1:
                    _allocator_policy = "bounded"
            except (OSError, AttributeError):  # pragma: no cover - a glibc without mallopt
                pass
    return _allocator_policy


def math_attention():
    """A context in which attention uses the math kernel: twice differentiable and with
    forward-mode AD, unlike the fused kernels (a no-op on a torch without the choice)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)
    except Exception:  # pragma: no cover - older torch
        return contextlib.nullcontext()


@dataclass
class TrackedModule:
    """A linear module whose Gauss-Newton block inflq models (weights ``out × in_dim``)."""

    name: str
    module: nn.Module = field(repr=False)
    in_features: int
    out_features: int
    bias: bool
    layer: int | None

    @property
    def in_dim(self) -> int:
        """Width of ``ā``: the input features plus one for the bias."""
        return self.in_features + int(self.bias)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_dim)

    @property
    def transposed(self) -> bool:
        """Whether the module stores its weight ``in × out`` (GPT-2's ``Conv1D``)."""
        return isinstance(self.module, Conv1D)


def _linear_shape(module: nn.Module) -> tuple[int, int, bool] | None:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, module.bias is not None
    if Conv1D and isinstance(module, Conv1D):
        # Conv1D stores its weight as (in, out) and computes x @ W + b.
        return module.weight.shape[0], module.weight.shape[1], module.bias is not None
    return None


def _weighted_leaf(module: nn.Module) -> bool:
    """A leaf module with a matrix (or larger) weight: a layer that a Gauss-Newton block would need."""
    w = getattr(module, "weight", None)
    return not any(True for _ in module.children()) and isinstance(w, torch.Tensor) and w.dim() >= 2


def layer_index(name: str) -> int | None:
    """The transformer block a module belongs to: the first integer in its dotted name."""
    m = _LAYER.search("." + name)
    return int(m.group(1)) if m else None


def select_modules(model: nn.Module, modules: str | Sequence[str] | None = None) -> list[TrackedModule]:
    """Choose the linear modules to track.

    ``modules`` is a preset (``all``: every linear layer inside the transformer blocks, the default;
    ``mlp``: the paper's choice; ``attention``; ``lora``: a PEFT LoRA adapter's A and B layers, the
    parameters a LoRA fine-tune trained) or comma-separated glob patterns over module names
    (``transformer.h.*.mlp.*``). Embeddings and the LM head are outside the blocks, so no preset
    picks them.
    """
    if modules is None or modules == "":
        modules = "all"
    patterns = [p.strip() for p in modules.split(",")] if isinstance(modules, str) else list(modules)
    named = list(model.named_modules())
    chosen: list[TrackedModule] = []
    for name, mod in named:
        if not name:
            continue
        shape = _linear_shape(mod)
        wanted = False
        for p in patterns:
            if p in PRESETS:
                wanted |= layer_index(name) is not None and (
                    p == "all" or (p == "mlp" and bool(_MLP.search(name))) or (p == "attention" and bool(_ATTN.search(name)))
                    or (p == "lora" and bool(_LORA.search(name)))
                )
            elif fnmatch.fnmatchcase(name, p):
                wanted = True
                if shape is None and not any(ch in p for ch in "*?["):
                    raise InflqError(
                        f"module {name} is a {type(mod).__name__}; inflq tracks linear layers only (nn.Linear, GPT-2 Conv1D): "
                        "choose linear modules"
                    )
        if not wanted:
            continue
        if shape is None:
            if _weighted_leaf(mod) and not isinstance(mod, nn.Embedding):
                raise InflqError(
                    f"module {name} is a {type(mod).__name__}, a layer type inflq cannot track (only nn.Linear and GPT-2 "
                    "Conv1D); exclude it with narrower --modules patterns"
                )
            continue  # norms, dropout, activations and containers carry no Gauss-Newton block here
        in_f, out_f, bias = shape
        chosen.append(TrackedModule(name, mod, in_f, out_f, bias, layer_index(name)))
    if not chosen:
        if "lora" in patterns:
            raise InflqError("the model has no LoRA adapter layers to track (--modules lora); give the adapter (--adapter DIR) or other modules")
        examples = [n for n, m in named if _linear_shape(m) is not None][:4]
        raise InflqError(
            f"no linear module matches {','.join(patterns)!r}; use a preset (all, mlp, attention) or "
            f"a glob over names such as {', '.join(examples) or '(the model has no linear layers)'}"
        )
    return chosen


@dataclass
class Batch:
    """Right-padded token sequences and where the loss is taken.

    ``loss_mask[b, t]`` says whether position ``t``'s prediction (of token ``t + 1``) counts: the
    training loss's terms, the measurement's, and where the true Fisher samples its labels.
    ``sample_seeds[b]`` seeds the labels sampled for the true Fisher (one generator per sequence,
    so results do not depend on how sequences are batched). ``loss_weights[b, t]`` (float32, or
    ``None``: all 1) weighs position ``t``'s term of the loss: a query's measurement
    (:class:`inflq.Measurement`) as a weighted sum of its tokens' log-probabilities.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    sample_seeds: list[int] | None = None
    loss_weights: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])


def make_batch(
    sequences: Sequence[Sequence[int] | np.ndarray],
    pad_id: int,
    device: torch.device | str = "cpu",
    loss_from: Sequence[int] | None = None,
    sample_seeds: Sequence[int] | None = None,
    weights: Sequence[np.ndarray] | None = None,
) -> Batch:
    """Pad ``sequences`` on the right. Loss is on every next-token prediction, or, where
    ``loss_from[b]`` is given, only on predictions of tokens at positions ``>= loss_from[b]``
    (a query's completion), and, for a sequence that carries a mask of trained targets
    (:class:`inflq.corpus.TrainingTokens`: instruction data, the loss on the response), only on
    predictions of its trained tokens (several assistant turns make several runs of them).
    ``weights[b]``: one weight per token of sequence ``b`` on the loss term that predicts it
    (a measurement's, :meth:`inflq.MeasurementTerm.position_weights`); ``None``: weight 1."""
    from .corpus import targets_of

    if not sequences:
        raise InflqError("an empty batch of sequences")
    T = max(len(s) for s in sequences)
    B = len(sequences)
    ids = torch.full((B, T), int(pad_id), dtype=torch.long)
    att = torch.zeros((B, T), dtype=torch.long)
    for b, s in enumerate(sequences):
        n = len(s)
        ids[b, :n] = torch.as_tensor(np.asarray(s, dtype=np.int64))
        att[b, :n] = 1
    loss = torch.zeros((B, T), dtype=torch.bool)
    loss[:, :-1] = (att[:, :-1] * att[:, 1:]).bool()
    for b, s in enumerate(sequences):
        targets = targets_of(s)
        if targets is not None:
            loss[b, : len(s) - 1] &= torch.from_numpy(np.ascontiguousarray(targets[1:], dtype=bool))
    if loss_from is not None:
        pos = torch.arange(T)[None, :]
        start = torch.as_tensor(list(loss_from))[:, None]
        loss &= pos + 1 >= start
    lw = None
    if weights is not None:
        lw = torch.zeros((B, T), dtype=torch.float32)
        for b, w in enumerate(weights):
            w = np.asarray(w, dtype=np.float64)
            if len(w) != len(sequences[b]):
                raise ValueError(f"sequence {b} has {len(sequences[b])} tokens and {len(w)} weights")
            lw[b, : len(w) - 1] = torch.from_numpy(w[1:].astype(np.float32))  # position t predicts token t + 1
        lw = lw.to(device)
    seeds = list(sample_seeds) if sample_seeds is not None else None
    return Batch(ids.to(device), att.to(device), loss.to(device), seeds, lw)


@dataclass
class Captured:
    """Per-token activations ``A[b, t, in_dim]`` and output gradients ``G[b, t, out]`` (float32)."""

    activations: torch.Tensor
    gradients: torch.Tensor

    def sequence_gradients(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """``DW[b] = Σ_t g_t ā_tᵀ``, ``[B, out, in_dim]`` (written into ``out`` when given)."""
        return torch.bmm(self.gradients.transpose(1, 2), self.activations, out=out)


class SequenceGradients(dict):
    """Per-sequence gradients ``{module: DW [n, out, in_dim]}`` that keep the per-token factors they
    were summed from, ``factors[module] = (G [n, T, out], A [n, T, in_dim])`` with
    ``DW[b] = G[b]ᵀ A[b]``: an estimator can then rotate ``T`` tokens instead of the whole matrix
    (EK-FAC's ``Q_Sᵀ DW Q_A = (G Q_S)ᵀ (A Q_A)``), far cheaper for short query completions on wide
    layers. A plain dict derived from it (``{n: w * v ...}``) simply has no factors."""

    def __init__(self, dense: dict[str, torch.Tensor], factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        super().__init__(dense)
        self.factors = factors

    @classmethod
    def concat(cls, parts: list[SequenceGradients]) -> SequenceGradients:
        """Join batches (token factors zero-padded to the longest batch)."""
        names = list(parts[0])
        T = max(p.factors[n][0].shape[1] for p in parts for n in names)

        def pad(x: torch.Tensor) -> torch.Tensor:
            return nn.functional.pad(x, (0, 0, 0, T - x.shape[1]))

        dense = {n: torch.cat([p[n] for p in parts]) for n in names}
        factors = {n: (torch.cat([pad(p.factors[n][0]) for p in parts]), torch.cat([pad(p.factors[n][1]) for p in parts])) for n in names}
        return cls(dense, factors)

    def grouped(self, groups: Sequence[Sequence[int]]) -> SequenceGradients:
        """One gradient per group of rows, their sum: a query whose measurement reads several
        sequences (:class:`inflq.MeasurementTerm`). The token factors of a group are its rows'
        tokens one after another (``DW = Σ_rows G_rowᵀ A_row = [G_1; G_2]ᵀ [A_1; A_2]``), zero-padded
        to the longest group. One row per group, in order: this object itself."""
        rows = [list(g) for g in groups]
        n = next(iter(self.values())).shape[0] if self else 0
        if all(len(g) == 1 for g in rows) and [g[0] for g in rows] == list(range(n)):
            return self
        dense = {name: torch.stack([v[g].sum(dim=0) for g in rows]) for name, v in self.items()}
        factors = {}
        for name, (G, A) in self.factors.items():
            T = G.shape[1]
            span = T * max(len(g) for g in rows)
            gq = G.new_zeros((len(rows), span, G.shape[2]))
            aq = A.new_zeros((len(rows), span, A.shape[2]))
            for i, g in enumerate(rows):
                gq[i, : len(g) * T] = G[g].reshape(len(g) * T, G.shape[2])
                aq[i, : len(g) * T] = A[g].reshape(len(g) * T, A.shape[2])
            factors[name] = (gq, aq)
        return SequenceGradients(dense, factors)


def measurement_batches(
    measured: Sequence[Sequence[MeasurementTerm]], pad_id: int, device: torch.device | str = "cpu", batch_size: int | None = None
) -> Iterator[tuple[Batch, list[list[int]]]]:
    """Batches of the terms of ``batch_size`` queries at a time (``None``: 8), each with, per
    query of the batch, its rows: every term of a query's measurement (:class:`inflq.Measurement`)
    is a row whose loss is the term's weighted negative log-probabilities (its tokens from
    ``start``). Where every weight is 1 (``log p(completion)``), the batch carries no weights and is
    the plain measurement batch."""
    size = max(1, batch_size or 8)
    for s in range(0, len(measured), size):
        seqs, starts, weights, groups = [], [], [], []
        for terms in measured[s : s + size]:
            if not terms:
                raise InflqError("a measurement gave no token sequence to measure")
            groups.append(list(range(len(seqs), len(seqs) + len(terms))))
            for t in terms:
                seqs.append(t.tokens)
                starts.append(int(t.start))
                weights.append(t.position_weights())
        plain = all(bool(np.all(w[st:] == 1.0)) for w, st in zip(weights, starts, strict=True))
        yield make_batch(seqs, pad_id, device, loss_from=starts, weights=None if plain else weights), groups


class _RowwiseCrossEntropy(torch.autograd.Function):
    """``cross_entropy(logits, targets, reduction="none")`` over ``[N, V]`` logits, ``rows`` rows at
    a time, forward and backward. Each block runs torch's own cross-entropy (and, in the backward
    pass, its own autograd of it) on a block of rows, and those kernels treat every row on its
    own, so values and gradients are bitwise those of one call on the whole; but only one block's
    log-softmax and gradient exist at a time, instead of three ``[N, V]`` copies (log-softmax, its
    gradient, the logits' gradient). With ``consume`` the logits' gradient is written over the
    logits (they must be float32 and needed by no one else afterwards)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, rows: int, consume: bool) -> torch.Tensor:
        ce = torch.empty(logits.shape[0], dtype=logits.dtype, device=logits.device)
        for s in range(0, logits.shape[0], rows):
            ce[s : s + rows] = nn.functional.cross_entropy(logits[s : s + rows], targets[s : s + rows], reduction="none")
        ctx.save_for_backward(logits, targets)
        ctx.rows, ctx.consume = rows, consume
        return ce

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, targets = ctx.saved_tensors
        out = logits.detach() if ctx.consume else torch.empty_like(logits)
        with torch.enable_grad():
            for s in range(0, logits.shape[0], ctx.rows):
                block = logits[s : s + ctx.rows].detach().requires_grad_(True)
                ce = nn.functional.cross_entropy(block, targets[s : s + ctx.rows], reduction="none")
                (g,) = torch.autograd.grad(ce, block, grad[s : s + ctx.rows])
                out[s : s + ctx.rows] = g
        return out, None, None, None


class GradientEngine:
    """Runs a model and captures what every estimator needs from its tracked modules.

    Labels: ``"data"`` uses the sequence's own next tokens (the training loss, or a query's
    measurement when the batch's loss mask covers the completion only); ``"sampled"`` draws
    labels from the model's own predictive distribution at exactly the positions where that loss
    has a term (``loss_mask``): the true Fisher, equal to the Gauss-Newton matrix of the loss for
    softmax cross-entropy (see :data:`SAMPLED_AT`).
    """

    def __init__(self, model: nn.Module, tracked: list[TrackedModule], pass_tokens: int | None = None) -> None:
        self.model = model
        self.tracked = tracked
        self.device = next(model.parameters()).device
        if self.device.type == "cpu":  # on an accelerator the host holds little per batch
            from .batching import CPU_TOKENS

            tune_allocator(CPU_TOKENS * self.capture_bytes_per_token)
        # Padded tokens per forward and backward pass (:meth:`capture`); 0: one pass per batch. By
        # default (None) on the CPU, where splitting a batch was checked to change no bit, only
        # batches with large captures are split (:meth:`_pass_tokens`); elsewhere (a GPU's kernels
        # may depend on the batch's size) one pass per batch unless asked.
        self.pass_tokens = (None if self.device.type == "cpu" else 0) if pass_tokens is None else int(pass_tokens)
        self._buffers: dict[object, torch.Tensor] = {}
        self._buffers_phase: str | None = None

    def buffer(self, key: object, shape: Sequence[int], dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> torch.Tensor:
        """A reusable work buffer of ``shape``: a view of memory kept under ``key`` between calls,
        grown when a larger one is asked for (its contents are whatever the last user left).

        Passes that consume a batch before the next one is captured write their per-batch tensors
        (captures with a bias column, Gram matrices, rotated tokens) into the same memory every
        batch, instead of asking the allocator for fresh pages that the kernel must fault in and
        zero: on short sequences that was a third of a fit's time (docs/benchmarks.md, issue 27).
        Memory: one batch's worth per key, released by :meth:`release_buffers`."""
        device = self.device if device is None else torch.device(device)
        n = 1
        for d in shape:
            n *= int(d)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != device:
            # A quarter more than asked: batches of sorted, growing lengths then rarely grow it again.
            grown = n if buf is None or buf.dtype != dtype or buf.device != device else max(n, buf.numel() + buf.numel() // 4)
            self._buffers[key] = None  # the old one goes before the new one is made
            buf = self._buffers[key] = torch.empty(grown, dtype=dtype, device=device)
        return buf[:n].view(tuple(int(d) for d in shape))

    def release_buffers(self) -> None:
        """Drop every work buffer (:meth:`buffer`): before a phase that needs the memory more."""
        self._buffers.clear()

    def buffers_for(self, phase: str) -> None:
        """Keep the work buffers across the batches and shards of one phase (a pass's
        :attr:`~inflq.base.Pass.phase`); the first shard of another phase starts without the last
        one's (the covariance pass's Gram matrices are not carried through the eigenvalue
        correction, nor its rotated tokens through scoring). :func:`inflq.passes.run_shard` calls it."""
        if phase != self._buffers_phase:
            self.release_buffers()
            self._buffers_phase = phase

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tracked]

    @property
    def capture_bytes_per_token(self) -> int:
        """Bytes of float32 activations and output gradients one token's captures take."""
        return 4 * sum(t.in_dim + t.out_features for t in self.tracked)

    @contextlib.contextmanager
    def _hooks(self, store: dict[str, list[torch.Tensor | None]]) -> Iterator[None]:
        handles = []
        saved = [(p, p.requires_grad) for p in self.model.parameters()]

        def embed_hook(_mod, _args, out):
            return out.requires_grad_(True) if not out.requires_grad else out

        def make_hook(tm: TrackedModule):
            def hook(_mod, args, out):
                if store[tm.name][0] is not None:
                    raise InflqError(f"module {tm.name} ran twice in one forward pass; untrack it (--modules)")
                store[tm.name][0] = args[0].detach()

                def grad_hook(g):
                    store[tm.name][1] = g.detach()

                if out.requires_grad:
                    out.register_hook(grad_hook)

            return hook

        try:
            for p, _ in saved:
                p.requires_grad_(False)
            emb = self.model.get_input_embeddings()
            handles.append(emb.register_forward_hook(embed_hook))
            for tm in self.tracked:
                handles.append(tm.module.register_forward_hook(make_hook(tm)))
            yield
        finally:
            for h in handles:
                h.remove()
            for p, flag in saved:
                p.requires_grad_(flag)

    def losses(self, logits: torch.Tensor, batch: Batch, labels: str, consume: bool = False) -> torch.Tensor:
        """Per-position cross-entropy ``[B, T]`` (zero where the loss mask is off).

        Computed ``_LOSS_ROWS`` positions at a time (:class:`_RowwiseCrossEntropy`): no log-softmax
        or gradient copy of the whole ``[B, T, vocab]`` logits exists, and the values and gradients
        are bitwise those of ``cross_entropy`` on the whole. ``consume=True`` lets the backward pass
        write the logits' gradient over the logits themselves (float32 logits the caller no longer
        needs, as in :meth:`capture`)."""
        B, T, V = logits.shape
        if labels == "data":
            targets = torch.zeros_like(batch.input_ids)
            targets[:, :-1] = batch.input_ids[:, 1:]
        elif labels == "sampled":
            targets = self.sample_labels(logits, batch)
        else:
            raise ValueError(f"unknown labels {labels!r}")
        owned = consume or logits.dtype != torch.float32  # .float() below makes a copy of its own
        ce = _RowwiseCrossEntropy.apply(logits.float().reshape(-1, V), targets.reshape(-1), _LOSS_ROWS, owned).view(B, T)
        if batch.loss_weights is not None:
            return ce * batch.loss_mask * batch.loss_weights
        return ce * batch.loss_mask

    @staticmethod
    def sample_labels(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Labels ``[B, T]`` drawn from ``softmax(logits)`` at the loss positions (``loss_mask``),
        ``0`` elsewhere (masked out of the loss).

        Inverse-CDF sampling with one generator per sequence (seeded by it, on the CPU whatever the
        device) and one uniform per position, whether that position is sampled or not: a label
        depends on its sequence's seed, its position and its row of logits only, not on the batch,
        its padding, the number of threads (softmax and cumulative sums run row by row, each row
        through the same kernels wherever it falls) or the device (up to the rounding of a row's
        softmax there). Ten
        times faster than ``torch.multinomial`` on a ``[T, vocab]`` matrix, the same distribution.
        Memory: the CDF is built one block of at most ``_SAMPLE_BLOCK`` logits at a time (consecutive
        positions of the batch, their softmax summed in place), so no softmax or cumsum copy of the
        batch's ``[B, T, vocab]`` logits exists (with a 50k vocabulary and 8 × 256 tokens each copy
        would be 0.4 GB). The blocks take the whole batch's positions in one call each, not a
        sequence at a time (on short sequences those calls were a tenth of a capture).
        """
        if batch.sample_seeds is None:
            raise ValueError("sampled labels need per-sequence seeds")
        B, T, V = logits.shape
        rows = max(1, _SAMPLE_BLOCK // V)
        flat = logits.detach().reshape(B * T, V)
        mask = batch.loss_mask.reshape(B * T)
        targets = torch.zeros(B * T, dtype=torch.long, device=logits.device)
        with torch.no_grad():
            # The uniforms come from CPU generators on every device (one small copy per batch):
            # a sequence's labels are then the same on a GPU as on the CPU, up to the rounding of
            # their softmax, and a run on one can be checked against the other.
            u = torch.empty((B, T), dtype=torch.float32)
            gen = torch.Generator()
            for b, seed in enumerate(batch.sample_seeds):
                gen.manual_seed(int(seed) % (2**63 - 1))
                torch.rand((T,), generator=gen, out=u[b])
            u = u.reshape(B * T).to(logits.device)
            for s in range(0, B * T, rows):
                e = min(B * T, s + rows)
                if not bool(mask[s:e].any()):
                    continue
                cdf = torch.softmax(flat[s:e], dim=-1, dtype=torch.float32)
                cdf.cumsum_(dim=-1)  # the last column sums to 1 up to rounding: the uniform is scaled by it
                drawn = torch.searchsorted(cdf, (u[s:e] * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
                targets[s:e] = drawn.clamp_max(V - 1) * mask[s:e]
        return targets.view(B, T)

    def capture(self, batch: Batch, labels: str = "data") -> tuple[dict[str, Captured], torch.Tensor]:
        """The captures of a batch and its per-sequence losses ``[B]``: one forward and backward
        pass, or, where the batch holds more than ``pass_tokens`` padded tokens, one per group
        of sequences (:meth:`capture_parts`), their captures written into the batch's.
        Memory then holds the autograd graph of one group, not of the batch (on GPT-2 small, 2.8 GB
        for 8 × 256 tokens), and the captures are bitwise those of one pass on the CPU (every
        sequence's rows go through the same kernels at the same widths; tests/test_engine.py)."""
        parts = self.capture_parts(batch, labels)
        first = next(parts)
        if first[0] is batch:  # one pass
            return first[1], first[2]
        captured: dict[str, Captured] = {}
        losses = []
        s = 0
        for part, caps, loss in itertools.chain([first], parts):
            e = s + part.size
            losses.append(loss)
            for name, cap in caps.items():
                have = captured.get(name)
                if have is None:
                    a, g = cap.activations, cap.gradients
                    have = captured[name] = Captured(a.new_empty((batch.size,) + a.shape[1:]), g.new_empty((batch.size,) + g.shape[1:]))
                have.activations[s:e] = cap.activations
                have.gradients[s:e] = cap.gradients
            del caps
            s = e
        return captured, torch.cat(losses)

    def capture_parts(
        self, batch: Batch, labels: str = "data", reuse: bool = False
    ) -> Iterator[tuple[Batch, dict[str, Captured], torch.Tensor]]:
        """The batch's captures a group of sequences at a time: ``(group, captures, losses)`` for
        consecutive groups of ``batch`` (each padded as in the whole batch), one group — ``batch``
        itself — where the batch holds at most ``pass_tokens`` padded tokens. A caller that
        consumes each group before asking for the next (the passes of :func:`inflq.passes.run_shard`)
        holds one group's captures, not the batch's: 0.3 instead of 1.2 GB on GPT-2 small.

        ``reuse=True`` (a caller that keeps nothing of a group's captures once it asks for the
        next: :attr:`inflq.Pass.transient_captures`): the captures that need a copy of their own
        (a bias column, padding zeroed, another dtype) are written into the engine's work buffers
        (:meth:`buffer`), the same memory for every group and batch; the values are the same."""
        T = max(1, int(batch.input_ids.shape[1]))
        limit = self._pass_tokens(batch.size * T) if self.pass_tokens is None else self.pass_tokens
        rows = batch.size if not limit else max(1, limit // T)
        if rows >= batch.size:
            yield (batch, *self._capture(batch, labels, reuse))
            return
        for s in range(0, batch.size, rows):
            e = min(batch.size, s + rows)
            seeds = batch.sample_seeds[s:e] if batch.sample_seeds is not None else None
            lw = batch.loss_weights[s:e] if batch.loss_weights is not None else None
            part = Batch(batch.input_ids[s:e], batch.attention_mask[s:e], batch.loss_mask[s:e], seeds, lw)
            yield (part, *self._capture(part, labels, reuse))

    def _pass_tokens(self, tokens: int) -> int:
        """The default pass size for a batch of ``tokens`` padded tokens: one pass (0) where its
        captures take at most ``_SPLIT_ABOVE`` bytes (small models keep their large, fast
        batches), else passes of ``_PASS_BYTES`` of captures, at least ``_PASS_TOKENS`` tokens."""
        per_token = self.capture_bytes_per_token
        if tokens * per_token <= _SPLIT_ABOVE:
            return 0
        return max(_PASS_TOKENS, _PASS_BYTES // max(1, per_token))

    def _capture(self, batch: Batch, labels: str, reuse: bool = False) -> tuple[dict[str, Captured], torch.Tensor]:
        """One forward and backward pass over the whole ``batch`` (``reuse``: see :meth:`capture_parts`)."""
        store: dict[str, list[torch.Tensor | None]] = {t.name: [None, None] for t in self.tracked}
        self.model.eval()
        with self._hooks(store), torch.enable_grad():
            out = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            logits = out.logits
            del out  # the logits' only other reference: the loss may then reuse them for their gradient
            per_token = self.losses(logits, batch, labels, consume=True)
            del logits
            seq_loss = per_token.sum(dim=1)
            total = seq_loss.sum()
            if not torch.isfinite(total):
                raise NumericalError(
                    "the loss is not finite (overflow in low precision?): run with --dtype float32 or bfloat16"
                )
            if total.requires_grad:
                total.backward()
        captured: dict[str, Captured] = {}
        # Right padding in a causal LM: padded positions carry no loss and influence no real
        # position, so their output gradients are exactly zero; their activations are zeroed so that
        # padding counts nowhere. Batches without padding (most, once sorted by length) skip the copy.
        padded = not bool(batch.attention_mask.all())
        valid = batch.attention_mask.to(torch.float32)[..., None] if padded else None
        checks = []
        for tm in self.tracked:
            a, g = store[tm.name]
            if a is None:
                raise InflqError(f"module {tm.name} did not run in the forward pass; untrack it (--modules)")
            if g is None:
                g = torch.zeros(a.shape[:-1] + (tm.out_features,), device=a.device)
            if reuse:
                a, g = self._into_buffers(tm, a, g, valid)
            else:
                a = a.to(torch.float32)
                if tm.bias:
                    a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
                g = g.to(torch.float32)
                if padded:
                    a = a * valid
                    g = g * valid
            checks.append(g.sum())  # one pass, no boolean copy; inf or NaN anywhere makes it non-finite
            captured[tm.name] = Captured(a, g)
        finite = torch.isfinite(torch.stack(checks)).tolist() if checks else []
        if not all(finite):
            name = self.tracked[finite.index(False)].name
            raise NumericalError(
                f"non-finite gradients in {name} (overflow in low precision?): run with --dtype float32 or bfloat16"
            )
        return captured, seq_loss.detach()

    def _into_buffers(
        self, tm: TrackedModule, a: torch.Tensor, g: torch.Tensor, valid: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``a`` with its bias column and ``g``, both float32 with padding zeroed, written into the
        engine's buffers where they need a copy at all: the values of the fresh tensors the other
        route makes (``cat``, ``* valid``), with no new memory per batch."""
        if tm.bias or valid is not None or a.dtype != torch.float32:
            out = self.buffer(("activations", tm.name), a.shape[:-1] + (tm.in_dim,), torch.float32, a.device)
            body = out[..., : tm.in_features]
            if valid is None:
                body.copy_(a)
            else:
                torch.mul(a, valid, out=body)
            if tm.bias:
                out[..., tm.in_features :].copy_(valid if valid is not None else torch.ones((), device=a.device))
            a = out
        if valid is not None or g.dtype != torch.float32:
            out = self.buffer(("gradients", tm.name), g.shape, torch.float32, g.device)
            if valid is None:
                out.copy_(g)
            else:
                torch.mul(g, valid, out=out)
            g = out
        return a, g

    def measurement_gradients(self, measured: Sequence[Sequence[MeasurementTerm]], pad_id: int, batch_size: int | None = None) -> SequenceGradients:
        """Gradients ``[nq, out, in_dim]`` of each query's measurement loss, the negative of its
        measurement ``Σ_terms Σ_t w_t log p(token_t | tokens before)`` (``measured[q]``: the query's
        :class:`inflq.MeasurementTerm` s), with their token factors: the one place every
        estimator's query gradients are made. ``batch_size`` queries at a time (``None``: 8)."""
        parts = [self.sequence_gradients(batch, "data").grouped(groups)
                 for batch, groups in measurement_batches(measured, pad_id, self.device, batch_size)]
        return SequenceGradients.concat(parts)

    def sequence_gradients(self, batch: Batch, labels: str = "data") -> SequenceGradients:
        """Per-sequence loss gradients ``DW[b] = Σ_t g_t ā_tᵀ`` for each module, ``[B, out, in_dim]``,
        with the token factors they came from."""
        caps, _ = self.capture(batch, labels)
        return SequenceGradients(
            {n: c.sequence_gradients() for n, c in caps.items()},
            {n: (c.gradients, c.activations) for n, c in caps.items()},
        )
