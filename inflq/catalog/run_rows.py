"""Runs and their committed work: the ``runs`` table with its status transitions, the scoring
shards (``run_shards``) and fitting shards (``fit_shards``) a run commits one at a time, and the
factor sets a run fits or reuses.

A run's status changes only through :func:`restart_run` (to ``running``) and :func:`finish_run`
(to ``done``, ``cancelled`` or ``failed``); :func:`update_run` changes anything but the status.
"""

from __future__ import annotations

from typing import Any

from .. import layout
from .result_rows import delete_result_sets
from .schema import get_meta, now, set_meta

FINISHED = ("done", "cancelled", "failed")


# -- runs -------------------------------------------------------------------------------------------
def insert_run(db, fields: dict[str, Any]) -> int:
    """A new run, ``running`` from the start (``fields``: the other columns). Returns its id, which
    no run ever had before, a removed one included: a run's files are named by its id, and SQLite
    alone would give a removed latest run's id again (``meta.last_run_id`` keeps the highest)."""
    with db.atomic():
        last = max(db.execute("SELECT coalesce(max(id), 0) FROM runs").fetchone()[0], int(get_meta(db, "last_run_id", 0) or 0))
        db["runs"].insert({**fields, "id": last + 1, "status": "running", "phase": "starting", "done": 0, "total": 0, "started_at": now()})
        set_meta(db, "last_run_id", last + 1)
    return last + 1


def get_run(db, run_id: int) -> dict | None:
    """The run with this id, or None."""
    return next(db["runs"].rows_where("id = ?", [run_id]), None)


def latest_run_id(db) -> int | None:
    """The id of the most recent run in the project, or None."""
    return db.execute("SELECT max(id) FROM runs").fetchone()[0]


def runs_of(db, investigation_id: int | None = None, newest_first: bool = False) -> list[dict]:
    """The runs of one investigation (``None``: of every investigation), by id."""
    where, args = ("investigation_id = ?", [investigation_id]) if investigation_id is not None else (None, None)
    return list(db["runs"].rows_where(where, args, order_by="id desc" if newest_first else "id"))


def run_counts(db) -> dict[int, int]:
    """Runs per investigation id (investigations without runs are absent)."""
    return {r["investigation_id"]: r["n"] for r in db.query("SELECT investigation_id, count(*) AS n FROM runs GROUP BY investigation_id")}


def interrupted_run(db, investigation_id: int, kind: str) -> dict | None:
    """The investigation's most recent run of ``kind`` that is not ``done``."""
    return next(db["runs"].rows_where("investigation_id = ? AND kind = ? AND status != 'done'", [investigation_id, kind], order_by="id desc", limit=1), None)


def update_run(db, run_id: int, **fields: Any) -> None:
    """Change a run's columns other than its status (progress, settings, factor set)."""
    if "status" in fields:
        raise ValueError("a run's status changes through restart_run or finish_run")
    with db.atomic():
        db["runs"].update(run_id, fields)


def restart_run(db, run_id: int, **fields: Any) -> None:
    """A resumed run is ``running`` again, its last error cleared."""
    with db.atomic():
        db["runs"].update(run_id, {**fields, "status": "running", "error": None})


def finish_run(db, run_id: int, status: str, *, seconds: float | None = None, error: str | None = None, **fields: Any) -> None:
    """A run ends ``done``, ``cancelled`` or ``failed`` (with its ``error``), now."""
    if status not in FINISHED:
        raise ValueError(f"a run finishes as one of {FINISHED}, not {status!r}")
    row: dict[str, Any] = {**fields, "status": status, "finished_at": now()}
    if status == "done":
        row["phase"] = "done"
    if seconds is not None:
        row["seconds"] = seconds
    if status == "failed":
        row["error"] = error
    with db.atomic():
        db["runs"].update(run_id, row)


def unfinished_runs(db, investigation_id: int, kind: str | None = None) -> list[dict]:
    """The investigation's runs (of ``kind``, if given) that are not ``done``: running, or cancelled
    or failed and so resumable."""
    where, args = "investigation_id = ? AND status != 'done'", [investigation_id]
    if kind is not None:
        where, args = where + " AND kind = ?", args + [kind]
    return list(db["runs"].rows_where(where, args, order_by="id"))


def delete_runs(db, run_ids: list[int]) -> list[str]:
    """Delete runs with everything that hangs off them (their result sets, stored sequences and
    stale marks, scoring and fitting shards) in one transaction (the caller's, when it has one).
    Returns the files the deleted rows named, for the caller to remove once it is committed."""
    paths: list[str] = []
    with db.atomic():
        for run_id in run_ids:
            sets = [r[0] for r in db.execute("SELECT id FROM result_sets WHERE run_id = ? ORDER BY id", [run_id]).fetchall()]
            paths += delete_result_sets(db, sets)
            for table in ("run_shards", "fit_shards"):
                paths += [r[0] for r in db.execute(f"SELECT DISTINCT path FROM {table} WHERE run_id = ?", [run_id]).fetchall() if r[0]]
                db.execute(f"DELETE FROM {table} WHERE run_id = ?", [run_id])
            db.execute("DELETE FROM runs WHERE id = ?", [run_id])
    return paths


def latest_run_using(db, factor_set_id: int) -> dict | None:
    """The most recent run that used this factor set, or None."""
    return next(db["runs"].rows_where("factor_set_id = ?", [factor_set_id], order_by="id desc"), None)


def run_ids_using(db, factor_set_id: int) -> list[int]:
    """The ids of every run that used this factor set."""
    return [r[0] for r in db.execute("SELECT id FROM runs WHERE factor_set_id = ? ORDER BY id", [factor_set_id]).fetchall()]


def move_runs_to_factor_set(db, old_id: int, new_id: int) -> None:
    """Runs that used factor set ``old_id`` now use ``new_id`` (refit after damage)."""
    with db.atomic():
        db.execute("UPDATE runs SET factor_set_id = ? WHERE factor_set_id = ?", [new_id, old_id])


# -- scoring shards ---------------------------------------------------------------------------------
def score_shards(db, run_id: int) -> dict[int, dict]:
    """The run's committed scoring shards, by shard index."""
    return {r["shard"]: r for r in db["run_shards"].rows_where("run_id = ?", [run_id])}


def record_score_shard(db, run_id: int, shard: int, n: int, path: str, checksum: str) -> None:
    """Commit one scoring shard of ``n`` sequences (its file at ``path``)."""
    with db.atomic():
        db["run_shards"].upsert({"run_id": run_id, "shard": shard, "n": n, "path": path, "checksum": checksum, "seconds": 0.0}, pk=("run_id", "shard"))


def delete_score_shards(db, run_id: int, shards: list[int] | None = None) -> None:
    """Forget the run's scoring shards (``shards``: only these), so that a resume redoes them."""
    with db.atomic():
        if shards is None:
            db.execute("DELETE FROM run_shards WHERE run_id = ?", [run_id])
        for s in shards or ():
            db.execute("DELETE FROM run_shards WHERE run_id = ? AND shard = ?", [run_id, s])


def score_shard_totals(db, run_id: int) -> tuple[int, int]:
    """``(shards, sequences)`` the run has scored and committed."""
    n_shards, n_seqs = db.execute("SELECT count(*), coalesce(sum(n), 0) FROM run_shards WHERE run_id = ?", [run_id]).fetchone()
    return n_shards, n_seqs


# -- fitting shards ---------------------------------------------------------------------------------
def fit_shards(db, run_id: int, pass_key: str | None = None) -> list[dict]:
    """The run's committed fitting shards (``pass_key``: of one pass)."""
    if pass_key is None:
        return list(db["fit_shards"].rows_where("run_id = ?", [run_id]))
    return list(db["fit_shards"].rows_where("run_id = ? AND pass_key = ?", [run_id, pass_key]))


def record_fit_shards(db, run_id: int, pass_key: str, factor_key: str, sizes: dict[int, int], path: str, checksum: str, running_sum: bool = False) -> None:
    """Commit fitting shards (``sizes``: shard index -> sequences) whose sums are in ``path``.
    ``running_sum``: the file sums every shard up to the last one, so each of them points to it."""
    with db.atomic():
        for i, n in sizes.items():
            db["fit_shards"].upsert({
                "run_id": run_id, "pass_key": pass_key, "shard": i, "n": n,
                "factor_key": factor_key, "path": path, "checksum": checksum, "seconds": 0.0,
            }, pk=("run_id", "pass_key", "shard"))
        if running_sum:
            db.execute(
                "UPDATE fit_shards SET path = ?, checksum = ? WHERE run_id = ? AND pass_key = ? AND shard <= ?",
                [path, checksum, run_id, pass_key, max(sizes)],
            )


def forget_fit_shards(db, run_id: int, prefix: str) -> list[str]:
    """Forget the run's committed pass shards whose pass key starts with ``prefix`` (an estimator's
    own passes over the candidates, once the run is done). Returns the paths of their files."""
    with db.atomic():
        rows = _rows(db, "SELECT DISTINCT path FROM fit_shards WHERE run_id = ? AND substr(pass_key, 1, ?) = ?", [run_id, len(prefix), prefix])
        db.execute("DELETE FROM fit_shards WHERE run_id = ? AND substr(pass_key, 1, ?) = ?", [run_id, len(prefix), prefix])
    return [r["path"] for r in rows]


def fit_shard_totals(db, run_id: int) -> list[tuple[str, int, int]]:
    """Per fitting pass of the run: ``(pass key, shards, sequences)`` committed."""
    return [tuple(r) for r in db.execute(
        "SELECT pass_key, count(*), sum(n) FROM fit_shards WHERE run_id = ? GROUP BY pass_key ORDER BY pass_key", [run_id]).fetchall()]


# -- files the catalog references (``inflq check``, sharing) -----------------------------------------
def _rows(db, sql: str, args=()) -> list[dict]:
    """Rows as dicts from a sqlite-utils Database or a plain sqlite3 connection (a snapshot)."""
    cur = getattr(db, "conn", db).execute(sql, args)
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]


def referenced_files(db) -> list[tuple[str, str, str | None, tuple]]:
    """Every artifact file the catalog references: ``(kind, path, checksum, owner)``, the owner
    naming its row as ``(table, id[, detail])``."""
    out: list[tuple[str, str, str | None, tuple]] = []
    for r in _rows(db, "SELECT id, estimator, path, checksum FROM factor_sets ORDER BY id"):
        out.append(("factor set", r["path"], r["checksum"], ("factor_sets", r["id"])))
    for r in _rows(db, "SELECT run_id, shard, path, checksum FROM run_shards ORDER BY run_id, shard"):
        out.append(("score shard", r["path"], r["checksum"], ("run_shards", r["run_id"], r["shard"])))
    for r in _rows(db, "SELECT id, run_id, scores_path, scores_checksum, queries_path, queries_checksum FROM result_sets ORDER BY id"):
        if r["scores_path"]:
            out.append(("score matrix", r["scores_path"], r["scores_checksum"], ("result_sets", r["id"], "scores")))
        if r["queries_path"]:
            out.append(("query gradients", r["queries_path"], r["queries_checksum"], ("result_sets", r["id"], "queries")))
    has_cache = _rows(db, "SELECT 1 AS x FROM sqlite_master WHERE type = 'table' AND name = 'self_influence'")
    for r in _rows(db, "SELECT key, path, checksum FROM self_influence ORDER BY created_at") if has_cache else []:  # an archive from before 0007
        out.append(("self-influence scores", r["path"], r["checksum"], ("self_influence", r["key"])))
    # Candidates carry no checksum in the catalog; they must at least exist and read once scoring began.
    for r in _rows(db, "SELECT DISTINCT run_id FROM run_shards ORDER BY run_id"):
        out.append(("candidate list", layout.candidates(r["run_id"]), None, ("runs", r["run_id"], "candidates")))
    return out


def scored_run_ids(db) -> list[int]:
    """The runs that committed at least one scoring shard (their candidates were chosen)."""
    return [r["run_id"] for r in _rows(db, "SELECT DISTINCT run_id FROM run_shards ORDER BY run_id")]


def named_files(db) -> set[str]:
    """Every file path a core row names: factor sets, scoring and fitting shards, result sets'
    score matrices and query gradients, kept self-influence scores (what ``inflq check`` and ``inflq gc`` do not call orphans)."""
    sql = ("SELECT path FROM factor_sets UNION SELECT path FROM run_shards UNION SELECT path FROM fit_shards "
           "UNION SELECT scores_path FROM result_sets UNION SELECT queries_path FROM result_sets")
    if _rows(db, "SELECT 1 AS x FROM sqlite_master WHERE type = 'table' AND name = 'self_influence'"):
        sql += " UNION SELECT path FROM self_influence"
    return {r["path"] for r in _rows(db, sql) if r["path"]}


def run_statuses(db) -> dict[int, str]:
    """Every run's status, by id."""
    return {r["id"]: r["status"] for r in _rows(db, "SELECT id, status FROM runs")}


def dependents(db, owner: tuple) -> tuple[list[int], list[int], str | None]:
    """What depends on the row ``owner`` names: ``(run ids, result set ids, status)``. For a factor
    set: the runs that used it and their result sets; for a result set: its run; for a run's shard
    or candidates: the run and its status (``"deleted"`` when it is gone)."""
    table, key = owner[0], owner[1]
    if table == "factor_sets":
        runs = [r["id"] for r in _rows(db, "SELECT id FROM runs WHERE factor_set_id = ? ORDER BY id", [key])]
        sets = [r["id"] for r in _rows(db, f"SELECT id FROM result_sets WHERE run_id IN ({','.join('?' * len(runs))}) ORDER BY id", runs)] if runs else []
        return runs, sets, None
    if table == "result_sets":
        return [r["run_id"] for r in _rows(db, "SELECT run_id FROM result_sets WHERE id = ?", [key])], [key], None
    run = _rows(db, "SELECT id, status FROM runs WHERE id = ?", [key])
    return [key], [], run[0]["status"] if run else "deleted"
