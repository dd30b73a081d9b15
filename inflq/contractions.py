"""Query gradients and the contractions that turn training-token captures into scores.

A training sequence's score against a query is ``Σ_modules Σ_t g_tᵀ Q ā_t`` with ``Q`` the query's
preconditioned gradient. Which way to contract is chosen per module by counting multiply-adds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from .engine import Captured


def _truncated_svd(q: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` truncated SVD of ``q [nq, out, in]`` as ``(U_r S_r, V_r)``, through the float64
    eigendecomposition of the Gram matrix on the narrower side: the same factors as
    ``torch.linalg.svd`` to ~1e-14 (signs aside), about 3x faster on CPU for 64 queries."""
    _, out, inn = q.shape
    if inn <= out:
        _, v = torch.linalg.eigh(q.transpose(1, 2) @ q)
        right = v[..., -rank:].flip(-1)  # top right singular vectors V_r
        return q @ right, right
    _, u = torch.linalg.eigh(q @ q.transpose(1, 2))
    u = u[..., -rank:].flip(-1)  # top left singular vectors U_r
    vs = q.transpose(1, 2) @ u  # V_r S_r
    s = vs.norm(dim=1, keepdim=True)
    # Directions with no singular value (q of rank < r) get zero factors rather than noise.
    keep = s > 1e-12 * s.amax(dim=2, keepdim=True)
    right = torch.where(keep, vs / s.clamp_min(torch.finfo(q.dtype).tiny), torch.zeros_like(vs))
    return u * (s * keep), right


def compresses(rank: int | None, out: int, inn: int) -> bool:
    """Whether a rank-``rank`` factorisation of an ``out × inn`` matrix is smaller than the matrix."""
    return rank is not None and rank < min(out, inn) and rank * (out + inn) < out * inn


@dataclass(frozen=True)
class Compression:
    """How a batch of preconditioned query gradients is held: the paper's rank-``rank`` query
    batching, or full rank where that is cheaper.

    A module is kept at full rank when a rank-``rank`` factorisation would be no smaller, or when
    ``tokens`` (the typical length of the sequences to be scored) is known and scoring would
    contract through each sequence's gradient anyway (:meth:`QueryGradients.contraction` picks
    ``"dw"`` at that length): then the factors would only be multiplied back out, and full rank is
    both cheaper and exact. Full-rank modules are capped at ``full_rank_bytes`` in all (they are held
    in memory while scoring and saved with the run); modules beyond the cap are factorised.
    ``tokens=None`` compresses every module the factorisation makes smaller.
    """

    rank: int | None = 32
    tokens: float | None = None
    full_rank_bytes: int = 1 << 30
    # The modules kept at full rank, decided beforehand (:meth:`fixed`): the same for every part of
    # a batch of queries preconditioned a few at a time.
    full_rank: frozenset[str] | None = None

    @classmethod
    def of(cls, rank: int | None | Compression) -> Compression:
        return rank if isinstance(rank, Compression) else cls(rank=rank)

    def fixed(self, shapes: dict[str, tuple[int, int, int]]) -> Compression:
        """This compression with its full-rank modules planned once, for all ``shapes`` (``name ->
        (nq, out, in)`` of the whole batch of queries), so that parts of the batch compressed apart
        are held alike and join (:meth:`QueryGradients.concat`)."""
        return dataclasses.replace(self, full_rank=frozenset(self.plan(shapes)))

    def plan(self, shapes: dict[str, tuple[int, int, int]]) -> set[str]:
        """The modules (``name -> (nq, out, in)``) to keep at full rank."""
        if self.full_rank is not None:
            return set(self.full_rank) & set(shapes)
        full: set[str] = set()
        budget = self.full_rank_bytes
        for name, (nq, out, inn) in shapes.items():
            if not compresses(self.rank, out, inn):
                full.add(name)
                continue
            if self.tokens is None:
                continue
            T = max(1.0, float(self.tokens))
            if dw_is_cheaper(T, nq, out, inn, self.rank) and nq * out * inn * 4 <= budget:
                full.add(name)
                budget -= nq * out * inn * 4
        return full


def dw_is_cheaper(tokens: float, nq: int, out: int, inn: int, rank: int) -> bool:
    """Per sequence: forming ``DW`` and one dot per query costs ``out·in·(T + nq)`` multiply-adds;
    rank-``r`` per-token factors cost ``T·nq·r·(out + in + 1)``."""
    return out * inn * (tokens + nq) < tokens * nq * rank * (out + inn + 1)


@dataclass
class QueryGradients:
    """Preconditioned gradients of a batch of queries' measurements, one entry per tracked module.

    A module is held either at full rank (``full[name]``: ``[nq, out, in_dim]``) or as a rank-``r``
    factorisation ``Q ≈ left @ rightᵀ`` (``left[name]``: ``[nq, out, r]``, ``right[name]``:
    ``[nq, in_dim, r]``), the paper's query batching. Full rank is kept wherever it is no larger.
    """

    full: dict[str, torch.Tensor] = field(default_factory=dict)
    left: dict[str, torch.Tensor] = field(default_factory=dict)
    right: dict[str, torch.Tensor] = field(default_factory=dict)
    rank: int | None = None
    _dense_cache: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _flat_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_preconditioned(cls, grads: dict[str, torch.Tensor], rank: int | None | Compression = 32) -> QueryGradients:
        """Compress ``grads`` (``[nq, out, in_dim]`` per module) to rank ``rank`` (``None``: keep full;
        a :class:`Compression`: full rank where that is cheaper)."""
        policy = Compression.of(rank)
        rank = policy.rank
        full = policy.plan({n: tuple(q.shape) for n, q in grads.items()})
        qg = cls(rank=rank)
        for name, q in grads.items():
            q = q.to(torch.float32)
            if name in full:
                qg.full[name] = q.contiguous()
                continue
            left, right = _truncated_svd(q.to(torch.float64), rank)
            qg.left[name] = left.to(torch.float32).contiguous()
            qg.right[name] = right.to(torch.float32).contiguous()
        return qg

    @classmethod
    def from_eigenbasis(
        cls,
        rotated: dict[str, torch.Tensor],
        qs: dict[str, torch.Tensor],
        qa: dict[str, torch.Tensor],
        rank: int | None | Compression = 32,
    ) -> QueryGradients:
        """Build from preconditioned gradients still in a Kronecker eigenbasis, ``Q = Q_S R Q_Aᵀ``.

        Because ``Q_S`` and ``Q_A`` are orthogonal, the rank-``r`` SVD of ``Q`` is that of ``R`` with
        its factors rotated back (``Q_S U``, ``Q_A V``): only ``r`` columns are rotated instead of the
        full matrix, which halves the cost of preconditioning a batch of queries."""
        policy = Compression.of(rank)
        rank = policy.rank
        full = policy.plan({n: tuple(r.shape) for n, r in rotated.items()})
        qg = cls(rank=rank)
        for name, r in rotated.items():
            s_basis = qs[name].to(r.device, torch.float32)
            a_basis = qa[name].to(r.device, torch.float32)
            if name in full:
                qg.full[name] = (s_basis @ r.to(torch.float32) @ a_basis.T).contiguous()
                continue
            left, right = _truncated_svd(r.to(torch.float64), rank)
            qg.left[name] = (s_basis @ left.to(torch.float32)).contiguous()
            qg.right[name] = (a_basis @ right.to(torch.float32)).contiguous()
        return qg

    @classmethod
    def concat(cls, parts: list[QueryGradients]) -> QueryGradients:
        """Join batches of queries held alike (the same modules at full rank, the same rank), in
        order: what preconditioning a few queries at a time (:func:`inflq.runs.preconditioned_query_gradients`)
        puts back together."""
        first = parts[0]
        for p in parts[1:]:
            if set(p.full) != set(first.full) or set(p.left) != set(first.left) or p.rank != first.rank:
                raise ValueError("query gradients held differently (full rank, rank) cannot be joined")
        if len(parts) == 1:
            return first
        return cls(
            {k: torch.cat([p.full[k] for p in parts]) for k in first.full},
            {k: torch.cat([p.left[k] for p in parts]) for k in first.left},
            {k: torch.cat([p.right[k] for p in parts]) for k in first.right},
            first.rank,
        )

    @property
    def names(self) -> list[str]:
        return list(self.full) + list(self.left)

    @property
    def num_queries(self) -> int:
        t = next(iter(self.full.values()), None)
        if t is None:
            t = next(iter(self.left.values()))
        return int(t.shape[0])

    def dense(self, name: str) -> torch.Tensor:
        """``Q`` at full size (reconstructed from its factors where compressed)."""
        if name in self.full:
            return self.full[name]
        if name not in self._dense_cache:
            self._dense_cache[name] = torch.einsum("qor,qir->qoi", self.left[name], self.right[name])
        return self._dense_cache[name]

    def to(self, device: torch.device | str) -> QueryGradients:
        return QueryGradients(
            {k: v.to(device) for k, v in self.full.items()},
            {k: v.to(device) for k, v in self.left.items()},
            {k: v.to(device) for k, v in self.right.items()},
            self.rank,
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat tensor dict for a safetensors artifact."""
        out = {f"full/{k}": v for k, v in self.full.items()}
        out.update({f"left/{k}": v for k, v in self.left.items()})
        out.update({f"right/{k}": v for k, v in self.right.items()})
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], rank: int | None) -> QueryGradients:
        qg = cls(rank=rank)
        for key, v in tensors.items():
            kind, _, name = key.partition("/")
            getattr(qg, kind)[name] = v
        return qg

    # -- contractions -------------------------------------------------------------------------
    def contraction(self, name: str, batch: int, tokens: int) -> str:
        """``"dw"`` (form each sequence's gradient, then dot) or ``"lowrank"`` (per-token factors)."""
        if name in self.full:
            return "dw"
        out, r = self.left[name].shape[1:]
        inn = self.right[name].shape[1]
        return "dw" if dw_is_cheaper(tokens, self.num_queries, out, inn, r) else "lowrank"

    def dot(self, name: str, dw: torch.Tensor) -> torch.Tensor:
        """Scores ``[B, nq]`` of flattened sequence gradients ``dw [B, out · in_dim]``."""
        return dw @ self.dense(name).reshape(self.num_queries, -1).T

    def _flat_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``U`` and ``V`` of all queries side by side, ``[out, nq·r]`` and ``[in_dim, nq·r]``."""
        if name not in self._flat_cache:
            self._flat_cache[name] = tuple(  # type: ignore[assignment]
                f.permute(1, 0, 2).reshape(f.shape[1], -1).contiguous() for f in (self.left[name], self.right[name])
            )
        return self._flat_cache[name]

    def lowrank_scores(self, name: str, cap: Captured) -> torch.Tensor:
        """Scores ``[B, nq]`` through rank-r per-token factors ``(Uᵀ g_t)·(Vᵀ ā_t)``: two matrix
        products over all tokens and queries at once."""
        B, T, out = cap.gradients.shape
        u, v = self._flat_factors(name)
        gu = cap.gradients.reshape(B * T, out) @ u
        gu *= cap.activations.reshape(B * T, -1) @ v
        return gu.view(B, T, self.num_queries, -1).sum(dim=(1, 3))

    def module_scores(self, name: str, cap: Captured) -> torch.Tensor:
        """Scores ``[B, nq]`` of the captured sequences from one module."""
        B, T, _ = cap.activations.shape
        if self.contraction(name, B, T) == "dw":
            return self.dot(name, cap.sequence_gradients().flatten(1))
        return self.lowrank_scores(name, cap)

    def token_scores(self, name: str, cap: Captured) -> torch.Tensor:
        """Per-token contributions ``[B, T, nq]`` from one module; they sum to :meth:`module_scores`."""
        A, G = cap.activations, cap.gradients
        if name in self.full:
            return torch.einsum("bto,qoi,bti->btq", G, self.full[name], A)
        gu = torch.einsum("bto,qor->btqr", G, self.left[name])
        av = torch.einsum("bti,qir->btqr", A, self.right[name])
        return (gu * av).sum(dim=3)
