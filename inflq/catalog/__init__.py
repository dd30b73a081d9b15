"""The project catalog: the only package that knows table names or writes SQL.

Everything else (projects, runs, integrity, sharing, the CLI and the TUI, the plugins) reads and
writes the catalog through the functions exported here. ``tests/test_architecture.py`` fails when
code outside ``inflq/catalog/`` touches ``db[...]`` or runs SQL.

- ``schema``: the connection, the numbered migrations, the meta table.
- ``records``: investigations, queries, probes, sequence tags, the ``sequences`` of the tokenized
  corpus and the file-hash cache.
- ``factors``: cached factor sets.
- ``reports``: read-only views over stored results (exports, the demo).
- ``files``: the catalog as a file (snapshots for packing, checks of an archive's catalog).
"""

from .schema import (
    MIGRATION_SET,
    CatalogDatabase,
    busy_timeout_ms,
    check_version,
    connect,
    get_meta,
    migrations,
    now,
    set_meta,
)

# isort: split
# -- records, factor sets, reports, files (the #14 catalog block) --
from .factors import factor_set, factor_set_uses, factor_sets, remove_factor_set
from .files import all_meta, applied_migrations, check_archived, open_copy, snapshot
from .records import (
    SEQUENCE_COLUMNS,
    add_probe,
    add_queries,
    cached_hash,
    create_investigation,
    delete_investigation,
    investigation,
    investigations,
    metadata_column,
    probes,
    queries,
    query,
    remember_hash,
    rename_investigation,
    replace_sequences,
    sequence_by_id,
    sequence_count,
    sequence_rows,
    sequence_tags,
    tag_sequence,
)
from .reports import export_rows, result_sets_scored_with
from .schema import RETIRED_MIGRATIONS

__all__ = [
    "MIGRATION_SET",
    "CatalogDatabase",
    "busy_timeout_ms",
    "check_version",
    "connect",
    "get_meta",
    "migrations",
    "now",
    "set_meta",
    # records, factor sets, reports, files
    "RETIRED_MIGRATIONS", "SEQUENCE_COLUMNS", "add_probe", "add_queries", "all_meta", "applied_migrations", "cached_hash",
    "check_archived", "create_investigation", "delete_investigation", "export_rows", "factor_set",
    "factor_set_uses", "factor_sets", "investigation", "investigations", "metadata_column", "open_copy",
    "probes", "queries", "query", "remember_hash", "remove_factor_set", "rename_investigation",
    "replace_sequences", "result_sets_scored_with", "sequence_by_id", "sequence_count", "sequence_rows",
    "sequence_tags", "snapshot", "tag_sequence",
]
