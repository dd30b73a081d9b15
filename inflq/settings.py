"""A run's settings: everything that determines its result, stored with the run as JSON and read
back on resume. Kept apart from :mod:`inflq.runs` (which imports torch) so that front ends can
build and show settings without loading the engine."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .batching import Batching, auto_batching

if TYPE_CHECKING:
    from .engine import GradientEngine
    from .project import Project


@dataclass
class RunSettings:
    """Everything that determines a run's result (stored with the run, reused on resume)."""

    # Plugin specs; None: the registry's default of the kind (see resolve_defaults).
    estimator: str | None = None
    filter: str | None = None
    executor: str | None = None
    modules: str | None = None
    rank: int | None = 32
    # Keep a module's query gradients at full rank where scoring is cheaper that way (see
    # inflq.contractions.Compression), up to this many MiB in all; 0 = always rank ``rank``.
    full_rank_mb: int = 1024
    top_k: int = 20
    fit_sequences: int | None = None
    seed: int = 0
    # Sequences per batch and padded tokens per batch; both None (the default): chosen from the
    # model's size and the device's memory when the run starts (inflq.batching), then recorded.
    # A batch_size alone fixes the number of sequences, as before token budgets existed.
    batch_size: int | None = None
    batch_tokens: int | None = None
    shard_size: int = 512
    refit: bool = False
    # GB of sums one fitting pass may hold (per worker and on the driver): above it, factors are
    # fitted by module, one group of modules per pass (FitContext.groups). None: no limit.
    fit_memory: float | None = None

    def resolve_defaults(self, registry) -> RunSettings:
        """Fill the plugins left to the registry (``Registry.default``) in place; returns self."""
        for kind in ("estimator", "filter", "executor"):
            if getattr(self, kind) is None:
                setattr(self, kind, registry.default(kind))
        return self

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)

    def batching(self) -> Batching:
        """How run_shard batches this run's sequences (after :meth:`resolve_batching`)."""
        if self.batch_size is None and self.batch_tokens is None:
            raise RuntimeError("the run's batching is chosen when it starts: call resolve_batching(engine, project) first")
        return Batching(tokens=self.batch_tokens, sequences=self.batch_size)

    def resolve_batching(self, engine: GradientEngine, project: Project) -> bool:
        """Fill in the batching left to inflq (see :mod:`inflq.batching`); True if it changed."""
        if self.batch_size is not None or self.batch_tokens is not None:
            return False
        auto = auto_batching(engine, project.config.max_length)
        self.batch_tokens, self.batch_size = auto.tokens, auto.sequences
        return True

    @classmethod
    def from_json(cls, text: str, **overrides: Any) -> RunSettings:
        """Settings recorded with a run. Runs recorded before ``full_rank_mb`` existed compressed
        every module, so they are read back that way and recompute the same scores."""
        return cls(**{"full_rank_mb": 0, **json.loads(text), **overrides})
