"""Dense linear algebra where a library routine beats the obvious torch expression.

``eigh(m, device)`` decomposes a covariance in float64 on the model's device where that device
computes float64 eigendecompositions (CUDA: an 8192² one took 98 s at one CPU thread), else on
the CPU (MPS has no float64).

``gram(x)`` computes ``xᵀx``, the covariance sums of factor fitting. torch has no symmetric
rank-k update, so ``x.T @ x`` computes both triangles; on the CPU the BLAS routine ``?syrk``
(through SciPy, already a dependency of scikit-learn) computes one, half the multiply-adds,
measured 1.5-2x faster for the widths of transformer layers, when torch itself runs on one thread
(see :mod:`inflq.threads` for why two thread pools must not take turns). Elsewhere (more torch
threads, CUDA, MPS) it is a matmul.

``pack_upper(m)`` / ``unpack_upper(p)``: a symmetric matrix's upper triangle as a vector, row by
row, and back; covariance sums are kept so, half the memory of the square.

``add_into(sums, part)`` adds a pass's partial sums into running ones in place, on the CPU.
"""

from __future__ import annotations

import math
import threading

import torch

_lock = threading.Lock()
_blas: tuple | None = None


def _syrk():
    """SciPy's ``ssyrk``/``dsyrk`` and a thread-pool controller, or ``None`` where SciPy is missing."""
    global _blas
    with _lock:
        if _blas is None:
            try:
                from scipy.linalg import blas
                from threadpoolctl import ThreadpoolController

                _blas = (blas.ssyrk, blas.dsyrk, ThreadpoolController())
            except Exception:  # pragma: no cover - scipy and threadpoolctl come with scikit-learn
                _blas = ()
        return _blas or None


def gram(x: torch.Tensor, symmetric: bool = True) -> torch.Tensor:
    """``xᵀ x`` for ``x [n, d]``, in ``x``'s dtype and on its device. With ``symmetric=False`` only
    the upper triangle is guaranteed (the lower may be zero): sums of such matrices stay valid in
    their upper triangle, which is all ``torch.linalg.eigh(..., UPLO="U")`` reads, and the copy that
    mirrors a triangle (a quarter of the time of a 1024-wide update) is saved.

    On the CPU in float32/float64, when torch computes on one thread, the BLAS symmetric rank-k
    update runs on one thread too; with more torch threads the product stays in torch's pool (two
    pools in turn spin against each other: see :mod:`inflq.threads`)."""
    if x.dim() != 2:
        raise ValueError(f"gram expects a 2-D tensor, got shape {tuple(x.shape)}")
    routines = (
        _syrk()
        if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and not x.requires_grad and torch.get_num_threads() == 1
        else None
    )
    if routines is None or x.shape[0] == 0:
        return x.T @ x
    ssyrk, dsyrk, controller = routines
    syrk = ssyrk if x.dtype == torch.float32 else dsyrk
    # x is row-major [n, d], so x.numpy().T is a column-major [d, n] array: BLAS reads it in place
    # and returns the lower triangle of (xᵀ)(xᵀ)ᵀ = xᵀx in a column-major array, the upper left
    # zero. Its transpose is then a row-major array holding the upper triangle: a contiguous tensor
    # (pack_upper's masked selection runs 4.5 times slower on the column-major one).
    xt = x.contiguous().numpy().T
    with controller.limit(limits=1, user_api="blas"):
        upper = torch.from_numpy(syrk(1.0, xt, trans=0, lower=1).T)
    if not symmetric:
        return upper
    full = upper + upper.T
    full.diagonal().mul_(0.5)
    return full


_upper_masks: dict[tuple[int, str], torch.Tensor] = {}


def _upper_mask(n: int, device: torch.device) -> torch.Tensor:
    """The ``[n, n]`` boolean mask of the upper triangle (diagonal included), kept per size."""
    key = (n, str(device))
    mask = _upper_masks.get(key)
    if mask is None:
        mask = _upper_masks[key] = torch.ones(n, n, dtype=torch.bool, device=device).triu_()
    return mask


def pack_upper(matrix: torch.Tensor) -> torch.Tensor:
    """The upper triangle (diagonal included) of a square ``matrix``, row by row: a vector of
    ``n(n+1)/2`` entries, exactly the matrix's own values."""
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"pack_upper expects a square matrix, got shape {tuple(matrix.shape)}")
    n = matrix.shape[0]
    if matrix.device.type != "cpu":
        return matrix.masked_select(_upper_mask(n, matrix.device))
    # On the CPU a copy per row: 3 times faster than the masked selection (15 instead of 49 ms at
    # n = 3,072, one thread), and no mask to keep; on a GPU one kernel beats n small copies.
    out = matrix.new_empty(n * (n + 1) // 2)
    start = 0
    for i in range(n):
        out[start : start + n - i] = matrix[i, i:]
        start += n - i
    return out


def unpack_upper(packed: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The square matrix whose upper triangle ``packed`` holds (:func:`pack_upper`), zero below the
    diagonal (all that :func:`eigh` reads). A square matrix is returned as it is (in ``dtype``)."""
    if packed.dim() == 2:
        return packed.to(dtype or packed.dtype)
    n = (math.isqrt(8 * packed.numel() + 1) - 1) // 2
    if packed.dim() != 1 or n * (n + 1) // 2 != packed.numel():
        raise ValueError(f"{packed.numel()} entries are no packed upper triangle")
    out = torch.zeros(n, n, dtype=dtype or packed.dtype, device=packed.device)
    return out.masked_scatter_(_upper_mask(n, packed.device), packed.to(out.dtype))


def eigh(matrix: torch.Tensor, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues and eigenvectors, float64, of the symmetric matrix whose upper triangle is
    ``matrix``'s, returned on the CPU. Computed on ``device`` where it is a CUDA device (float64
    throughout; a failure there, e.g. no solver, falls back to the CPU); on the CPU elsewhere,
    since other accelerators (MPS) lack float64 ``eigh``."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        try:
            values, vectors = torch.linalg.eigh(matrix.to(device, torch.float64), UPLO="U")
            return values.cpu(), vectors.cpu()
        except (RuntimeError, AssertionError):  # out of memory, no cuSOLVER, CUDA not built in
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return torch.linalg.eigh(matrix.to("cpu", torch.float64), UPLO="U")


def add_into(sums: dict[str, torch.Tensor], part: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """``sums[k] += part[k]`` in place, on the CPU; a key seen for the first time starts its sum as
    a copy in ``dtype`` (default: the part's). A float32 part added to a float64 sum is widened
    exactly, so summing float32 pieces into float64 equals summing their float64 copies."""
    for k, v in part.items():
        v = v.detach().to("cpu")
        have = sums.get(k)
        if have is None:
            sums[k] = v.to(dtype or v.dtype, copy=True)
        else:
            have += v
    return sums
