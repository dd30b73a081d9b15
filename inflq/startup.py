"""What importing inflq does before anything else, so that every command starts fast.

* :func:`inflq.threads.prefer_sleeping_workers` (thread pools; see there).
* sqlite-utils without pandas: ``sqlite_utils.db`` imports pandas when it is installed (it is, with
  ``datasets``), only to store ``pandas.Timestamp`` values as TEXT. That import costs 0.3 s, half
  of ``inflq --help``; the catalog never stores pandas objects. So sqlite-utils is imported once,
  with pandas hidden from it, unless pandas is already loaded (then there is nothing to save and
  nothing is hidden). Later ``import pandas`` works as usual.
"""

from __future__ import annotations

import sys


def import_sqlite_utils_without_pandas() -> None:
    if "sqlite_utils" in sys.modules or "pandas" in sys.modules:
        return
    sys.modules["pandas"] = None  # type: ignore[assignment]  # `import pandas` raises ImportError
    try:
        import sqlite_utils  # noqa: F401
    finally:
        del sys.modules["pandas"]
