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

``add_into(sums, part)`` adds a pass's partial sums into running ones in place, on the CPU.
"""

from __future__ import annotations

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
    # and returns the upper triangle of (xᵀ)(xᵀ)ᵀ = xᵀx, the lower triangle left zero.
    xt = x.contiguous().numpy().T
    with controller.limit(limits=1, user_api="blas"):
        upper = torch.from_numpy(syrk(1.0, xt, trans=0))
    if not symmetric:
        return upper
    full = upper + upper.T
    full.diagonal().mul_(0.5)
    return full


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
