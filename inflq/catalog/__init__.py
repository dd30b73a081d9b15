"""The project catalog: the only package that knows table names or writes SQL.

Everything else (projects, runs, integrity, sharing, the CLI and the TUI, the plugins) reads and
writes the catalog through the functions exported here. ``tests/test_architecture.py`` fails when
code outside ``inflq/catalog/`` touches ``db[...]`` or runs SQL.

- ``schema``: the connection, the numbered migrations, the meta table.
- ``runs``: runs and their status transitions, scoring and fitting shards, the factor sets runs
  fit or reuse, the files the catalog references.
- ``results``: result sets, their stored sequences and the search over them.
- ``validations``: saved validations against the PBRF.
"""

from .results import (
    count_results,
    get_result_set,
    insert_result_set,
    result_set_of_run,
    result_sets_of,
    stored_results,
    update_result_set,
)
from .runs import (
    delete_factor_set,
    delete_score_shards,
    dependents,
    factor_set_by_key,
    finish_run,
    fit_shard_totals,
    fit_shards,
    get_factor_set,
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
    store_factor_set,
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
from .validations import insert_validation

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
    # runs, results, validations
    "count_results", "delete_factor_set", "delete_score_shards", "dependents", "factor_set_by_key", "finish_run",
    "fit_shard_totals", "fit_shards", "get_factor_set", "get_result_set", "get_run", "insert_result_set", "insert_run",
    "insert_validation", "interrupted_run", "latest_run_id", "latest_run_using", "move_runs_to_factor_set",
    "record_fit_shards", "record_score_shard", "referenced_files", "restart_run", "result_set_of_run", "result_sets_of",
    "run_counts", "run_ids_using", "runs_of", "score_shard_totals", "score_shards", "store_factor_set", "stored_results",
    "update_result_set", "update_run",
]
