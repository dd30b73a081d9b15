"""How many sequences go into one batch: a budget of padded tokens, chosen from the model's size and
the device's free memory, unless the user fixes a number of sequences.

A fixed 8 sequences per batch left small models' passes dominated by per-batch overhead (a fit on
2,920 short sequences took 17.1 s at batch 8 and 10.7 s at batch 32) while a wide model with a
50,257-token vocabulary needs far fewer tokens per batch to stay in memory. A batch here holds
sequences of similar length (``run_shard`` sorts by length) until its padded size
``sequences x longest`` reaches ``tokens`` or it holds ``sequences`` sequences.

The estimate of memory per token is deliberately rough (fp32 activations kept for the backward
pass, the logits and their gradient, the captured inputs and output gradients of tracked modules);
out-of-memory errors on accelerators still halve the batch (``run_shard``), and on the CPU the
budget is a quarter of the memory available, so an underestimate costs speed, not the run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .display import plural

if TYPE_CHECKING:
    import numpy as np

    from .engine import GradientEngine

# Padded tokens per batch past which a larger batch no longer pays on a CPU (benchmarks/bench_user.py
# measures the demo at several budgets; docs/benchmarks.md), and on accelerators, whose kernels
# want larger batches.
CPU_TOKENS = 4096
ACCELERATOR_TOKENS = 16384


@dataclass(frozen=True)
class Batching:
    """At most ``tokens`` padded tokens and at most ``sequences`` sequences per batch (``None``: no
    limit of that kind). Picklable: executors ship it to their workers."""

    tokens: int | None = None
    sequences: int | None = None

    def __post_init__(self) -> None:
        if self.tokens is None and self.sequences is None:
            raise ValueError("a Batching needs a token budget, a number of sequences, or both")
        for name in ("tokens", "sequences"):
            v = getattr(self, name)
            if v is not None and int(v) < 1:
                raise ValueError(f"batch {name} must be at least 1, not {v}")

    @classmethod
    def of(cls, batch: Batching | int) -> Batching:
        """An int is a fixed number of sequences (the ``--batch-size`` override)."""
        return batch if isinstance(batch, Batching) else cls(sequences=max(1, int(batch)))

    def end(self, lengths: np.ndarray, start: int) -> int:
        """Where the batch that starts at ``start`` ends, for ``lengths`` sorted ascending: as many
        sequences as fit, and always at least one."""
        n = len(lengths)
        stop = n if self.sequences is None else min(n, start + int(self.sequences))
        if self.tokens is None:
            return max(start + 1, stop)
        end = start + 1
        # Sorted ascending, the longest of [start, end) is lengths[end - 1].
        while end < stop and (end + 1 - start) * int(lengths[end]) <= int(self.tokens):
            end += 1
        return end

    def halved(self, size: int) -> Batching:
        """The batching to retry with after a batch of ``size`` sequences ran out of memory."""
        half = max(1, size // 2)
        return Batching(tokens=None if self.tokens is None else max(1, self.tokens // 2), sequences=half)

    def describe(self) -> str:
        parts = ([plural(self.tokens, "token", sep=False)] if self.tokens else []) + ([plural(self.sequences, "sequence", sep=False)] if self.sequences else [])
        return "at most " + " and ".join(parts) + " per batch"


def _config_sizes(model) -> tuple[int, int, int, int, int]:
    """``(layers, hidden, intermediate, heads, vocab)`` from a transformers config, with GPT-2's
    and GPT-NeoX's names too."""
    cfg = getattr(model, "config", None)

    def get(*names: str, default: int = 0) -> int:
        for n in names:
            v = getattr(cfg, n, None)
            if isinstance(v, int) and v > 0:
                return v
        return default

    hidden = get("hidden_size", "n_embd", "d_model", default=768)
    return (
        get("num_hidden_layers", "n_layer", "num_layers", default=12),
        hidden,
        get("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden),
        get("num_attention_heads", "n_head", default=12),
        get("vocab_size", default=50257),
    )


def bytes_per_token(engine: GradientEngine, max_length: int) -> int:
    """Rough fp32 bytes one token of a batch holds during a capture pass."""
    layers, hidden, inter, heads, vocab = _config_sizes(engine.model)
    per_layer = 16 * hidden + 2 * inter + heads * max_length  # kept for backward, attention weights
    captured = sum(t.in_dim + t.out_features for t in engine.tracked)  # activations and output gradients
    return 4 * (layers * per_layer + 4 * vocab + captured)  # 4 x vocab: logits, softmax, their gradients


def bytes_per_sequence(engine: GradientEngine) -> int:
    """Per-sequence gradients ``DW`` of the widest tracked module (eigenvalue correction, full-rank
    scoring form them), with a temporary copy."""
    return 2 * 4 * max((t.out_features * t.in_dim for t in engine.tracked), default=1)


def available_memory(device) -> int:
    """Bytes a batch may use: 60 % of an accelerator's free memory, a quarter of the memory the
    operating system says is available on the CPU (factors, the model and the corpus need the rest)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(0.6 * free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 4
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError, AttributeError):  # unknown: a quarter of 8 GB
        return 2 << 30


def auto_batching(engine: GradientEngine, max_length: int, memory: int | None = None) -> Batching:
    """The default batching for ``engine``'s model and device: the token target for the device,
    lowered until half of the memory budget holds the tokens and the other half the per-sequence
    gradients; never below one sequence of ``max_length`` tokens."""
    memory = available_memory(engine.device) if memory is None else int(memory)
    target = CPU_TOKENS if engine.device.type == "cpu" else ACCELERATOR_TOKENS
    tokens = max(int(max_length), min(target, memory // 2 // bytes_per_token(engine, max_length)))
    sequences = max(1, memory // 2 // bytes_per_sequence(engine))
    return Batching(tokens=int(tokens), sequences=int(min(sequences, tokens)))
