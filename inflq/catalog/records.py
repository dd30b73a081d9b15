"""The project's records: investigations, their queries, probes and sequence tags, the tokenized
corpus's ``sequences`` and the ``file_hashes`` cache. Every function takes the sqlite-utils
``db`` first; writes run in one transaction each."""

from __future__ import annotations

import json
from collections.abc import Iterable

import numpy as np
import sqlite_utils

from ..errors import InflqError
from .result_rows import delete_result_sets
from .run_rows import delete_runs, unfinished_runs
from .schema import now, set_meta
from .validation_rows import delete_validations

SEQUENCE_COLUMNS = ("idx", "seq_id", "doc_id", "chunk", "n_tokens", "source", "meta")

# -- investigations -------------------------------------------------------------------------------


def create_investigation(db: sqlite_utils.Database, name: str, description: str = "") -> int:
    name = name.strip()
    if not name:
        raise InflqError("an investigation needs a name")
    if db["investigations"].count_where("name = ?", [name]):
        raise InflqError(f"an investigation named {name!r} already exists; choose another name")
    with db.atomic():
        return db["investigations"].insert({"name": name, "description": description, "created_at": now()}).last_pk


def investigations(db: sqlite_utils.Database) -> list[dict]:
    """Every investigation with its number of queries and result sets."""
    return list(db.query(
        "SELECT i.*, (SELECT count(*) FROM queries q WHERE q.investigation_id = i.id) AS num_queries, "
        "(SELECT count(*) FROM result_sets r WHERE r.investigation_id = i.id) AS num_result_sets "
        "FROM investigations i ORDER BY i.id"
    ))


def investigation(db: sqlite_utils.Database, name: str | int) -> dict:
    """The investigation named ``name`` (or with id ``name``, an int)."""
    col = "id" if isinstance(name, int) else "name"
    row = next(db["investigations"].rows_where(f"{col} = ?", [name]), None)
    if row is None:
        have = ", ".join(r["name"] for r in db["investigations"].rows) or "none"
        raise InflqError(f"no investigation {name!r} in this project (have: {have}); create it with `inflq investigation add`")
    return row


def rename_investigation(db: sqlite_utils.Database, name: str, new: str) -> None:
    inv = investigation(db, name)
    if db["investigations"].count_where("name = ?", [new]):
        raise InflqError(f"an investigation named {new!r} already exists")
    with db.atomic():
        db["investigations"].update(inv["id"], {"name": new})


def delete_investigation(db: sqlite_utils.Database, name: str) -> tuple[list[int], list[str]]:
    """Delete an investigation's rows, in one transaction: its runs with their result sets, stored
    sequences and shards, its validations and the LDS subsets only they use, its queries with their
    probes, and its sequence tags. Returns the ids of its runs and the files the deleted rows named,
    which the caller removes once this has committed."""
    inv = investigation(db, name)
    with db.atomic():
        runs = [r["id"] for r in db["runs"].rows_where("investigation_id = ?", [inv["id"]], order_by="id")]
        paths = delete_runs(db, runs)
        orphan_sets = [r["id"] for r in db["result_sets"].rows_where("investigation_id = ?", [inv["id"]])]
        paths += delete_result_sets(db, orphan_sets)
        delete_validations(db, inv["id"])
        db.execute("DELETE FROM stale_results WHERE query_id IN (SELECT id FROM queries WHERE investigation_id = ?)", [inv["id"]])
        db.execute("DELETE FROM probes WHERE query_id IN (SELECT id FROM queries WHERE investigation_id = ?)", [inv["id"]])
        db.execute("DELETE FROM queries WHERE investigation_id = ?", [inv["id"]])
        db.execute("DELETE FROM sequence_tags WHERE investigation_id = ?", [inv["id"]])
        db.execute("DELETE FROM investigations WHERE id = ?", [inv["id"]])
    return runs, paths


# -- queries and probes ---------------------------------------------------------------------------


def add_queries(db: sqlite_utils.Database, investigation_name: str, queries: list[dict]) -> list[int]:
    """Append queries (dicts with prompt, completion, measurement, optional alternative, chat, tags,
    notes) in one transaction. Checking that they tokenize and that the measurement exists is the
    caller's (``inflq.queries.add_queries``)."""
    inv = investigation(db, investigation_name)
    ids = []
    with db.atomic():
        pos = db.execute("SELECT coalesce(max(position), -1) FROM queries WHERE investigation_id = ?", [inv["id"]]).fetchone()[0]
        for q in queries:
            pos += 1
            tags = q.get("tags") or []
            ids.append(db["queries"].insert({
                "investigation_id": inv["id"], "position": pos, "prompt": q["prompt"], "completion": q["completion"],
                "chat": int(bool(q.get("chat", False))), "tags": json.dumps(tags if isinstance(tags, list) else [str(tags)]),
                "notes": q.get("notes") or "", "created_at": now(),
                "measurement": q["measurement"], "alternative": q.get("alternative") or None,
            }).last_pk)
    return ids


def queries(db: sqlite_utils.Database, investigation_name: str | int) -> list[dict]:
    """An investigation's queries, in order."""
    inv = investigation(db, investigation_name)
    return list(db["queries"].rows_where("investigation_id = ?", [inv["id"]], order_by="position"))


def query(db: sqlite_utils.Database, query_id: int) -> dict:
    row = next(db["queries"].rows_where("id = ?", [query_id]), None)
    if row is None:
        raise InflqError(f"no query with id {query_id}; see `inflq query list`")
    return row


def _refuse_with_unfinished_runs(db: sqlite_utils.Database, query_row: dict, doing: str) -> None:
    """A resumed run would mix the query as it was with the query as it is: refuse while its
    investigation has a scoring run that may still be resumed."""
    left = unfinished_runs(db, query_row["investigation_id"], kind="scores")
    if left:
        ids = ", ".join(str(r["id"]) for r in left)
        raise InflqError(
            f"cannot {doing} query {query_row['id']} while run{'s' if len(left) > 1 else ''} {ids} of its investigation "
            f"{'are' if len(left) > 1 else 'is'} unfinished (a resume would mix old and new queries): "
            f"finish {'them' if len(left) > 1 else 'it'} with `inflq run --resume ID` or remove {'them' if len(left) > 1 else 'it'} with `inflq runs rm`"
        )


def delete_query(db: sqlite_utils.Database, query_id: int) -> dict:
    """Delete a query with its probes and its stored rows in every result set, in one transaction
    (the result sets' score matrices keep its row, which nothing shows once the query is gone).
    Refused while its investigation has an unfinished scoring run. Returns the deleted row."""
    with db.atomic():
        row = query(db, query_id)
        _refuse_with_unfinished_runs(db, row, "remove")
        db.execute("DELETE FROM results WHERE query_id = ?", [query_id])
        db.execute("DELETE FROM stale_results WHERE query_id = ?", [query_id])
        db.execute("DELETE FROM probes WHERE query_id = ?", [query_id])
        db.execute("DELETE FROM queries WHERE id = ?", [query_id])
    return row


def edit_query(db: sqlite_utils.Database, query_id: int, changes: dict, measured_changed: bool) -> list[int]:
    """Change a query's columns (``changes``: prompt, completion, chat, measurement, alternative,
    tags, notes) in one transaction. ``measured_changed``: what is measured changed (prompt,
    completion, chat, measurement or alternative), so
    every result set that scored the query is marked stale for it, and the edit is refused while
    its investigation has an unfinished scoring run. Returns the ids of the result sets marked."""
    with db.atomic():
        row = query(db, query_id)
        if not measured_changed:
            db["queries"].update(query_id, changes)
            return []
        _refuse_with_unfinished_runs(db, row, "edit")
        stamp = now()
        db["queries"].update(query_id, {**changes, "edited_at": stamp})
        sets = [r[0] for r in db.execute(
            "SELECT rs.id FROM result_sets rs WHERE rs.investigation_id = ? AND EXISTS "
            "(SELECT 1 FROM json_each(rs.settings, '$.query_ids') j WHERE j.value = ?) ORDER BY rs.id",
            [row["investigation_id"], query_id]).fetchall()]
        for rs_id in sets:
            db["stale_results"].upsert({"result_set_id": rs_id, "query_id": query_id, "created_at": stamp}, pk=("result_set_id", "query_id"))
    return sets


def add_probe(db: sqlite_utils.Database, query_id: int, text: str, label: str = "") -> int:
    """A hand-written training sequence to score against query ``query_id``."""
    query(db, query_id)
    if not text.strip():
        raise InflqError("a probe needs some text")
    with db.atomic():
        return db["probes"].insert({"query_id": query_id, "text": text, "label": label, "created_at": now()}).last_pk


def probes(db: sqlite_utils.Database, query_id: int) -> list[dict]:
    return list(db["probes"].rows_where("query_id = ?", [query_id], order_by="id"))


def investigation_probes(db: sqlite_utils.Database, investigation_name: str | int) -> list[dict]:
    """The probes of every query of an investigation, in query order then probe order."""
    inv = investigation(db, investigation_name)
    return list(db.query(
        "SELECT p.* FROM probes p JOIN queries q ON q.id = p.query_id WHERE q.investigation_id = ? ORDER BY q.position, p.id", [inv["id"]]))


# -- sequence tags --------------------------------------------------------------------------------


def tag_sequence(db: sqlite_utils.Database, investigation_name: str, seq_id: str, tag: str, note: str = "") -> int:
    inv = investigation(db, investigation_name)
    with db.atomic():
        return db["sequence_tags"].insert({"investigation_id": inv["id"], "seq_id": seq_id, "tag": tag, "note": note, "created_at": now()}).last_pk


def sequence_tags(db: sqlite_utils.Database, investigation_name: str, seq_id: str) -> list[dict]:
    inv = investigation(db, investigation_name)
    return list(db["sequence_tags"].rows_where("investigation_id = ? AND seq_id = ?", [inv["id"], seq_id], order_by="id"))


# -- sequences (the tokenized corpus) -------------------------------------------------------------


def replace_sequences(db: sqlite_utils.Database, rows: Iterable[tuple], meta: dict) -> None:
    """Replace every ``sequences`` row (tuples in ``SEQUENCE_COLUMNS`` order) and set the ``meta``
    keys given, in one transaction."""
    with db.atomic():
        db.execute("DELETE FROM sequences")
        db["sequences"].insert_all((dict(zip(SEQUENCE_COLUMNS, r, strict=False)) for r in rows), batch_size=5000)
        for key, value in meta.items():
            set_meta(db, key, value)


def sequence_count(db: sqlite_utils.Database) -> int:
    return db["sequences"].count


def sequence_rows(db: sqlite_utils.Database, indices: list[int]) -> dict[int, dict]:
    """The ``sequences`` rows of these corpus indices, by index (missing ones are left out)."""
    if not indices:
        return {}
    out: dict[int, dict] = {}
    ids = [int(i) for i in indices]
    for start in range(0, len(ids), 900):
        part = ids[start : start + 900]
        marks = ",".join("?" * len(part))
        for row in db.query(f"SELECT * FROM sequences WHERE idx IN ({marks})", part):
            out[row["idx"]] = row
    return out


def sequence_by_id(db: sqlite_utils.Database, seq_id: str) -> dict | None:
    """The ``sequences`` row with this sequence id, or None."""
    return next(db["sequences"].rows_where("seq_id = ?", [seq_id]), None)


def metadata_fields(db: sqlite_utils.Database) -> list[str]:
    """The metadata fields some sequence has: ``source`` (when any sequence has one) and the keys of
    the corpus's other fields, sorted."""
    fields = {r[0] for r in db.execute("SELECT DISTINCT j.key FROM sequences, json_each(sequences.meta) AS j WHERE sequences.meta IS NOT NULL AND json_valid(sequences.meta)")}
    if db.execute("SELECT 1 FROM sequences WHERE source IS NOT NULL AND source != '' LIMIT 1").fetchone():
        fields.add("source")
    return sorted(fields)


def metadata_column(db: sqlite_utils.Database, field_name: str) -> np.ndarray:
    """One metadata field for every sequence, as strings (``""`` where absent)."""
    n = db["sequences"].count
    out = np.full(n, "", dtype=object)
    if field_name in ("source", "doc_id", "seq_id"):
        for row in db.query(f"SELECT idx, [{field_name}] AS v FROM sequences"):
            out[row["idx"]] = row["v"] or ""
        return out
    for row in db.query("SELECT idx, json_extract(meta, ?) AS v FROM sequences", [f"$.{field_name}"]):
        out[row["idx"]] = "" if row["v"] is None else str(row["v"])
    return out


# -- the file-hash cache ---------------------------------------------------------------------------


def cached_hash(db: sqlite_utils.Database, path: str, size: int, mtime_ns: int) -> str | None:
    """The recorded SHA-256 of ``path`` if it was hashed at this size and modification time."""
    row = next(db["file_hashes"].rows_where("path = ?", [path]), None)
    if row and row["size"] == size and row["mtime_ns"] == mtime_ns:
        return row["sha256"]
    return None


def remember_hash(db: sqlite_utils.Database, path: str, size: int, mtime_ns: int, sha256: str) -> None:
    with db.atomic():
        db["file_hashes"].upsert({"path": path, "size": size, "mtime_ns": mtime_ns, "sha256": sha256}, pk="path")


def probe_count(db: sqlite_utils.Database, query_id: int) -> int:
    """How many probe sequences a query has."""
    return db["probes"].count_where("query_id = ?", [query_id])


def latest_investigation(db: sqlite_utils.Database) -> str | None:
    """The investigation with the most recent result set, else the one with the most recently
    added query; None when neither exists."""
    for table in ("result_sets", "queries"):
        row = db.execute(
            f"SELECT i.name FROM {table} t JOIN investigations i ON i.id = t.investigation_id ORDER BY t.id DESC LIMIT 1"
        ).fetchone()
        if row is not None:
            return row[0]
    return None
