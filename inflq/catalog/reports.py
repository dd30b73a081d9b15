"""Read-only views over stored results, for exports and the demo."""

from __future__ import annotations

import sqlite_utils


def export_rows(db: sqlite_utils.Database, result_set_id: int) -> list[dict]:
    """Every stored (query, side, rank) of a result set with its query's prompt, completion, measurement and the
    sequence's source, by query position, top side first, then rank."""
    return list(db.query(
        "SELECT r.*, q.prompt, q.completion, q.measurement, q.alternative, s.source FROM results r JOIN queries q ON q.id = r.query_id "
        "LEFT JOIN sequences s ON s.idx = r.seq_idx WHERE r.result_set_id = ? "
        "ORDER BY q.position, r.side DESC, r.rank", [result_set_id],
    ))


def result_sets_scored_with(db: sqlite_utils.Database, investigation_id: int, estimator: str, filter_name: str) -> list[dict]:
    """An investigation's result sets made with this estimator and candidate filter, oldest first."""
    return list(db["result_sets"].rows_where(
        "investigation_id = ? AND estimator = ? AND filter = ?", [investigation_id, estimator, filter_name], order_by="id"))
