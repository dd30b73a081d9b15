"""Bulky tensors live in safetensors files under ``artifacts/``; the catalog holds their paths
(relative to the project) and SHA-256 checksums, verified on every load. Never pickle."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import InflqError
from .modeling import sha256_file

if TYPE_CHECKING:  # torch loads where tensors are saved or loaded as tensors (load_arrays needs only NumPy)
    import numpy as np
    import torch


def save_tensors(root: Path, relpath: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Write atomically (temporary file, then rename) and return the file's checksum."""
    from safetensors.torch import save_file

    path = Path(root) / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return sha256_file(path)


def _verified(root: Path, relpath: str, checksum: str | None, what: str) -> Path:
    path = Path(root) / relpath
    if not path.exists():
        raise InflqError(f"the {what} {relpath} is missing from the project; recompute it (rerun with --refit)")
    if checksum is not None and sha256_file(path) != checksum:
        raise InflqError(f"the {what} {relpath} fails its checksum (corrupted or altered); delete it and rerun with --refit")
    return path


def _load(root: Path, relpath: str, checksum: str | None, what: str, load_file) -> dict:
    from safetensors import SafetensorError

    path = _verified(root, relpath, checksum, what)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise InflqError(f"the {what} {relpath} cannot be read ({exc}); delete it and rerun with --refit") from None


def load_tensors(root: Path, relpath: str, checksum: str | None, what: str = "artifact") -> dict[str, torch.Tensor]:
    """Load and verify. A missing or altered file is an error that names it, never a silent recompute."""
    from safetensors.torch import load_file

    return _load(root, relpath, checksum, what, load_file)


def load_arrays(root: Path, relpath: str, checksum: str | None, what: str = "artifact") -> dict[str, np.ndarray]:
    """:func:`load_tensors` as NumPy arrays, without importing torch (reading scores back)."""
    from safetensors.numpy import load_file

    return _load(root, relpath, checksum, what, load_file)
