"""Cached factor sets (the ``factor_sets`` table): list, look up, remove."""

from __future__ import annotations

import sqlite_utils

from ..errors import InflqError


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
