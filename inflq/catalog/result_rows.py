"""Result sets (``result_sets``) and their stored top and bottom sequences (``results``): written
once when a run finishes, read by the CLI, the TUI and notebooks."""

from __future__ import annotations

from typing import Any

from .schema import now


def insert_result_set(db, fields: dict[str, Any], rows: list[dict[str, Any]]) -> int:
    """Record a result set and its stored sequences (each row without ``result_set_id``) in one
    transaction. Returns the result set's id."""
    with db.atomic():
        rs_id = db["result_sets"].insert({**fields, "created_at": now()}).last_pk
        db["results"].insert_all(({**r, "result_set_id": rs_id} for r in rows), batch_size=1000)
    return rs_id


def get_result_set(db, result_set_id: int) -> dict | None:
    """The result set with this id, or None."""
    return next(db["result_sets"].rows_where("id = ?", [result_set_id]), None)


def result_set_of_run(db, run_id: int) -> dict | None:
    """The result set a run wrote, or None."""
    return next(db["result_sets"].rows_where("run_id = ?", [run_id]), None)


def result_sets_of(db, investigation_id: int | None = None) -> list[dict]:
    """The result sets of one investigation (``None``: all), by id."""
    if investigation_id is None:
        return list(db["result_sets"].rows_where(order_by="id"))
    return list(db["result_sets"].rows_where("investigation_id = ?", [investigation_id], order_by="id"))


def update_result_set(db, result_set_id: int, **fields: Any) -> None:
    """Change a result set's columns (a recomputed artifact's checksum)."""
    with db.atomic():
        db["result_sets"].update(result_set_id, fields)


def stored_results(db, result_set_id: int, query_id: int, side: str, limit: int, offset: int = 0, search: str | None = None) -> list[dict]:
    """One query's stored top (or bottom) sequences by rank; ``search``: only those whose text or
    sequence id contains it."""
    if not search:
        return list(db.query(
            "SELECT * FROM results WHERE result_set_id = ? AND query_id = ? AND side = ? ORDER BY rank LIMIT ? OFFSET ?",
            [result_set_id, query_id, side, limit, offset],
        ))
    like = f"%{search}%"
    return list(db.query(
        "SELECT * FROM results WHERE result_set_id = ? AND query_id = ? AND side = ? AND (text LIKE ? OR seq_id LIKE ?) "
        "ORDER BY rank LIMIT ? OFFSET ?", [result_set_id, query_id, side, like, like, limit, offset]))


def delete_result_sets(db, result_set_ids: list[int]) -> list[str]:
    """Delete result sets with their stored sequences and stale marks, in one transaction (the
    caller's, when it has one). Returns the files the deleted rows named, for the caller to remove
    once the transaction is committed."""
    paths: list[str] = []
    with db.atomic():
        for rs_id in result_set_ids:
            row = get_result_set(db, rs_id)
            if row is None:
                continue
            paths += [p for p in (row["scores_path"], row["queries_path"]) if p]
            db.execute("DELETE FROM results WHERE result_set_id = ?", [rs_id])
            db.execute("DELETE FROM stale_results WHERE result_set_id = ?", [rs_id])
            db.execute("DELETE FROM result_sets WHERE id = ?", [rs_id])
    return paths


def stale_queries(db, result_set_id: int) -> set[int]:
    """The queries edited after this result set scored them: its rows for them are stale."""
    return {r[0] for r in db.execute("SELECT query_id FROM stale_results WHERE result_set_id = ?", [result_set_id]).fetchall()}
def self_influence_by_key(db, key: str) -> dict | None:
    """The cached self-influence scores with this key (``inflq self-influence``), or None."""
    return next(db["self_influence"].rows_where("key = ?", [key]), None)


def store_self_influence(db, fields: dict[str, Any]) -> None:
    """Record computed self-influence scores (``fields``: the row, ``key`` included)."""
    with db.atomic():
        db["self_influence"].upsert({**fields, "created_at": now()}, pk="key")


def delete_self_influence(db, key: str) -> None:
    """Forget cached self-influence scores (their file is recomputed when next asked for)."""
    with db.atomic():
        db.execute("DELETE FROM self_influence WHERE key = ?", [key])


def count_results(db, result_set_id: int, query_id: int, side: str) -> int:
    """How many sequences are stored for one query and side of a result set."""
    return db["results"].count_where("result_set_id = ? AND query_id = ? AND side = ?", [result_set_id, query_id, side])
