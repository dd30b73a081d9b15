"""Copies of the catalog kept current, and restoring the newest good one when the catalog is
damaged (``inflq check --repair``).

After every run that completes, :func:`backup_catalog` writes a consistent copy of the catalog
(SQLite's backup API, taken while others may write) to ``backups/catalog-<UTC time>-<label>.db``
and keeps the newest :data:`KEEP`. A damaged catalog loses at most what was written since the
last completed run. :func:`restore_catalog` moves the damaged file aside (never deleting it),
puts the newest copy that passes SQLite's integrity check in its place, re-links the factor sets
whose files are on disk (a factor file carries its row), and says exactly which runs, result sets
and queries the copy lacks, from the score matrices on disk (each names its run and queries).

The ``backups/`` folder is local: ``inflq pack`` does not carry it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import catalog, layout
from .errors import InflqError

BACKUPS = layout.BACKUPS
KEEP = 3
CATALOG = layout.CATALOG


def backup_catalog(project, label: str) -> Path:
    """Write a consistent copy of the project's catalog to ``backups/`` and keep the newest
    :data:`KEEP` copies. Returns the copy's path."""
    folder = Path(project.root) / BACKUPS
    folder.mkdir(exist_ok=True)
    dest = folder / f"catalog-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{label}.db"
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.unlink(missing_ok=True)
    catalog.snapshot(project.db, tmp)
    os.replace(tmp, dest)
    for old in backups(project.root)[KEEP:]:
        old.unlink(missing_ok=True)
    return dest


def backups(root: Path) -> list[Path]:
    """The catalog's copies, newest first: those :func:`backup_catalog` wrote, then the copies
    taken before migrations (``catalog.db.bak-<time>``)."""
    root = Path(root)
    kept = sorted((root / BACKUPS).glob("catalog-*.db"), key=lambda p: p.name, reverse=True) if (root / BACKUPS).is_dir() else []
    before_migrations = sorted(root.glob(f"{CATALOG}.bak-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    return kept + before_migrations


@dataclass
class LostRun:
    """A run whose records the restored copy lacks, as its artifacts on disk tell it."""

    run_id: int
    files: list[str]
    investigation: str | None = None
    estimator: str | None = None
    filter: str | None = None
    queries: list[dict] = field(default_factory=list)  # id, prompt, completion of the queries it scored

    def line(self) -> str:
        if self.investigation is None:
            return (f"run {self.run_id}: interrupted or unrecorded, its committed shards on disk ({', '.join(self.files)}) "
                    "cannot be re-linked; run again")
        return (f"run {self.run_id} ({self.estimator} / {self.filter}, investigation {self.investigation!r}) and its result set, "
                f"which scored quer{'y' if len(self.queries) == 1 else 'ies'} {', '.join(str(q['id']) for q in self.queries)}: "
                f"its files ({', '.join(self.files)}) cannot be re-linked; run it again")


@dataclass
class Restored:
    """What :func:`restore_catalog` did and what the restored copy lacks."""

    copy: Path
    damaged: Path
    copy_time: str
    runs: list[LostRun]
    queries: list[dict]  # scored by a lost run, and absent from the copy (or different there)
    relinked: list[str]  # factor files re-linked as factor sets
    unlinked: list[str]  # other artifact files no row of the copy names

    def lines(self) -> list[str]:
        out = [f"restored the catalog from {self.copy.name} (taken {self.copy_time}); the damaged one is kept as {self.damaged.name}"]
        if not self.runs and not self.queries:
            out.append("the copy lacks no run or result set whose files are on disk")
        out += [f"lacks {r.line()}" for r in self.runs]
        out += [f"lacks query {q['id']} ({q['prompt']!r} → {q['completion']!r}, investigation {q['investigation']!r}): add it again with `inflq query add`"
                for q in self.queries]
        out += [f"re-linked {f} (its factor set is usable again)" for f in self.relinked]
        out += [f"on disk, not re-linked: {f}" for f in self.unlinked]
        out.append("records written after the copy and kept in no file (queries added or edited, tags, validations, "
                   "runs that did not finish) cannot be recovered")
        return out


def usable(path: Path) -> bool:
    """Whether ``path`` is a catalog that passes SQLite's integrity check and this inflq can open."""
    try:
        catalog.check_archived(path)
    except InflqError:
        return False
    return True


def restore_catalog(root: Path) -> Restored:
    """Replace the project's damaged catalog with its newest good copy and report what the copy lacks."""
    from .project import Project

    root = Path(root)
    good = next((p for p in backups(root) if usable(p)), None)
    if good is None:
        raise InflqError(f"no good copy of the catalog to restore in {root / BACKUPS} (nor a catalog.db.bak-*); "
                         "the artifacts are on disk, but their records cannot be rebuilt: make a new project and run again")
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    damaged = root / f"{CATALOG}.damaged-{stamp}"
    for suffix in ("", "-wal", "-shm"):  # a WAL beside a replaced catalog must not be replayed into it
        src = root / (CATALOG + suffix)
        if src.exists():
            os.replace(src, damaged.with_name(damaged.name + suffix))
    tmp = root / (CATALOG + ".restoring.tmp")
    shutil.copyfile(good, tmp)
    os.replace(tmp, root / CATALOG)
    copy_time = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(good.stat().st_mtime))
    project = Project.open(root)
    try:
        relinked, unlinked = _relink_factor_sets(project)
        runs, queries = _lost_runs(project)
        named = {f[1] for f in catalog.referenced_files(project.db)} | {f for r in runs for f in r.files} | set(relinked)
        for f in layout.core_files(root):  # a run's folder is reported whole, by _lost_runs
            if f.path.endswith(".safetensors") and f.path not in named and layout.run_of(f.path) is None:
                unlinked.append(f.path)
    finally:
        project.close()
    return Restored(good, damaged, copy_time, runs, queries, relinked, sorted(set(unlinked)))


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except Exception:
        return {}


def _relink_factor_sets(project) -> tuple[list[str], list[str]]:
    """Factor files no row of the restored catalog names, recorded again as factor sets from what
    each file carries (its cache key's parts, its size of fit). Returns (re-linked, not re-linkable)."""
    import hashlib

    from .modeling import sha256_file

    folder = project.root / layout.FACTORS
    have = {r["path"] for r in catalog.factor_sets(project.db)}
    relinked, unlinked = [], []
    for f in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        rel = f.relative_to(project.root).as_posix()
        if rel in have:
            continue
        meta = _metadata(f)
        try:
            key_src = json.loads(meta["key"])
            about = json.loads(meta["factor_set"])
            key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:24]
            if not f.stem.endswith(key) or catalog.factor_set_by_key(project.db, key) is not None:
                raise KeyError("key")
            catalog.store_factor_set(project.db, {
                "key": key, "estimator": key_src["estimator"], "settings": json.dumps(key_src["settings"], sort_keys=True),
                "modules": json.dumps(key_src["modules"]), "model_fingerprint": key_src["model"], "data_fingerprint": key_src["data"],
                "num_sequences": int(about["num_sequences"]), "seed": key_src["seed"], "path": rel, "checksum": sha256_file(f),
                "seconds": float(about["seconds"]),
            })
            relinked.append(rel)
        except (KeyError, ValueError, TypeError):  # written before factor files carried their row
            unlinked.append(rel)
    return relinked, unlinked


def _lost_runs(project) -> tuple[list[LostRun], list[dict]]:
    """Runs with files on disk that the restored catalog does not know, and the queries they scored
    that it lacks."""
    root = project.root
    known = {r["id"] for r in catalog.runs_of(project.db)}
    found: dict[int, LostRun] = {}

    def about(run: LostRun, matrix: Path) -> None:  # what a score matrix says of its run
        meta = _metadata(matrix).get("inflq_result") if matrix.is_file() else None
        if meta:
            a = json.loads(meta)
            run.investigation, run.estimator, run.filter, run.queries = a["investigation"], a["estimator"], a["filter"], a["queries"]

    legacy = root / layout.LEGACY_RESULTS  # score matrices of runs made before they moved into the run's folder
    for f in sorted(legacy.glob("run-*.safetensors")) if legacy.is_dir() else []:
        try:
            rid = int(f.stem.split("-", 1)[1])
        except ValueError:
            continue
        if rid not in known:
            run = found.setdefault(rid, LostRun(rid, []))
            run.files.append(f.relative_to(root).as_posix())
            about(run, f)
    runs_dir = root / layout.RUNS
    for d in sorted(runs_dir.iterdir()) if runs_dir.is_dir() else []:
        if d.is_dir() and d.name.isdigit() and int(d.name) not in known and any(d.iterdir()):
            run = found.setdefault(int(d.name), LostRun(int(d.name), []))
            run.files.append(d.relative_to(root).as_posix() + "/")
            about(run, root / layout.score_matrix(int(d.name)))
    lost_queries: list[dict] = []
    seen = set()
    for run in sorted(found.values(), key=lambda r: r.run_id):
        for q in run.queries:
            try:
                have = catalog.query(project.db, q["id"])
            except InflqError:
                have = None
            if (have is None or (have["prompt"], have["completion"]) != (q["prompt"], q["completion"])) and q["id"] not in seen:
                seen.add(q["id"])
                lost_queries.append({**q, "investigation": run.investigation})
    return sorted(found.values(), key=lambda r: r.run_id), lost_queries
