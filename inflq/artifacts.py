"""Bulky tensors live in safetensors files under ``artifacts/``; the catalog holds their paths
(relative to the project) and SHA-256 checksums, verified on every load. Never pickle."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import InflqError
from .modeling import sha256_file


def save_tensors(root: Path, relpath: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Write atomically (temporary file, then rename) and return the file's checksum."""
    path = Path(root) / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return sha256_file(path)


def load_tensors(root: Path, relpath: str, checksum: str | None, what: str = "artifact") -> dict[str, torch.Tensor]:
    """Load and verify. A missing or altered file is an error that names it, never a silent recompute."""
    path = Path(root) / relpath
    if not path.exists():
        raise InflqError(f"the {what} {relpath} is missing from the project; recompute it (rerun with --refit)")
    if checksum is not None and sha256_file(path) != checksum:
        raise InflqError(f"the {what} {relpath} fails its checksum (corrupted or altered); delete it and rerun with --refit")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise InflqError(f"the {what} {relpath} cannot be read ({exc}); delete it and rerun with --refit") from None
