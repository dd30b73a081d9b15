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
    "queries": ["id", "investigation_id", "position", "prompt", "completion", "chat", "tags", "notes", "created_at"],
    "probes": ["id", "query_id", "text", "label", "created_at"],
    "sequences": ["idx", "seq_id", "doc_id", "chunk", "n_tokens", "source", "meta"],
    "factor_sets": ["id", "key", "estimator", "settings", "modules", "model_fingerprint", "data_fingerprint", "num_sequences", "seed", "path", "checksum", "seconds", "created_at"],
    "runs": ["id", "investigation_id", "kind", "estimator", "filter", "executor", "settings", "status", "phase", "done", "total", "factor_set_id", "model_fingerprint", "corpus_fingerprint", "started_at", "finished_at", "seconds", "error"],
    "run_shards": ["run_id", "shard", "n", "path", "checksum", "seconds"],
    "result_sets": ["id", "run_id", "investigation_id", "name", "estimator", "filter", "settings", "num_candidates", "scores_path", "scores_checksum", "queries_path", "queries_checksum", "created_at"],
    "results": ["result_set_id", "query_id", "side", "rank", "seq_idx", "seq_id", "score", "module_scores", "layer_scores", "text"],
    "sequence_tags": ["id", "investigation_id", "seq_id", "tag", "note", "created_at"],
    "file_hashes": ["path", "size", "mtime_ns", "sha256"],
    "checkpoints": ["id", "path", "learning_rate", "fingerprint", "created_at"],
    "validations": ["id", "validation", "investigation_id", "estimator", "damping", "pearson", "spearman", "fit_seconds", "ihvp_seconds", "num_queries", "num_sequences", "settings", "created_at"],
    "fit_shards": ["run_id", "pass_key", "shard", "n", "factor_key", "path", "checksum", "seconds"],
    "_sqlite_migrations": ["id", "migration_set", "name", "applied_at"],
}


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
