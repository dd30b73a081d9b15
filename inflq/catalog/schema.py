"""The catalog's schema and connection: one SQLite file, written through sqlite-utils, upgraded by numbered
migrations applied on open. WAL mode and a busy timeout let the UI read while a run writes."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.request import pathname2url

import sqlite_utils
from sqlite_utils.migrations import Migrations

from ..errors import CatalogDamaged, InflqError

MIGRATION_SET = "inflq"
migrations = Migrations(MIGRATION_SET)

# Core migrations that older inflq applied and that moved elsewhere: catalogs that have them open as
# usual. 0002_checkpoints made TracIn's ``checkpoints`` table, now made by the tracin plugin's own
# migration set (``inflq_builtins.tracin``), which keeps the table and rows such catalogs have.
RETIRED_MIGRATIONS = frozenset({"0002_checkpoints"})


@migrations(name="0001_initial")
def m0001_initial(db: sqlite_utils.Database) -> None:
    db["meta"].create({"key": str, "value": str}, pk="key")
    db["investigations"].create(
        {"id": int, "name": str, "description": str, "created_at": str}, pk="id", not_null={"name"}
    )
    db["investigations"].create_index(["name"], unique=True)
    db["queries"].create(
        {
            "id": int,
            "investigation_id": int,
            "position": int,
            "prompt": str,
            "completion": str,
            "chat": int,
            "tags": str,
            "notes": str,
            "created_at": str,
        },
        pk="id",
        foreign_keys=[("investigation_id", "investigations", "id")],
    )
    db["probes"].create(
        {"id": int, "query_id": int, "text": str, "label": str, "created_at": str},
        pk="id",
        foreign_keys=[("query_id", "queries", "id")],
    )
    db["sequences"].create(
        {"idx": int, "seq_id": str, "doc_id": str, "chunk": int, "n_tokens": int, "source": str, "meta": str},
        pk="idx",
    )
    db["sequences"].create_index(["seq_id"], unique=True)
    db["factor_sets"].create(
        {
            "id": int,
            "key": str,
            "estimator": str,
            "settings": str,
            "modules": str,
            "model_fingerprint": str,
            "data_fingerprint": str,
            "num_sequences": int,
            "seed": int,
            "path": str,
            "checksum": str,
            "seconds": float,
            "created_at": str,
        },
        pk="id",
    )
    db["factor_sets"].create_index(["key"], unique=True)
    db["runs"].create(
        {
            "id": int,
            "investigation_id": int,
            "kind": str,
            "estimator": str,
            "filter": str,
            "executor": str,
            "settings": str,
            "status": str,
            "phase": str,
            "done": int,
            "total": int,
            "factor_set_id": int,
            "model_fingerprint": str,
            "corpus_fingerprint": str,
            "started_at": str,
            "finished_at": str,
            "seconds": float,
            "error": str,
        },
        pk="id",
        foreign_keys=[("investigation_id", "investigations", "id")],
    )
    db["run_shards"].create(
        {"run_id": int, "shard": int, "n": int, "path": str, "checksum": str, "seconds": float},
        pk=("run_id", "shard"),
        foreign_keys=[("run_id", "runs", "id")],
    )
    db["result_sets"].create(
        {
            "id": int,
            "run_id": int,
            "investigation_id": int,
            "name": str,
            "estimator": str,
            "filter": str,
            "settings": str,
            "num_candidates": int,
            "scores_path": str,
            "scores_checksum": str,
            "queries_path": str,
            "queries_checksum": str,
            "created_at": str,
        },
        pk="id",
        foreign_keys=[("run_id", "runs", "id"), ("investigation_id", "investigations", "id")],
    )
    db["results"].create(
        {
            "result_set_id": int,
            "query_id": int,
            "side": str,
            "rank": int,
            "seq_idx": int,
            "seq_id": str,
            "score": float,
            "module_scores": str,
            "layer_scores": str,
            "text": str,
        },
        pk=("result_set_id", "query_id", "side", "rank"),
        foreign_keys=[("result_set_id", "result_sets", "id"), ("query_id", "queries", "id")],
    )
    db["sequence_tags"].create(
        {"id": int, "investigation_id": int, "seq_id": str, "tag": str, "note": str, "created_at": str},
        pk="id",
    )
    db["file_hashes"].create({"path": str, "size": int, "mtime_ns": int, "sha256": str}, pk="path")


@migrations(name="0003_validations")
def m0003_validations(db: sqlite_utils.Database) -> None:
    # `inflq validate`: one row per estimator (and damping) of one validation, against the PBRF.
    db["validations"].create(
        {
            "id": int,
            "validation": int,
            "investigation_id": int,
            "estimator": str,
            "damping": float,
            "pearson": float,
            "spearman": float,
            "fit_seconds": float,
            "ihvp_seconds": float,
            "num_queries": int,
            "num_sequences": int,
            "settings": str,
            "created_at": str,
        },
        pk="id",
        foreign_keys=[("investigation_id", "investigations", "id")],
    )


@migrations(name="0004_fit_shards")
def m0004_fit_shards(db: sqlite_utils.Database) -> None:
    # A factor-fitting pass's partial sums, one row per committed shard, so that a run killed
    # during fitting resumes there. ``pass_key`` is "<pass number>:<phase>"; ``factor_key`` is the
    # factor set being fitted (shards of another key are stale and ignored).
    db["fit_shards"].create(
        {"run_id": int, "pass_key": str, "shard": int, "n": int, "factor_key": str, "path": str, "checksum": str, "seconds": float},
        pk=("run_id", "pass_key", "shard"),
        foreign_keys=[("run_id", "runs", "id")],
    )


@migrations(name="0005_lds")
def m0005_lds(db: sqlite_utils.Database) -> None:
    # LDS (`inflq validate --lds`): a validation row says which ground truth it was measured
    # against (``method``: "pbrf" or "lds"); an LDS row's score and its 95 % interval over queries.
    db["validations"].add_column("method", str, not_null_default="pbrf")
    db["validations"].add_column("lds", float)
    db["validations"].add_column("lds_ci", float)
    # One row per retrained subset: the queries' measured log-probabilities under the model
    # retrained on it (a committed shard: a rerun of the same study skips it). ``study`` is the key
    # of what determines the measurements (model, corpus, queries, trainer, seed, fraction).
    db["lds_subsets"].create(
        {"study": str, "subset": int, "num_sequences": int, "indices_sha": str, "measurements": str, "seconds": float, "created_at": str},
        pk=("study", "subset"),
    )


@migrations(name="0006_removal")
def m0006_removal(db: sqlite_utils.Database) -> None:
    # `inflq query edit`: a result set that scored a query before its prompt or completion was edited
    # is stale for it (one row per result set and query, removed with either); the query says when.
    db["queries"].add_column("edited_at", str)
    db["stale_results"].create(
        {"result_set_id": int, "query_id": int, "created_at": str},
        pk=("result_set_id", "query_id"),
        foreign_keys=[("result_set_id", "result_sets", "id"), ("query_id", "queries", "id")],
    )
    # The investigation whose validation retrained an LDS subset, so that removing the investigation
    # removes it (rows from before: through the studies its validations name).
    db["lds_subsets"].add_column("investigation_id", int)
@migrations(name="0007_self_influence")
def m0007_self_influence(db: sqlite_utils.Database) -> None:
    # `inflq self-influence`: each computed ranking is kept, addressed by a hash of everything that
    # determines it (estimator and its settings, factor set, modules, model, corpus, sequences).
    db["self_influence"].create(
        {"key": str, "estimator": str, "settings": str, "factor_set_id": int, "num_sequences": int,
         "path": str, "checksum": str, "seconds": float, "created_at": str},
        pk="key",
    )


@migrations(name="0008_measurements")
def m0008_measurements(db: sqlite_utils.Database) -> None:
    # What a query measures (a measurement plugin's spec) and, for one that compares two
    # completions (margin), the alternative. Queries from before measured log p(completion).
    db["queries"].add_column("measurement", str, not_null_default="logprob")
    db["queries"].add_column("alternative", str)


class CatalogDatabase(sqlite_utils.Database):
    """sqlite-utils' Database whose outermost transactions begin IMMEDIATE: the write lock is taken
    (waiting up to the busy timeout) before the first read. A deferred BEGIN that reads first and
    then writes fails at once with "database is locked" (SQLITE_BUSY_SNAPSHOT, no busy wait) when
    another process committed in between, e.g. a UI adding queries while a run commits shards."""

    @contextlib.contextmanager
    def atomic(self):
        if self.conn.in_transaction:
            with super().atomic():
                yield self
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self
        except BaseException:
            self.rollback()
            raise
        else:
            try:
                self.conn.execute("COMMIT")
            except BaseException:
                self.rollback()
                raise


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())


def busy_timeout_ms() -> int:
    """How long a writer waits for another process's lock (``INFLQ_BUSY_TIMEOUT`` ms, default 10 s)."""
    try:
        return int(os.environ.get("INFLQ_BUSY_TIMEOUT", "10000"))
    except ValueError:
        return 10000


def connect(path: Path, *, create: bool = False, readonly: bool = False) -> sqlite_utils.Database:
    """Open (and migrate) the catalog at ``path``. A catalog from a newer inflq is refused."""
    path = Path(path)
    if not create and not path.exists():
        raise InflqError(f"{path.parent} has no catalog ({path.name}); create a project with `inflq init`")
    try:
        if readonly:
            conn = open_readonly(path)
        else:
            conn = sqlite3.connect(str(path), timeout=busy_timeout_ms() / 1000, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {busy_timeout_ms()}")
        db = CatalogDatabase(conn)
        if not readonly:
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA foreign_keys = ON")
    except sqlite3.DatabaseError as exc:
        raise CatalogDamaged(f"cannot open the catalog {path} ({exc}); `inflq check {path.parent} --repair` restores its newest good copy") from None
    try:
        check_version(db)
        pending = migrations.pending(db)
        if pending and not readonly:
            if path.exists() and path.stat().st_size > 0 and migrations.applied(db):
                backup = path.with_name(path.name + f".bak-{int(time.time())}")
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                shutil.copy2(path, backup)
            migrations.apply(db)
        elif pending:  # written by an older inflq: read an upgraded private copy, leave the file as it is
            db = CatalogDatabase(_upgraded_copy(db.conn, path))
            db.conn.execute(f"PRAGMA busy_timeout = {busy_timeout_ms()}")
    except sqlite3.OperationalError as exc:
        msg = str(exc)
        if "locked" in msg or "busy" in msg:
            raise InflqError(f"the catalog {path} is locked by another process; wait for it or close it") from None
        if "readonly" in msg or "read-only" in msg:
            raise InflqError(f"the catalog {path} is read-only here and this command writes to it; copy the project somewhere writable") from None
        raise InflqError(f"catalog {path}: {msg}") from None
    except sqlite3.DatabaseError as exc:
        raise CatalogDamaged(f"the catalog {path} is damaged or not a database ({exc}); `inflq check {path.parent} --repair` restores its newest good copy") from None
    return db


def open_readonly(path: Path) -> sqlite3.Connection:
    """A read-only connection to the catalog at ``path``, also where nothing may be written beside it
    (a read-only folder, another user's project).

    SQLite reads a WAL-mode database in ``mode=ro`` only where it can open the ``-shm`` file. Where
    it cannot, the catalog is read as it is on disk (``immutable=1``) when its ``-wal`` file holds no
    commits, else from a private copy of the two files, into which the WAL's commits are folded:
    a snapshot, as a reader without write access can only have."""
    timeout = busy_timeout_ms() / 1000
    uri = "file:" + pathname2url(str(Path(path).resolve()))
    conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=timeout, check_same_thread=False)
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return conn
    except sqlite3.OperationalError:
        conn.close()
    wal = Path(path).with_name(Path(path).name + "-wal")
    if not wal.exists() or wal.stat().st_size == 0:
        return sqlite3.connect(f"{uri}?immutable=1", uri=True, timeout=timeout, check_same_thread=False)
    copy = _private_folder() / Path(path).name
    shutil.copyfile(path, copy)
    shutil.copyfile(wal, copy.with_name(copy.name + "-wal"))
    fold = sqlite3.connect(str(copy))
    try:
        fold.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        fold.execute("PRAGMA journal_mode = DELETE")
    finally:
        fold.close()
    return sqlite3.connect("file:" + pathname2url(str(copy)) + "?mode=ro", uri=True, timeout=timeout, check_same_thread=False)


def _private_folder() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="inflq-readonly-"))
    atexit.register(shutil.rmtree, folder, True)
    return folder


def _upgraded_copy(conn: sqlite3.Connection, path: Path) -> sqlite3.Connection:
    """A read-only connection to a private copy of the catalog ``conn`` reads, with this inflq's
    migrations applied: how a reader without write access reads a catalog of an older inflq."""
    copy = _private_folder() / Path(path).name
    dst = sqlite3.connect(str(copy))
    try:
        conn.backup(dst)
    finally:
        conn.close()
    try:
        migrations.apply(CatalogDatabase(dst))
        dst.execute("PRAGMA journal_mode = DELETE")
    finally:
        dst.close()
    return sqlite3.connect("file:" + pathname2url(str(copy)) + "?mode=ro", uri=True, timeout=busy_timeout_ms() / 1000, check_same_thread=False)


def check_version(db: sqlite_utils.Database) -> None:
    """Refuse a catalog that has migrations this inflq does not know (written by a newer inflq)."""
    known = {m.name for m in migrations._migrations} | RETIRED_MIGRATIONS
    applied = {m.name for m in migrations.applied(db)}
    unknown = sorted(applied - known)
    if unknown:
        raise InflqError(
            f"this project was written by a newer inflq (catalog migration {unknown[-1]}); upgrade inflq to open it"
        )


def get_meta(db: sqlite_utils.Database, key: str, default: Any = None) -> Any:
    try:
        row = db["meta"].get(key)
    except sqlite_utils.db.NotFoundError:
        return default
    return json.loads(row["value"])


def set_meta(db: sqlite_utils.Database, key: str, value: Any) -> None:
    db["meta"].upsert({"key": key, "value": json.dumps(value)}, pk="key")
