"""Packing a project folder into one archive and unpacking it elsewhere, safely.

An archive is a tar file (gzip-compressed when its name ends in ``.gz``/``.tgz``) holding the
project's ``inflq.toml``, a consistent snapshot of its catalog (SQLite backup API, so a run may
keep writing while we pack), ``artifacts/``, the token store ``corpus/`` and local ``plugins/``;
optionally the model (under ``model/``, a LoRA adapter under ``adapter/``) and the corpus file (under ``data/``). Its last member,
``inflq-manifest.json``, lists every file with its size and SHA-256 and the project's fingerprints.

Unpacking trusts nothing in the archive: every member must be a regular file at a plain relative
path listed in the manifest with the same size and checksum; everything is written to a temporary
folder beside the destination and renamed into place only when all of it verified. Nothing from
the archive is executed (local plugins stay inert until ``inflq trust``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
import uuid
import zlib
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any

from . import catalog
from .errors import InflqError
from .progress import Monitor

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import tomli_w

MANIFEST = "inflq-manifest.json"
FORMAT = "inflq-pack"
FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 64 << 20
MODEL_DIR = "model"
ADAPTER_DIR = "adapter"  # a LoRA adapter travels with its base model (--include-model)
DATA_DIR = "data"
_CHUNK = 1 << 20
# Leftovers of interrupted atomic writes are never packed.
# Files being written: ours end in .tmp; safetensors (its Rust tempfile) writes `.tmpXXXXXX` first.
_SKIP = re.compile(r"(\.tmp$|\.tmp\.|\.tmp/|(^|/)\.tmp[^/]*$|\.bak-\d+$|-wal$|-shm$|-journal$)")


@dataclass
class PackResult:
    path: Path
    files: int
    bytes: int
    manifest: dict[str, Any]


class _HashingReader:
    """Reads a file object while hashing what went through (one pass for checksum and copy)."""

    def __init__(self, f) -> None:
        self.f = f
        self.h = hashlib.sha256()
        self.n = 0

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.h.update(data)
        self.n += len(data)
        return data


def _walk(folder: Path) -> list[Path]:
    """Regular files under ``folder`` (following links: packed as plain files), sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.endswith(".tmp"))
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if p.is_file():
                out.append(p)
    return out


def pack(
    project_dir: Path | str, archive: Path | str, *, include_model: bool = False, include_corpus: bool = False,
    exclude: tuple[str, ...] | list[str] = (), monitor: Monitor | None = None,
) -> PackResult:
    """Write ``project_dir`` to the archive ``archive`` (written to a temporary file, renamed at the end).
    ``exclude``: folders inside ``artifacts/`` to leave out (a plugin's rebuildable files, such as the
    gradient indexes under ``artifacts/index``); none may hold a file the catalog references."""
    from . import __version__
    from .integrity import referenced_artifacts
    from .project import ARTIFACTS, CATALOG_NAME, CONFIG_NAME, CORPUS_DIR, Project

    monitor = monitor or Monitor()
    excluded = []
    for e in exclude:
        rel = Path(str(e)).as_posix().strip("/")
        if rel.startswith("./"):
            rel = rel[2:]
        if not rel.startswith(f"{ARTIFACTS}/") or ".." in Path(rel).parts:
            raise InflqError(f"--exclude {e}: give a folder inside {ARTIFACTS}/ (e.g. {ARTIFACTS}/index)")
        excluded.append(rel.rstrip("/") + "/")
    project = Project.open(project_dir)
    root = project.root
    archive = Path(archive)
    if archive.resolve().is_relative_to(root.resolve()):
        raise InflqError(f"write the archive outside the project folder (not {archive})")
    if archive.exists() and archive.is_dir():
        raise InflqError(f"{archive} is a folder; give a file name such as project.tar.gz")
    config = project.config
    model_src, corpus_src = project.model_path, project.corpus_path
    if include_model:
        project.require_model()
    if include_corpus and not corpus_src.exists():
        raise InflqError(f"the corpus {corpus_src} is missing, so it cannot be included; pack without --include-corpus")
    # The archived inflq.toml points at what travels inside, and records where the rest was.
    packed_cfg = replace(config)
    packed_cfg.model = MODEL_DIR if include_model else str(model_src.resolve())
    adapter_src = project.adapter_path
    if adapter_src is not None:
        packed_cfg.adapter = ADAPTER_DIR if include_model else str(adapter_src.resolve())
    packed_cfg.corpus = f"{DATA_DIR}/{corpus_src.name}" if include_corpus else str(corpus_src.resolve())

    staging = Path(tempfile.mkdtemp(prefix="inflq-pack-"))
    tmp_archive = archive.with_name(f".{archive.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        snap = staging / CATALOG_NAME
        catalog.snapshot(project.db, snap)
        snap_db = catalog.open_copy(snap)
        try:
            meta = catalog.all_meta(snap_db)
            migrations = catalog.applied_migrations(snap_db)
            wanted = {a.path: a for a in referenced_artifacts(snap_db)}
        finally:
            snap_db.close()
        for path, art in wanted.items():
            if any(path.startswith(e) for e in excluded):
                raise InflqError(f"cannot leave out {path}: the catalog references it (the {art.kind}); exclude a folder no run needs")
        cfg_file = staging / CONFIG_NAME
        cfg_file.write_text(tomli_w.dumps(packed_cfg.to_toml()))

        sources: list[tuple[str, Path]] = [(CONFIG_NAME, cfg_file), (CATALOG_NAME, snap)]
        for sub in (ARTIFACTS, CORPUS_DIR, "plugins"):
            if (root / sub).is_dir():
                for f in _walk(root / sub):
                    rel = f.relative_to(root).as_posix()
                    if not _SKIP.search(rel) and "__pycache__" not in rel and not any(rel.startswith(e) for e in excluded):
                        sources.append((rel, f))
        if include_model:
            for f in _walk(model_src):
                sources.append((f"{MODEL_DIR}/{f.relative_to(model_src).as_posix()}", f))
            if adapter_src is not None:
                for f in _walk(adapter_src):
                    sources.append((f"{ADAPTER_DIR}/{f.relative_to(adapter_src).as_posix()}", f))
        if include_corpus:
            if corpus_src.is_dir():
                for f in _walk(corpus_src):
                    sources.append((f"{DATA_DIR}/{corpus_src.name}/{f.relative_to(corpus_src).as_posix()}", f))
            else:
                sources.append((f"{DATA_DIR}/{corpus_src.name}", corpus_src))
        for rel, _ in sources:
            _check_relpath(rel)

        mode = "w:gz" if archive.name.endswith((".gz", ".tgz")) else "w"
        files: list[dict[str, Any]] = []
        total = 0
        created = int(time.time())
        monitor.start("packing", len(sources))
        with tarfile.open(tmp_archive, mode, format=tarfile.PAX_FORMAT, **({"compresslevel": 1} if mode == "w:gz" else {})) as tf:
            for rel, src in sources:
                monitor.check()
                if rel not in wanted and rel.startswith(ARTIFACTS) and not src.exists():
                    continue  # replaced or removed by a writer since the listing; nothing references it
                with open(src, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    info = _tarinfo(rel, size, created)
                    reader = _HashingReader(f)
                    try:
                        tf.addfile(info, reader)
                    except OSError as exc:
                        raise InflqError(f"{src} changed while packing ({exc}); pack again") from None
                files.append({"path": rel, "size": size, "sha256": reader.h.hexdigest()})
                total += size
                monitor.advance(1)
            by_path = {f["path"]: f for f in files}
            for path, art in wanted.items():
                got = by_path.get(path)
                if got is None:
                    raise InflqError(f"the {art.kind} {path} that the catalog references is missing; run `inflq check {root} --repair` before packing")
                if art.checksum and got["sha256"] != art.checksum:
                    raise InflqError(f"the {art.kind} {path} fails its checksum; run `inflq check {root} --repair` before packing")
            store = by_path.get(f"{CORPUS_DIR}/store.json")
            if store is not None:
                store_fp = json.loads((root / CORPUS_DIR / "store.json").read_text()).get("fingerprint")
                if store_fp != meta.get("corpus_fingerprint"):
                    raise InflqError("the corpus was re-tokenized while packing; pack again")
            manifest = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "inflq_version": __version__,
                "created_at": catalog.now(),
                "project": config.name,
                "includes": {"model": include_model, "corpus": include_corpus},
                "origin": {"model": str(model_src.resolve()), "corpus": str(corpus_src.resolve()),
                           **({"adapter": str(adapter_src.resolve())} if adapter_src is not None else {})},
                "fingerprints": {k: meta.get(k, "") for k in ("model_fingerprint", "tokenizer_fingerprint", "corpus_fingerprint")
                                 + (("base_fingerprint", "adapter_fingerprint") if adapter_src is not None else ())},
                "catalog_migrations": migrations,
                "files": files,
            }
            data = json.dumps(manifest, indent=1).encode()
            tf.addfile(_tarinfo(MANIFEST, len(data), created), io.BytesIO(data))
        os.replace(tmp_archive, archive)
        return PackResult(archive, len(files), total, manifest)
    finally:
        tmp_archive.unlink(missing_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        project.close()


def _tarinfo(name: str, size: int, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.type = size, mtime, 0o644, tarfile.REGTYPE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


# -- unpacking ----------------------------------------------------------------------------------
def _check_relpath(name: Any) -> str:
    """A plain relative POSIX path inside the project, or an InflqError."""
    if not isinstance(name, str) or not name or len(name) > 1024:
        raise InflqError(f"the archive names an invalid path {str(name)[:80]!r}; refusing it")
    if "\x00" in name or "\\" in name or any(ord(c) < 32 for c in name):
        raise InflqError(f"the archive path {name[:80]!r} has control characters or backslashes; refusing it")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise InflqError(f"the archive holds an absolute path {name[:80]!r}; refusing it")
    parts = PurePosixPath(name).parts
    if any(p in ("", ".", "..") for p in name.split("/")) or not parts:
        raise InflqError(f"the archive path {name[:80]!r} leaves its folder ('..' or empty parts); refusing it")
    return name


def parse_manifest(data: bytes) -> dict[str, Any]:
    """Validate a manifest's bytes; any problem is an InflqError with one line."""
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InflqError(f"the archive's manifest is not valid JSON ({type(exc).__name__}); the archive is damaged") from None
    if not isinstance(manifest, dict):
        raise InflqError("the archive's manifest is not a JSON object; the archive is damaged")
    if manifest.get("format") != FORMAT:
        raise InflqError("this is not an inflq archive (no inflq manifest); make one with `inflq pack`")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise InflqError("the archive's manifest has no format version; the archive is damaged")
    if version > FORMAT_VERSION:
        raise InflqError(f"this archive was written by a newer inflq (format {version}); upgrade inflq to unpack it")
    files = manifest.get("files")
    if not isinstance(files, list) or not files:
        raise InflqError("the archive's manifest lists no files; the archive is damaged")
    seen: set[str] = set()
    for i, f in enumerate(files):
        if not isinstance(f, dict):
            raise InflqError(f"the archive's manifest entry {i} is not an object; the archive is damaged")
        path = _check_relpath(f.get("path"))
        size, digest = f.get("size"), f.get("sha256")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InflqError(f"the archive's manifest gives {path[:80]!r} an invalid size; the archive is damaged")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise InflqError(f"the archive's manifest gives {path[:80]!r} an invalid checksum; the archive is damaged")
        if path in seen or path == MANIFEST:
            raise InflqError(f"the archive's manifest lists {path[:80]!r} twice; the archive is damaged")
        seen.add(path)
    for key in ("fingerprints", "includes", "origin"):
        if key in manifest and not isinstance(manifest[key], dict):
            raise InflqError(f"the archive's manifest field {key!r} is not an object; the archive is damaged")
    return manifest


def _member_problem(m: tarfile.TarInfo) -> str | None:
    if m.issym() or m.islnk():
        return f"a link ({m.name[:80]!r} -> {m.linkname[:80]!r})"
    if m.ischr() or m.isblk() or m.isfifo() or m.isdev():
        return f"a device file or pipe ({m.name[:80]!r})"
    if not (m.isreg() or m.isdir()):
        return f"an unsupported entry ({m.name[:80]!r})"
    return None


def _damaged(archive: Path, exc: BaseException) -> InflqError:
    return InflqError(f"{archive} is not a readable inflq archive: truncated or damaged ({type(exc).__name__}); copy it again")


def unpack(archive: Path | str, dest: Path | str, monitor: Monitor | None = None) -> dict[str, Any]:
    """Verify ``archive`` and unpack it into the new folder ``dest``. Returns the manifest."""
    from .project import CATALOG_NAME, CONFIG_NAME, ProjectConfig

    monitor = monitor or Monitor()
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise InflqError(f"archive {archive} does not exist")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise InflqError(f"{dest} already exists and is not empty; unpack into a new folder")
    try:
        tf = tarfile.open(archive, "r:*")  # noqa: SIM115 (closed by the with below)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise _damaged(archive, exc) from None
    with tf:
        try:
            members = tf.getmembers()
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise _damaged(archive, exc) from None
        names: set[str] = set()
        for m in members:
            _check_relpath(m.name.rstrip("/") if m.isdir() else m.name)
            problem = _member_problem(m)
            if problem:
                raise InflqError(f"the archive contains {problem}; inflq archives hold only plain files, refusing it")
            if m.isreg():
                if m.name in names:
                    raise InflqError(f"the archive holds {m.name[:80]!r} twice; refusing it")
                names.add(m.name)
        man_member = next((m for m in members if m.name == MANIFEST and m.isreg()), None)
        if man_member is None:
            raise InflqError(f"{archive} has no {MANIFEST}: not an inflq archive, or truncated; copy it again")
        if man_member.size > MAX_MANIFEST_BYTES:
            raise InflqError("the archive's manifest is implausibly large; refusing it")
        try:
            manifest = parse_manifest(tf.extractfile(man_member).read())
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise _damaged(archive, exc) from None
        expected = {f["path"]: f for f in manifest["files"]}
        for m in members:
            if m.isreg() and m.name != MANIFEST:
                if m.name not in expected:
                    raise InflqError(f"the archive holds {m.name[:80]!r}, which its manifest does not list (tampered); refusing it")
                if m.size != expected[m.name]["size"]:
                    raise InflqError(f"{m.name[:80]!r} in the archive has a different size than its manifest says (tampered or damaged); refusing it")
        missing = sorted(set(expected) - names)
        if missing:
            raise InflqError(f"the archive lacks {len(missing)} file(s) its manifest lists (e.g. {missing[0][:80]!r}): truncated; copy it again")
        for required in (CONFIG_NAME, CATALOG_NAME):
            if required not in expected:
                raise InflqError(f"the archive has no {required}; it is not an inflq project archive")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.unpack-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            monitor.start("verifying", len(expected))
            for m in members:
                if not m.isreg() or m.name == MANIFEST:
                    continue
                monitor.check()
                target = tmp.joinpath(*PurePosixPath(m.name).parts)
                if not target.resolve().is_relative_to(tmp.resolve()):
                    raise InflqError(f"the archive path {m.name[:80]!r} leaves its folder; refusing it")
                target.parent.mkdir(parents=True, exist_ok=True)
                h = hashlib.sha256()
                n = 0
                try:
                    src = tf.extractfile(m)
                    with open(target, "xb") as out:
                        while block := src.read(_CHUNK):
                            n += len(block)
                            if n > m.size:
                                break
                            h.update(block)
                            out.write(block)
                except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
                    if isinstance(exc, FileExistsError):
                        raise InflqError(f"the archive holds {m.name[:80]!r} twice; refusing it") from None
                    raise _damaged(archive, exc) from None
                if n != m.size or h.hexdigest() != expected[m.name]["sha256"]:
                    raise InflqError(f"{m.name[:80]!r} fails its checksum: the archive was altered or damaged; refusing it")
                monitor.advance(1)
            # The config and the catalog must be usable before the folder appears.
            try:
                data = tomllib.loads((tmp / CONFIG_NAME).read_text(encoding="utf-8"))
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
                raise InflqError(f"the archive's {CONFIG_NAME} is not valid TOML ({exc}); refusing it") from None
            ProjectConfig.from_toml(data, f"{archive}:{CONFIG_NAME}")
            catalog.check_archived(tmp / CATALOG_NAME)
            if dest.exists():
                dest.rmdir()
            os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return manifest
