"""The catalog schema is exactly what the migrations say, and catalogs from newer inflq are refused."""

from __future__ import annotations

import sqlite3

import pytest
import sqlite_utils
from sqlite_utils.migrations import Migrations

from inflq import catalog
from inflq.errors import InflqError

EXPECTED = {
    "meta": ["key", "value"],
    "investigations": ["id", "name", "description", "created_at"],
    "queries": ["id", "investigation_id", "position", "prompt", "completion", "chat", "tags", "notes", "created_at", "edited_at", "measurement", "alternative"],
    "probes": ["id", "query_id", "text", "label", "created_at"],
    "sequences": ["idx", "seq_id", "doc_id", "chunk", "n_tokens", "source", "meta"],
    "factor_sets": ["id", "key", "estimator", "settings", "modules", "model_fingerprint", "data_fingerprint", "num_sequences", "seed", "path", "checksum", "seconds", "created_at"],
    "runs": ["id", "investigation_id", "kind", "estimator", "filter", "executor", "settings", "status", "phase", "done", "total", "factor_set_id", "model_fingerprint", "corpus_fingerprint", "started_at", "finished_at", "seconds", "error"],
    "run_shards": ["run_id", "shard", "n", "path", "checksum", "seconds"],
    "result_sets": ["id", "run_id", "investigation_id", "name", "estimator", "filter", "settings", "num_candidates", "scores_path", "scores_checksum", "queries_path", "queries_checksum", "created_at"],
    "results": ["result_set_id", "query_id", "side", "rank", "seq_idx", "seq_id", "score", "module_scores", "layer_scores", "text"],
    "sequence_tags": ["id", "investigation_id", "seq_id", "tag", "note", "created_at"],
    "file_hashes": ["path", "size", "mtime_ns", "sha256"],
    "validations": ["id", "validation", "investigation_id", "estimator", "damping", "pearson", "spearman", "fit_seconds", "ihvp_seconds", "num_queries", "num_sequences", "settings", "created_at", "method", "lds", "lds_ci"],
    "lds_subsets": ["study", "subset", "num_sequences", "indices_sha", "measurements", "seconds", "created_at", "investigation_id"],
    "stale_results": ["result_set_id", "query_id", "created_at"],
    "fit_shards": ["run_id", "pass_key", "shard", "n", "factor_key", "path", "checksum", "seconds"],
    "self_influence": ["key", "estimator", "settings", "factor_set_id", "num_sequences", "path", "checksum", "seconds", "created_at"],
    "_sqlite_migrations": ["id", "migration_set", "name", "applied_at"],
}
# TracIn's table, made by the tracin plugin's own migration set (the core's 0002 until #14).
CHECKPOINT_COLUMNS = ["id", "path", "learning_rate", "fingerprint", "created_at"]


def test_schema_is_exact(tmp_path):
    db = catalog.connect(tmp_path / "c.db", create=True)
    assert set(db.table_names()) == set(EXPECTED)
    for table, cols in EXPECTED.items():
        assert [c.name for c in db[table].columns] == cols, table
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    applied = [m.name for m in catalog.migrations.applied(db)]
    assert applied[0] == "0001_initial" and "0004_fit_shards" in applied
    assert applied == [m.name for m in catalog.migrations._migrations]


def test_reopen_applies_nothing_twice(tmp_path):
    catalog.connect(tmp_path / "c.db", create=True).conn.close()
    db = catalog.connect(tmp_path / "c.db")
    assert len(catalog.migrations.applied(db)) == len(catalog.migrations._migrations)


def test_newer_catalog_is_refused_and_untouched(tmp_path):
    path = tmp_path / "c.db"
    db = catalog.connect(path, create=True)
    db["_sqlite_migrations"].insert({"migration_set": "inflq", "name": "9999_from_the_future", "applied_at": "2030"})
    db.conn.close()
    before = path.read_bytes()
    with pytest.raises(InflqError, match="newer inflq"):
        catalog.connect(path)
    assert path.read_bytes() == before


def test_not_a_database(tmp_path):
    path = tmp_path / "c.db"
    path.write_text("this is not sqlite" * 100)
    with pytest.raises(InflqError, match="damaged or not a database|cannot open"):
        catalog.connect(path)


def test_older_catalog_is_backed_up_and_migrated(tmp_path, monkeypatch):
    path = tmp_path / "c.db"
    db = catalog.connect(path, create=True)
    db.conn.close()
    extra = Migrations("inflq")
    for m in catalog.migrations._migrations:
        extra._migrations.append(m)

    @extra(name="0002_test_column")
    def _m2(db: sqlite_utils.Database) -> None:
        db["queries"].add_column("colour", str)

    monkeypatch.setattr(catalog.schema, "migrations", extra)
    db = catalog.connect(path)
    assert "colour" in db["queries"].columns_dict
    assert list(tmp_path.glob("c.db.bak-*")), "a backup is made before migrating"
    conn = sqlite3.connect(next(tmp_path.glob("c.db.bak-*")))
    assert "colour" not in [r[1] for r in conn.execute("PRAGMA table_info(queries)")]


# -- TracIn's checkpoint table: the plugin's own migration set, and catalogs that got it from the core --


def _old_core_migrations() -> Migrations:
    """The core migrations as inflq applied them before #14, with 0002_checkpoints in place."""
    old = Migrations("inflq")
    old._migrations.append(catalog.migrations._migrations[0])

    @old(name="0002_checkpoints")
    def _m2(db: sqlite_utils.Database) -> None:
        db["checkpoints"].create({"id": int, "path": str, "learning_rate": float, "fingerprint": str, "created_at": str}, pk="id")
        db["checkpoints"].create_index(["path"], unique=True)

    old._migrations.extend(catalog.migrations._migrations[1:])
    return old


def test_a_new_catalog_gets_the_checkpoint_table_from_tracins_set(tmp_path):
    from types import SimpleNamespace

    from inflq_builtins import tracin

    db = catalog.connect(tmp_path / "c.db", create=True)
    assert "checkpoints" not in db.table_names()
    project = SimpleNamespace(db=db)
    assert tracin.recorded_checkpoints(project) == []
    tracin.open_tables(project)
    tracin.open_tables(project)  # idempotent
    assert [c.name for c in db["checkpoints"].columns] == CHECKPOINT_COLUMNS
    assert [m.name for m in tracin.migrations.applied(db)] == ["0001_checkpoints"]
    assert [m.name for m in catalog.migrations.applied(db)] == [m.name for m in catalog.migrations._migrations]


def test_an_old_catalog_with_the_core_checkpoint_migration_keeps_its_rows(tmp_path):
    from types import SimpleNamespace

    from inflq_builtins import tracin

    path = tmp_path / "c.db"
    old = catalog.CatalogDatabase(sqlite3.connect(str(path)))
    _old_core_migrations().apply(old)
    old["checkpoints"].insert({"path": "checkpoints/step-10", "learning_rate": 0.5, "fingerprint": "f" * 32, "created_at": "2026"})
    old.conn.commit()
    old.conn.close()

    db = catalog.connect(path)  # no "newer inflq" refusal, nothing to migrate in the core set
    assert not list(tmp_path.glob("c.db.bak-*")), "no core migration was pending"
    assert "0002_checkpoints" in [m.name for m in catalog.migrations.applied(db)]
    project = SimpleNamespace(db=db)
    tracin.open_tables(project)
    rows = tracin.recorded_checkpoints(project)
    assert [(r["path"], r["learning_rate"], r["fingerprint"]) for r in rows] == [("checkpoints/step-10", 0.5, "f" * 32)]
    assert [c.name for c in db["checkpoints"].columns] == CHECKPOINT_COLUMNS
    assert [m.name for m in tracin.migrations.applied(db)] == ["0001_checkpoints"]
    db.conn.close()
    assert len(tracin.recorded_checkpoints(SimpleNamespace(db=catalog.connect(path)))) == 1


def test_a_retired_migration_is_not_mistaken_for_a_newer_one(tmp_path):
    path = tmp_path / "c.db"
    db = catalog.connect(path, create=True)
    db["_sqlite_migrations"].insert({"migration_set": "inflq", "name": "0002_checkpoints", "applied_at": "2026"})
    db.conn.close()
    catalog.connect(path).conn.close()
    db = catalog.connect(path)
    db["_sqlite_migrations"].insert({"migration_set": "inflq", "name": "0005_from_the_future", "applied_at": "2030"})
    db.conn.close()
    with pytest.raises(InflqError, match="newer inflq"):
        catalog.connect(path)
