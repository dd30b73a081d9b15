"""Validations against the proximal Bregman response (``validations``): one row per estimator of
each ``inflq validate`` that was saved."""

from __future__ import annotations

from typing import Any

from .schema import now


def insert_validation(db, rows: list[dict[str, Any]]) -> int:
    """Record one validation's rows under the next validation number. Returns that number."""
    with db.atomic():
        vid = (db.execute("SELECT coalesce(max(validation), 0) FROM validations").fetchone()[0] or 0) + 1
        db["validations"].insert_all([{**r, "validation": vid, "created_at": now()} for r in rows])
    return vid
