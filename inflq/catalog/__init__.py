"""The project catalog: the only package that knows table names or writes SQL.

Everything else (projects, runs, integrity, sharing, the CLI and the TUI, the plugins) reads and
writes the catalog through the functions exported here. ``tests/test_architecture.py`` fails when
code outside ``inflq/catalog/`` touches ``db[...]`` or runs SQL.

- ``schema``: the connection, the numbered migrations, the meta table.
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
]
