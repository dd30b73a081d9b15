"""The project catalog: the only package that knows table names or writes SQL.

Everything else (projects, runs, integrity, sharing, the CLI and the TUI, the plugins) reads and
writes the catalog through the functions exported here. ``tests/test_architecture.py`` fails when
code outside ``inflq/catalog/`` touches ``db[...]`` or runs SQL.

- ``schema``: the connection, the numbered migrations, the meta table.
- ``records``: investigations, queries, probes, sequence tags, the ``sequences`` of the tokenized
  corpus and the file-hash cache.
- ``factors``: cached factor sets (looked up by id or cache key, stored by runs, removed).
- ``reports``: read-only views over stored results (exports, the demo).
- ``files``: the catalog as a file (snapshots for packing, checks of an archive's catalog).
- ``runs``: runs and their status transitions, scoring and fitting shards, the files the catalog
  references.
- ``results``: result sets, their stored sequences and the search over them.
- ``validations``: saved validations against the PBRF and LDS retraining; ``lds_subsets``: LDS's committed retrained subsets.
"""

from .result_rows import (
    count_results,
    get_result_set,
    insert_result_set,
    result_set_of_run,
    result_sets_of,
    stored_results,
    update_result_set,
)
from .run_rows import (
    delete_score_shards,
    dependents,
    finish_run,
    fit_shard_totals,
    fit_shards,
    get_run,
    insert_run,
    interrupted_run,
    latest_run_id,
    latest_run_using,
    move_runs_to_factor_set,
    record_fit_shards,
    record_score_shard,
    referenced_files,
    restart_run,
    run_counts,
    run_ids_using,
    runs_of,
    score_shard_totals,
    score_shards,
    update_run,
)
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
from .validation_rows import insert_lds_subset, insert_validation, lds_subsets, validation_rows

# isort: split
# -- records, factor sets, reports, files (the #14 catalog block) --
from .factor_rows import (
    delete_factor_set,
    factor_set,
    factor_set_by_key,
    factor_set_uses,
    factor_sets,
    remove_factor_set,
    store_factor_set,
)
from .files import (
    all_meta,
    applied_migrations,
    check_archived,
    integrity_problem,
    open_copy,
    snapshot,
)
from .records import (
    SEQUENCE_COLUMNS,
    add_probe,
    add_queries,
    cached_hash,
    create_investigation,
    delete_investigation,
    investigation,
    investigation_probes,
    investigations,
    latest_investigation,
    metadata_column,
    metadata_fields,
    probe_count,
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
    "check_archived", "integrity_problem", "investigation_probes", "latest_investigation", "probe_count", "create_investigation", "delete_investigation", "export_rows", "factor_set",
    "factor_set_uses", "factor_sets", "investigation", "investigations", "metadata_column", "metadata_fields", "open_copy",
    "probes", "queries", "query", "remember_hash", "remove_factor_set", "rename_investigation",
    "replace_sequences", "result_sets_scored_with", "sequence_by_id", "sequence_count", "sequence_rows",
    "sequence_tags", "snapshot", "tag_sequence",
    # runs, results, validations
    "count_results", "delete_factor_set", "delete_score_shards", "dependents", "factor_set_by_key", "finish_run",
    "fit_shard_totals", "fit_shards", "get_result_set", "get_run", "insert_result_set", "insert_run",
    "insert_lds_subset", "insert_validation", "lds_subsets", "validation_rows", "interrupted_run", "latest_run_id", "latest_run_using", "move_runs_to_factor_set",
    "record_fit_shards", "record_score_shard", "referenced_files", "restart_run", "result_set_of_run", "result_sets_of",
    "run_counts", "run_ids_using", "runs_of", "score_shard_totals", "score_shards", "store_factor_set", "stored_results",
    "update_result_set", "update_run",
]
