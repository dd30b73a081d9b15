"""Cached factor sets (the ``factor_sets`` table): list, look up by id or cache key, store, remove."""

from __future__ import annotations

from typing import Any

import sqlite_utils

from ..errors import InflqError
from .schema import now


def factor_sets(db: sqlite_utils.Database) -> list[dict]:
    """Every factor set's row, oldest first."""
    return list(db["factor_sets"].rows_where(order_by="id"))


def factor_set_uses(db: sqlite_utils.Database) -> dict[int, int]:
    """How many runs used each factor set, by factor set id (unused ones are left out)."""
    return {r["id"]: r["n"] for r in db.query(
        "SELECT factor_set_id AS id, count(*) AS n FROM runs WHERE factor_set_id IS NOT NULL GROUP BY factor_set_id"
    )}


def factor_set(db: sqlite_utils.Database, fs_id: int) -> dict:
    row = next(db["factor_sets"].rows_where("id = ?", [int(fs_id)]), None)
    if row is None:
        ids = [r["id"] for r in db["factor_sets"].rows_where(order_by="id")]
        raise InflqError(f"no factor set {fs_id}; the project has {', '.join(map(str, ids)) or 'none'} (see `inflq factors list`)")
    return row


def remove_factor_set(db: sqlite_utils.Database, fs_id: int) -> dict:
    """Delete a factor set's row (runs that used it forget it); returns the row."""
    row = factor_set(db, fs_id)
    with db.atomic():
        db.execute("UPDATE runs SET factor_set_id = NULL WHERE factor_set_id = ?", [row["id"]])
        db.execute("DELETE FROM factor_sets WHERE id = ?", [row["id"]])
    return row


def factor_set_by_key(db, key: str) -> dict | None:
    """The cached factor set with this cache key, or None."""
    return next(db["factor_sets"].rows_where("key = ?", [key]), None)


def delete_factor_set(db, factor_set_id: int) -> None:
    with db.atomic():
        db.execute("DELETE FROM factor_sets WHERE id = ?", [factor_set_id])


def store_factor_set(db, fields: dict[str, Any], replaces: int | None = None, run_id: int | None = None) -> tuple[int, list[str]]:
    """Record fitted factors (``replaces``: the stale factor set with the same key). With a
    ``run_id``, the run's fitting shards are forgotten in the same transaction. Returns the new id
    and the paths of the forgotten shards' files."""
    stale: list[str] = []
    with db.atomic():
        if replaces is not None:
            db.execute("DELETE FROM factor_sets WHERE id = ?", [replaces])
        fs_id = db["factor_sets"].insert({**fields, "created_at": now()}).last_pk
        if run_id is not None:
            stale = [r["path"] for r in db["fit_shards"].rows_where("run_id = ?", [run_id])]
            db.execute("DELETE FROM fit_shards WHERE run_id = ?", [run_id])
    return fs_id, stale
