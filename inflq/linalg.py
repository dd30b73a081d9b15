"""Dense linear algebra where a library routine beats the obvious torch expression.

``eigh(m, device)`` decomposes a covariance in float64 on the model's device where that device
computes float64 eigendecompositions (CUDA: an 8192² one took 98 s at one CPU thread), else on
the CPU (MPS has no float64).

``gram(x)`` computes ``xᵀx``, the covariance sums of factor fitting. torch has no symmetric
rank-k update, so ``x.T @ x`` computes both triangles; on the CPU the BLAS routine ``?syrk``
(through SciPy, already a dependency of scikit-learn) computes one, half the multiply-adds,
measured 1.5-2x faster for the widths of transformer layers from about 256 on (below, torch's
product is faster: 129 wide, 1.7 against 2.5 ms for 4,096 rows), on one thread (see
:mod:`inflq.threads` for why two thread pools must not take turns). Elsewhere (CUDA, MPS) it is a
matmul. ``out`` takes a buffer to write it into (no fresh memory per batch).

``pack_upper(m)`` / ``unpack_upper(p)``: a symmetric matrix's upper triangle as a vector, row by
row, and back; covariance sums are kept so, half the memory of the square.

``add_into(sums, part)`` adds a pass's partial sums into running ones in place, on the CPU
(``packed=True``: square parts into packed sums, their upper triangles only).
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


_SYRK_FROM = 256  # widths from which BLAS syrk beats torch's full product on one thread


def gram(x: torch.Tensor, symmetric: bool = True, out: torch.Tensor | None = None) -> torch.Tensor:
    """``xᵀ x`` for ``x [n, d]``, in ``x``'s dtype and on its device. With ``symmetric=False`` only
    the upper triangle is guaranteed (the lower may hold anything): sums of such matrices stay
    valid in their upper triangle, which is all ``torch.linalg.eigh(..., UPLO="U")`` reads, and
    the copy that mirrors a triangle (a quarter of the time of a 1024-wide update) is saved.
    ``out``: a contiguous ``[d, d]`` tensor of ``x``'s dtype and device to write into (returned).

    On the CPU in float32/float64, from ``_SYRK_FROM`` columns, the BLAS symmetric rank-k update
    runs on one thread: on torch's one thread, or (more torch threads) while torch's pool sleeps
    between operations (``OMP_WAIT_POLICY=PASSIVE``, :mod:`inflq.threads`); one BLAS thread never
    spins against torch's. Narrower, and on other devices, it is torch's product."""
    if x.dim() != 2:
        raise ValueError(f"gram expects a 2-D tensor, got shape {tuple(x.shape)}")
    d = x.shape[1]
    if out is not None and (out.shape != (d, d) or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous()):
        raise ValueError(f"gram's out must be a contiguous [{d}, {d}] {x.dtype} tensor on {x.device}")
    routines = (
        _syrk()
        if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and not x.requires_grad and d >= _SYRK_FROM
        else None
    )
    if routines is None or x.shape[0] == 0:
        upper = torch.mm(x.T, x, out=out) if out is not None else x.T @ x
        return upper if symmetric or out is None else out
    ssyrk, dsyrk, controller = routines
    syrk = ssyrk if x.dtype == torch.float32 else dsyrk
    # x is row-major [n, d], so x.numpy().T is a column-major [d, n] array: BLAS reads it in place
    # and returns the lower triangle of (xᵀ)(xᵀ)ᵀ = xᵀx in a column-major array (into ``out``'s
    # memory, seen column-major, where given). Its transpose is then a row-major array holding the
    # upper triangle: a contiguous tensor (pack_upper's masked selection runs 4.5 times slower on
    # the column-major one).
    xt = x.contiguous().numpy().T
    with controller.limit(limits=1, user_api="blas"):
        if out is None:
            upper = torch.from_numpy(syrk(1.0, xt, trans=0, lower=1).T)
        else:
            c = out.numpy().T
            if syrk(1.0, xt, beta=0.0, c=c, trans=0, lower=1, overwrite_c=1).ctypes.data != c.ctypes.data:  # pragma: no cover
                raise RuntimeError("BLAS syrk did not write into the buffer given")
            upper = out
    if not symmetric:
        return upper
    if out is not None:  # the lower triangle holds what the buffer held before
        out.copy_(torch.triu(upper) + torch.triu(upper, 1).T)
        return out
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


_upper_indices: dict[tuple[int, str], torch.Tensor] = {}
_TAKE_UP_TO = 1024  # widths whose upper-triangle indices are kept (8 MiB at 1,024); wider: a copy per row


def add_upper(packed: torch.Tensor, square: torch.Tensor) -> torch.Tensor:
    """``packed += pack_upper(square)`` in place (``square``'s upper triangle, widened to
    ``packed``'s dtype exactly), without a packed copy of ``square``: one gathered read through
    cached indices for widths up to ``_TAKE_UP_TO``, a row at a time beyond (where a row is long
    enough that the per-row call costs little). Returns ``packed``."""
    n = square.shape[0]
    if square.dim() != 2 or square.shape[1] != n or packed.shape != (n * (n + 1) // 2,):
        raise ValueError(f"cannot add a {tuple(square.shape)} matrix's upper triangle into {tuple(packed.shape)} packed values")
    if n <= _TAKE_UP_TO or square.device.type != "cpu":
        key = (n, str(square.device))
        idx = _upper_indices.get(key)
        if idx is None:
            rows, cols = torch.triu_indices(n, n, device=square.device)
            idx = _upper_indices[key] = rows * n + cols
        packed += torch.take(square, idx).to(packed.device)
        return packed
    start = 0
    for i in range(n):
        packed[start : start + n - i] += square[i, i:]
        start += n - i
    return packed


class DeviceSums(dict):
    """Running sums kept on a device: :func:`add_into` starts new sums there (``device``) instead of
    on the CPU. :func:`inflq.passes.run_shard` sums a shard's batches in one on an accelerator and
    adds it into the CPU's running sums once, at the shard's end: a batch's float64 additions then
    run on the device, and its sums cross to the host once per shard, not once per batch."""

    def __init__(self, device: torch.device | str) -> None:
        super().__init__()
        self.device = torch.device(device)


def add_into(
    sums: dict[str, torch.Tensor], part: dict[str, torch.Tensor], dtype: torch.dtype | None = None, packed: bool = False
) -> dict[str, torch.Tensor]:
    """``sums[k] += part[k]`` in place, where each sum is (on the CPU, or on ``sums.device`` for a
    :class:`DeviceSums`); a key seen for the first time starts its sum as a copy in ``dtype``
    (default: the part's). A float32 part added to a float64 sum is widened exactly, so summing
    float32 pieces into float64 equals summing their float64 copies. ``packed=True``: each part is
    a square matrix whose upper triangle is what counts, and its sum a packed upper triangle
    (:func:`pack_upper`; a running sum that is still square is packed first) — the same sums as
    adding ``pack_upper(part)``, without making that copy."""
    where = getattr(sums, "device", None) or torch.device("cpu")
    if packed:
        for k, v in part.items():
            have = sums.get(k)
            if have is not None and have.dim() == 2:
                have = sums[k] = pack_upper(have)
            if have is None:
                sums[k] = pack_upper(v.detach()).to(where, dtype or v.dtype, copy=True)
            else:
                add_upper(have, v.detach())  # gathered where the square is: half of it crosses devices
        return sums
    for k, v in part.items():
        have = sums.get(k)
        if have is None:
            sums[k] = v.detach().to(where, dtype or v.dtype, copy=True)
            continue
        if have.dim() == 2 and v.dim() == 1 and have.shape[0] == have.shape[1]:  # a square sum from before the packing
            have = sums[k] = pack_upper(have)
        have += v.detach().to(have.device)
    return sums
