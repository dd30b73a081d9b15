"""Removing records with the files they name, and finding the files no record names (orphans).

Order is what keeps a project whole: the rows go first, in one transaction, and only then the files
they named. A crash in between leaves files that no row names, never a row that names a missing
file; ``inflq check`` reports such orphans and ``inflq gc`` (or ``inflq check --repair``) removes
them. Run ids are never given twice (``catalog.insert_run``), so a removed run's folder can never be
mistaken for a new run's.

Which files are orphans (:func:`orphans`), under the core folders of :mod:`inflq.layout` only (a
plugin's folder is its own, checked by its ``check_artifacts`` hook):

- a file no row names, outside any run's folder (a factor set's file whose row is gone);
- every file in the folder of a run that no longer exists;
- in the folder of a finished run, a file no row names, except its candidate list (a finished run
  keeps it: ``inflq check --repair`` rescores from it);
- never a file in the folder of an unfinished run: a resume rewrites or clears what it left there.

A file modified in the last :data:`GRACE_SECONDS` is reported but not removed: a writer saves a
file before it commits the row that names it (a factor set being stored, in another process).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import catalog, layout
from .errors import InflqError

if TYPE_CHECKING:
    from .project import Project

GRACE_SECONDS = 600.0


@dataclass
class Removed:
    """What a removal took away: the runs whose rows went, and the files and bytes freed."""

    runs: list[int] = field(default_factory=list)
    files: int = 0
    bytes: int = 0


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def remove_files(project: Project, paths: list[str], run_ids: list[int] = (), removed: Removed | None = None) -> Removed:
    """Remove the files the rows just deleted named, and the folders of the removed runs. A path a
    row names again by now (the same factor set stored anew meanwhile) stays."""
    removed = removed or Removed()
    named = catalog.named_files(project.db)
    for rel in dict.fromkeys(paths):
        if rel in named:
            continue
        p = project.root / rel
        if p.is_file():
            removed.bytes += _size(p)
            p.unlink(missing_ok=True)
            removed.files += 1
    for run_id in run_ids:
        folder = project.root / layout.run_folder(run_id)
        if folder.is_dir():
            for f in folder.rglob("*"):
                if f.is_file():
                    removed.files += 1
                    removed.bytes += _size(f)
            shutil.rmtree(folder, ignore_errors=True)
    return removed


def _refuse_running(runs: list[dict], what: str) -> None:
    running = [r["id"] for r in runs if r["status"] == "running"]
    if running:
        ids = ", ".join(map(str, running))
        raise InflqError(
            f"run{'s' if len(running) > 1 else ''} {ids} of {what} {'are' if len(running) > 1 else 'is'} running "
            f"(or {'were' if len(running) > 1 else 'was'} killed while running): stop {'them' if len(running) > 1 else 'it'} first, "
            "or pass --force if no process is running it any more"
        )


def remove_investigation(project: Project, name: str, force: bool = False) -> Removed:
    """Delete an investigation's rows (queries, probes, tags, runs, result sets, validations and the
    LDS subsets only it used), then the files they named. Refused while one of its runs is running,
    unless ``force``."""
    inv = catalog.investigation(project.db, name)
    if not force:
        _refuse_running(catalog.runs_of(project.db, inv["id"]), f"investigation {name!r}")
    runs, paths = catalog.delete_investigation(project.db, name)
    return remove_files(project, paths, runs, Removed(runs))


def remove_run(project: Project, run_id: int, force: bool = False) -> Removed:
    """Delete a run's rows (its result set with its stored sequences, its shards), then its files.
    Refused while it is running, unless ``force``. Factor sets it fitted stay: they are the
    project's cache (``inflq factors rm``)."""
    row = catalog.get_run(project.db, run_id)
    if row is None:
        raise InflqError(f"no run {run_id} in this project; see `inflq runs {project.root}`")
    if not force:
        _refuse_running([row], f"investigation {catalog.investigation(project.db, row['investigation_id'])['name']!r}")
    paths = catalog.delete_runs(project.db, [run_id])
    return remove_files(project, paths, [run_id], Removed([run_id]))


# -- orphans -------------------------------------------------------------------------------------
@dataclass
class Orphan:
    """A file under a core artifact folder that no row names: its path, size, age and why."""

    path: str
    size: int
    age: float
    why: str

    @property
    def recent(self) -> bool:
        return self.age < GRACE_SECONDS


def orphans(project: Project) -> list[Orphan]:
    """Every orphaned file under the core artifact folders (see the module's docstring)."""
    on_disk = list(layout.core_files(project.root))  # listed before the catalog is read: a row
    named = catalog.named_files(project.db)  # committed meanwhile then names its file
    statuses = catalog.run_statuses(project.db)
    out = []
    for f in on_disk:
        if f.path in named:
            continue
        run = layout.run_of(f.path)
        leftover = ".tmp" in Path(f.path).name
        if run is not None and run in statuses:
            if statuses[run] != "done" or layout.is_candidates(f.path):
                continue
            why = "a leftover of an interrupted write" if leftover else f"left behind by run {run}, which no longer needs it"
        elif run is not None:
            why = f"a file of run {run}, which was removed"
        elif leftover:
            why = "a leftover of an interrupted write"
        else:
            why = "named by no catalog row (its row was removed)"
        out.append(Orphan(f.path, f.size, f.age, why))
    return out


@dataclass
class Collected:
    """What :func:`collect_garbage` removed, and what it kept because it was written just now."""

    removed: list[Orphan] = field(default_factory=list)
    kept: list[Orphan] = field(default_factory=list)
    folders: int = 0

    @property
    def bytes(self) -> int:
        return sum(o.size for o in self.removed)


def collect_garbage(project: Project, grace: float = GRACE_SECONDS) -> Collected:
    """Remove the orphaned files (:func:`orphans`) older than ``grace`` seconds, then the empty
    folders under the core artifact folders (a removed run's)."""
    if project.readonly:
        raise InflqError("the project is read-only; copy it somewhere writable to remove its orphaned files")
    out = Collected()
    for o in orphans(project):
        if o.age < grace:
            out.kept.append(o)
            continue
        (project.root / o.path).unlink(missing_ok=True)
        out.removed.append(o)
    statuses = catalog.run_statuses(project.db)
    for folder in layout.empty_folders(project.root):
        run = layout.run_of(folder)
        if run is not None and run in statuses:
            continue  # an existing run's folder, empty for now
        try:
            (project.root / folder).rmdir()
            out.folders += 1
        except OSError:  # written to meanwhile
            pass
    return out

