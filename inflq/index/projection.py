"""Per-module Kronecker projections of the gradient index: ``P_A [k_a, in_dim]``, ``P_S [k_s, out]``.

A sequence's gradient ``DW = Σ_t g_t ā_tᵀ`` is stored as ``P_S DW P_Aᵀ = Σ_t (P_S g_t)(P_A ā_t)ᵀ``
(LoGra): each token is projected first, ``T·(k_s·out + k_a·in)`` multiply-adds, and no ``DW`` is
formed. Kinds:

* ``gaussian``: i.i.d. ``N(0, 1/k)`` entries (Johnson-Lindenstrauss: inner products unbiased);
* ``orthogonal``: the same Gaussian draw with its rows orthonormalised, scaled by ``sqrt(dim/k)``
  (unbiased too, and distance-preserving at full width, where it is an exact rotation);
* ``eigen``: the top-``k`` eigenvectors of the covariances ``A`` and ``S`` (needs a full-width
  covariance pass; see :mod:`inflq.index.fit`).

Random kinds are drawn on the CPU from a generator seeded by ``(seed, module, side)``: the same
seed gives the same projections on any machine, and they are stored with the index anyway.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch

from ..engine import TrackedModule
from ..errors import InflqError

KINDS = ("orthogonal", "gaussian", "eigen")
# Default storage per sequence: float16 values plus 16 bytes per row (a float32 scale and
# self-influence, the int64 corpus index). 64 KB: chosen from the budget curves by ground truth
# (docs/gradient-index.md, "Choosing the default budget and depth"): the smallest budget whose
# top 5 % of the corpus holds 0.9 of exact EK-FAC's top 10 (4 KB holds 0.3).
BUDGET_BYTES = 65536
SIDE_BYTES = 16


def default_sizes(tracked: Sequence[TrackedModule], budget_bytes: int = BUDGET_BYTES) -> dict[str, tuple[int, int]]:
    """``{module: (k_s, k_a)}`` sharing ``budget_bytes`` per sequence equally between modules:
    ``k_s = floor(sqrt(v))``, ``k_a = floor(v / k_s)`` with ``v`` float16 values per module, each
    capped at the module's own width."""
    values = (int(budget_bytes) - SIDE_BYTES) // 2 // max(1, len(tracked))
    if values < 1:
        raise InflqError(f"a budget of {budget_bytes} bytes per sequence leaves no room for {len(tracked)} modules")
    ks = max(1, math.isqrt(values))
    ka = max(1, values // ks)
    return {t.name: (min(ks, t.out_features), min(ka, t.in_dim)) for t in tracked}


def module_seed(seed: int, name: str, side: str) -> int:
    """A 63-bit seed for one module's projection on one side (``a`` or ``s``)."""
    digest = hashlib.sha256(f"{int(seed)}:{name}:{side}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFFFFFFFFFFFFFF


def random_projection(k: int, dim: int, seed: int, kind: str) -> torch.Tensor:
    """A ``[k, dim]`` float32 projection of a random kind (``gaussian`` or ``orthogonal``)."""
    if not 1 <= k <= dim:
        raise InflqError(f"a projection to {k} dimensions of a {dim}-wide space: choose 1 <= k <= {dim}")
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    draw = torch.randn((dim, k), generator=gen, dtype=torch.float64)
    if kind == "gaussian":
        return (draw.T / math.sqrt(k)).to(torch.float32)
    if kind == "orthogonal":
        q, r = torch.linalg.qr(draw)  # [dim, k], orthonormal columns; signs fixed by R's diagonal
        q = q * torch.sign(torch.diagonal(r))[None, :]
        return (q.T * math.sqrt(dim / k)).to(torch.float32)
    raise InflqError(f"unknown random projection kind {kind!r}; choose {', '.join(KINDS[:2])}")


def top_eigenvectors(matrix: torch.Tensor, k: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The ``[k, dim]`` top eigenvectors (rows, largest eigenvalue first) of a symmetric matrix
    (read from its upper triangle), computed in float64 (see :func:`inflq.linalg.eigh`)."""
    from ..linalg import eigh

    _, vectors = eigh(matrix, device)
    return vectors[:, -k:].flip(1).T.contiguous().to(torch.float32)


def random_projections(tracked: Sequence[TrackedModule], sizes: dict[str, tuple[int, int]], seed: int, kind: str) -> dict[str, torch.Tensor]:
    """``{"ps/<module>": [k_s, out], "pa/<module>": [k_a, in_dim]}`` for a random kind."""
    out = {}
    for t in tracked:
        ks, ka = sizes[t.name]
        out[f"ps/{t.name}"] = random_projection(ks, t.out_features, module_seed(seed, t.name, "s"), kind)
        out[f"pa/{t.name}"] = random_projection(ka, t.in_dim, module_seed(seed, t.name, "a"), kind)
    return out
