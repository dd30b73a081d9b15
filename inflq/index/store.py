"""The index on disk: a folder named by a content hash, rows as float16 memory-mapped shards.

Layout of ``<root>/index-<key>/``:

* ``model.safetensors``: the projections and projected preconditioner (:class:`IndexModel`),
  with its settings in the file's metadata;
* ``indices.npy``: the corpus indices the rows cover, in row order (int64);
* ``rows-NNNNNN.npy``: one shard's rows ``[n, width]``, float16, each row divided by its scale;
* ``side-NNNNNN.npy``: per row, float32 ``(scale, self-influence)``: a row is
  ``scale × rows[i]`` (per-row scaling keeps float16 clear of overflow and underflow), and its
  self-influence ``rowᵀ (G' + λI)⁻¹ row`` (at the damping of the build) serves the cosine;
* ``manifest.json``: the settings, the key's source and the committed shards with the SHA-256 of
  their files. A shard counts only once the manifest names it, and every file is written to a
  temporary name, synced and renamed first, so a crash loses no committed shard;
* ``faiss-<metric>-ivf<nlist>-sq8.index``: where approximate search was asked for, its FAISS index
  (:mod:`inflq.index.approx`), built from the complete shards.

Bytes per sequence: ``2 × width + 16`` (with the index in ``indices.npy``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..artifacts import load_tensors, save_tensors
from ..errors import InflqError
from ..modeling import sha256_file
from .fit import IndexModel

MANIFEST = "manifest.json"
MODEL = "model.safetensors"
FORMAT = 1


def index_key(source: dict) -> str:
    """The content hash that names an index: of everything that determines its rows and factors
    (settings, modules, model and corpus fingerprints, fitting data, covered indices, seed, dtype)."""
    return hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:24]


def indices_fingerprint(indices: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(indices, dtype=np.int64).tobytes()).hexdigest()[:32]


def key_source(
    settings, modules: list[str], model_fingerprint: str, corpus_fingerprint: str, fit_indices: np.ndarray, indices: np.ndarray,
    seed: int, dtype: str,
) -> dict:
    """What :func:`index_key` hashes, laid out as a factor set's cache key is (``settings`` an
    :class:`IndexSettings`; its damping is left out: it changes no stored tensor)."""
    return {
        "index": settings.factor_settings(), "modules": list(modules), "model": model_fingerprint, "corpus": corpus_fingerprint,
        "fit_data": indices_fingerprint(fit_indices), "rows": indices_fingerprint(indices), "seed": int(seed), "dtype": str(dtype),
    }


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_npy(path: Path, array: np.ndarray) -> str:
    _atomic(path, lambda f: np.save(f, array, allow_pickle=False))
    return sha256_file(path)


@dataclass(frozen=True)
class Block:
    """A block of stored rows: ``rows[i]`` (float16, memory-mapped) × ``scale[i]`` is the projected
    gradient of corpus sequence ``indices[i]``; ``start`` is its first row number."""

    start: int
    indices: np.ndarray
    rows: np.ndarray
    scale: np.ndarray
    self_influence: np.ndarray


class IndexStore:
    """One index folder: create it, commit shards, read them back."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._manifest: dict | None = None
        self._model: IndexModel | None = None
        self._indices: np.ndarray | None = None

    # -- creating ---------------------------------------------------------------------------------
    @classmethod
    def create(cls, root: Path, key: str, model: IndexModel, indices: np.ndarray, shard_size: int, source: dict | None = None) -> IndexStore:
        """The folder for ``key`` under ``root``, made if absent. An existing one (an interrupted
        build) is kept as it is: its committed shards are reused."""
        path = Path(root) / f"index-{key}"
        store = cls(path)
        if (path / MANIFEST).exists():
            m = store.manifest
            if m["key"] != key or m["indices"] != indices_fingerprint(indices) or m["shard_size"] != int(shard_size):
                raise InflqError(f"the index folder {path} holds another index; remove it")
            return store
        path.mkdir(parents=True, exist_ok=True)
        checksum = save_tensors(path, MODEL, model.tensors(), model.metadata())
        idx_sum = _save_npy(path / "indices.npy", np.ascontiguousarray(indices, dtype=np.int64))
        store._write_manifest({
            "format": FORMAT, "key": key, "source": source or {}, "settings": json.loads(model.settings.to_json()),
            "modules": model.names, "sizes": {n: list(s) for n, s in model.sizes.items()}, "width": model.width,
            "num_rows": int(len(indices)), "shard_size": int(shard_size), "indices": indices_fingerprint(indices),
            "model_sha256": checksum, "indices_sha256": idx_sum, "dampings": model.dampings, "shards": {},
        })
        return store

    def _write_manifest(self, manifest: dict) -> None:
        text = json.dumps(manifest, indent=1, sort_keys=True).encode()
        _atomic(self.path / MANIFEST, lambda f: f.write(text))
        self._manifest = manifest

    def commit(self, shard: int, rows: torch.Tensor, self_influence: torch.Tensor) -> None:
        """Store shard ``shard``'s rows ``[n, width]`` (float32) and self-influences ``[n]``."""
        n = len(self.shard_rows(shard))
        rows = rows.detach().to("cpu", torch.float32)
        if rows.shape != (n, self.width):
            raise InflqError(f"index shard {shard}: {tuple(rows.shape)} rows where {(n, self.width)} were due")
        scale = rows.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
        scaled = (rows / scale[:, None]).to(torch.float16).numpy()
        side = torch.stack([scale, self_influence.detach().to("cpu", torch.float32)], dim=1).numpy()
        entry = {
            "n": n,
            "rows_sha256": _save_npy(self.path / f"rows-{shard:06d}.npy", scaled),
            "side_sha256": _save_npy(self.path / f"side-{shard:06d}.npy", side),
        }
        manifest = dict(self.manifest)
        manifest["shards"] = {**manifest["shards"], str(shard): entry}
        self._write_manifest(manifest)

    # -- reading ----------------------------------------------------------------------------------
    @property
    def manifest(self) -> dict:
        if self._manifest is None:
            try:
                self._manifest = json.loads((self.path / MANIFEST).read_text())
            except (OSError, ValueError) as exc:
                raise InflqError(f"no readable index at {self.path} ({exc})") from None
        return self._manifest

    @property
    def key(self) -> str:
        return self.manifest["key"]

    @property
    def width(self) -> int:
        return int(self.manifest["width"])

    @property
    def num_rows(self) -> int:
        return int(self.manifest["num_rows"])

    @property
    def num_shards(self) -> int:
        size = int(self.manifest["shard_size"])
        return (self.num_rows + size - 1) // size

    def shard_rows(self, shard: int) -> range:
        size = int(self.manifest["shard_size"])
        return range(shard * size, min(self.num_rows, (shard + 1) * size))

    def committed(self) -> set[int]:
        """Shards whose files the manifest names and that exist with the recorded length."""
        out = set()
        for s, entry in self.manifest["shards"].items():
            i = int(s)
            if i < self.num_shards and entry["n"] == len(self.shard_rows(i)) and (self.path / f"rows-{i:06d}.npy").exists():
                out.add(i)
        return out

    @property
    def complete(self) -> bool:
        return len(self.committed()) == self.num_shards

    @property
    def indices(self) -> np.ndarray:
        if self._indices is None:
            self._indices = np.load(self.path / "indices.npy", allow_pickle=False)
        return self._indices

    def model(self, **overrides) -> IndexModel:
        """The projections and preconditioner (checksum verified); ``overrides`` as in
        :meth:`IndexModel.from_tensors` (e.g. another ``damping``)."""
        if self._model is None or overrides:
            tensors = load_tensors(self.path, MODEL, self.manifest["model_sha256"], "index model")
            from safetensors import safe_open

            with safe_open(str(self.path / MODEL), framework="pt") as f:
                meta = f.metadata()
            model = IndexModel.from_tensors(tensors, meta, **overrides)
            if overrides:
                return model
            self._model = model
        return self._model

    def verify(self) -> list[int]:
        """Shards whose files fail their recorded checksums (reading every byte)."""
        bad = []
        for i in sorted(self.committed()):
            e = self.manifest["shards"][str(i)]
            if sha256_file(self.path / f"rows-{i:06d}.npy") != e["rows_sha256"] or sha256_file(self.path / f"side-{i:06d}.npy") != e["side_sha256"]:
                bad.append(i)
        return bad

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())

    def summary(self) -> dict:
        """What a listing shows: key, settings, sizes, rows committed and bytes on disk."""
        m = self.manifest
        done = self.committed()
        size = self.size_bytes()
        rows = sum(len(self.shard_rows(i)) for i in done)
        return {
            "key": m["key"], "path": str(self.path), "settings": m["settings"], "modules": len(m["modules"]), "width": m["width"],
            "num_rows": m["num_rows"], "rows_done": rows, "complete": len(done) == self.num_shards, "size_bytes": size,
            "bytes_per_sequence": 2 * m["width"] + 16,
        }

    def rows_at(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The stored rows (float16), scales and self-influences at the sorted row ``positions``,
        read memory-mapped shard by shard (what approximate search re-scores)."""
        if not self.complete:
            raise InflqError(f"the index at {self.path} is incomplete; resume its build")
        positions = np.asarray(positions, dtype=np.int64)
        size = int(self.manifest["shard_size"])
        rows = np.empty((len(positions), self.width), dtype=np.float16)
        side = np.empty((len(positions), 2), dtype=np.float32)
        shard_of = positions // size
        for i in np.unique(shard_of):
            at = np.flatnonzero(shard_of == i)
            local = positions[at] - i * size
            rows[at] = np.load(self.path / f"rows-{i:06d}.npy", mmap_mode="r", allow_pickle=False)[local]
            side[at] = np.load(self.path / f"side-{i:06d}.npy", mmap_mode="r", allow_pickle=False)[local]
        return rows, side[:, 0], side[:, 1]

    def blocks(self, block_rows: int = 8192) -> Iterator[Block]:
        """The stored rows, memory-mapped, ``block_rows`` at a time (never loaded whole)."""
        if not self.complete:
            missing = self.num_shards - len(self.committed())
            raise InflqError(f"the index at {self.path} is incomplete ({missing} of {self.num_shards} shards missing); resume its build")
        block_rows = max(1, int(block_rows))
        for i in range(self.num_shards):
            r = self.shard_rows(i)
            rows = np.load(self.path / f"rows-{i:06d}.npy", mmap_mode="r", allow_pickle=False)
            side = np.load(self.path / f"side-{i:06d}.npy", mmap_mode="r", allow_pickle=False)
            for s in range(0, len(r), block_rows):
                e = min(len(r), s + block_rows)
                yield Block(r.start + s, self.indices[r.start + s : r.start + e], rows[s:e], np.asarray(side[s:e, 0]), np.asarray(side[s:e, 1]))
