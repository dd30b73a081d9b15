"""The catalog as a file: consistent snapshots (for packing) and checks of a catalog from an archive."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import sqlite_utils

from ..errors import InflqError
from .schema import check_version


def snapshot(db: sqlite_utils.Database, dest: Path) -> None:
    """A transactionally consistent copy of the catalog in one file, taken while others may be writing."""
    dst = sqlite3.connect(str(dest))
    try:
        db.conn.backup(dst)
        dst.execute("PRAGMA journal_mode = DELETE")  # one self-contained file
        dst.commit()
    finally:
        dst.close()


def open_copy(path: Path) -> sqlite_utils.Database:
    """A plain connection to a catalog file (a snapshot): no migrations, no WAL. Close it when done."""
    conn = sqlite3.connect(str(path))
    conn.row_factory = sqlite3.Row
    return sqlite_utils.Database(conn)


def all_meta(db: sqlite_utils.Database) -> dict:
    """Every ``meta`` key with its value."""
    return {r["key"]: json.loads(r["value"]) for r in db.execute("SELECT key, value FROM meta")}


def applied_migrations(db: sqlite_utils.Database) -> list[str]:
    """The names of every applied migration, of every migration set, in the order applied."""
    return [r[0] for r in db.execute("SELECT name FROM _sqlite_migrations ORDER BY id")]


def check_archived(path: Path) -> None:
    """Refuse an archive's catalog that fails SQLite's integrity check or comes from a newer inflq."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            ok = conn.execute("PRAGMA integrity_check").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise InflqError(f"the archive's catalog is not a database ({exc}); refusing it") from None
    if ok != "ok":
        raise InflqError(f"the archive's catalog fails SQLite's integrity check ({ok}); refusing it")
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        check_version(sqlite_utils.Database(conn))
    except sqlite3.DatabaseError as exc:
        raise InflqError(f"the archive's catalog cannot be read ({exc}); refusing it") from None
    finally:
        conn.close()


def file_problem(path: Path) -> str | None:
    """Why the catalog file at ``path`` cannot be used (it does not open as a database, or fails
    SQLite's integrity check), or None when it is sound. Opened read-only."""
    from .schema import open_readonly

    try:
        conn = open_readonly(Path(path))
        try:
            ok = conn.execute("PRAGMA integrity_check").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        return str(exc)
    return None if ok == "ok" else ok


def integrity_problem(db) -> str | None:
    """SQLite's integrity check of the open catalog: None when it passes, else its first message."""
    ok = db.execute("PRAGMA integrity_check").fetchone()[0]
    return None if ok == "ok" else ok
