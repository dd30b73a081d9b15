"""Validations (``validations``): one row per estimator of each ``inflq validate`` that was
saved, against the proximal Bregman response (``method`` "pbrf") or retraining (``method`` "lds");
and the committed shards of LDS retraining (``lds_subsets``)."""

from __future__ import annotations

import json
from typing import Any

from .schema import now


def insert_validation(db, rows: list[dict[str, Any]]) -> int:
    """Record one validation's rows under the next validation number. Returns that number."""
    with db.atomic():
        vid = (db.execute("SELECT coalesce(max(validation), 0) FROM validations").fetchone()[0] or 0) + 1
        db["validations"].insert_all([{**r, "validation": vid, "created_at": now()} for r in rows])
    return vid


def validation_rows(db, validation: int | None = None, method: str | None = None) -> list[dict[str, Any]]:
    """The rows of validation ``validation`` (default: the latest one, of ``method`` if given), in
    insertion order; ``settings`` decoded."""
    where, args = [], []
    if method is not None:
        where.append("method = ?")
        args.append(method)
    if validation is None:
        cond = f" WHERE {' AND '.join(where)}" if where else ""
        validation = db.execute(f"SELECT max(validation) FROM validations{cond}", args).fetchone()[0]
        if validation is None:
            return []
    rows = db.execute("SELECT * FROM validations WHERE validation = ? ORDER BY id", [validation])
    cols = [c[0] for c in rows.description]
    out = [dict(zip(cols, r)) for r in rows.fetchall()]
    for r in out:
        r["settings"] = json.loads(r["settings"]) if r.get("settings") else {}
    return out


def delete_validations(db, investigation_id: int) -> None:
    """Delete an investigation's validations and the LDS subsets retrained for it, keeping studies
    another investigation's validation or retraining also uses (identical queries share a study),
    in one transaction (the caller's, when it has one)."""
    def studies(where: str, args: list) -> set[str]:
        rows = db.execute(f"SELECT DISTINCT json_extract(settings, '$.study') FROM validations WHERE {where}", args).fetchall()
        return {r[0] for r in rows if r[0]}

    with db.atomic():
        mine = studies("investigation_id = ?", [investigation_id])
        mine |= {r[0] for r in db.execute("SELECT DISTINCT study FROM lds_subsets WHERE investigation_id = ?", [investigation_id]).fetchall()}
        shared = studies("investigation_id != ?", [investigation_id])
        shared |= {r[0] for r in db.execute(  # retrained for another investigation that still exists
            "SELECT DISTINCT study FROM lds_subsets WHERE investigation_id != ? AND investigation_id IN (SELECT id FROM investigations)",
            [investigation_id]).fetchall()}
        for study in sorted(mine - shared):
            db.execute("DELETE FROM lds_subsets WHERE study = ?", [study])
        db.execute("DELETE FROM validations WHERE investigation_id = ?", [investigation_id])
def validation_summaries(db, investigation_id: int | None = None) -> list[dict[str, Any]]:
    """One row per saved validation, oldest first: ``validation``, ``method``, ``investigation``
    (its name), ``created_at``, ``estimators`` (a list, in order), ``num_queries``, ``num_sequences``
    and ``settings`` of its first row (decoded)."""
    where, args = ("WHERE v.investigation_id = ?", [investigation_id]) if investigation_id is not None else ("", [])
    cur = db.execute(
        "SELECT v.validation, v.method, i.name, min(v.created_at), "
        "(SELECT group_concat(estimator, char(31)) FROM (SELECT estimator FROM validations w WHERE w.validation = v.validation ORDER BY w.id)), "
        "max(v.num_queries), max(v.num_sequences), "
        "(SELECT settings FROM validations w WHERE w.validation = v.validation ORDER BY w.id LIMIT 1) "
        f"FROM validations v JOIN investigations i ON i.id = v.investigation_id {where} GROUP BY v.validation ORDER BY v.validation", args)
    out = []
    for vid, method, inv, created, estimators, nq, ns, settings in cur.fetchall():
        out.append({"validation": vid, "method": method, "investigation": inv, "created_at": created, "estimators": (estimators or "").split("\x1f"),
                    "num_queries": nq, "num_sequences": ns, "settings": json.loads(settings) if settings else {}})
    return out


def lds_subsets(db, study: str) -> dict[int, dict[str, Any]]:
    """The committed retrained subsets of LDS study ``study``, by subset number (``measurements``
    decoded to a list of floats, one per query)."""
    rows = db.execute("SELECT subset, num_sequences, indices_sha, measurements, seconds FROM lds_subsets WHERE study = ? ORDER BY subset", [study]).fetchall()
    return {int(s): {"num_sequences": n, "indices_sha": sha, "measurements": json.loads(m), "seconds": sec} for s, n, sha, m, sec in rows}


def insert_lds_subset(
    db, study: str, subset: int, num_sequences: int, indices_sha: str, measurements: list[float], seconds: float, investigation_id: int | None = None,
) -> None:
    """Commit one retrained subset's measurements (replacing a row of the same study and subset);
    ``investigation_id``: the investigation whose validation retrained it."""
    with db.atomic():
        db["lds_subsets"].upsert(
            {"study": study, "subset": int(subset), "num_sequences": int(num_sequences), "indices_sha": indices_sha,
             "measurements": json.dumps([float(x) for x in measurements]), "seconds": float(seconds), "created_at": now(),
             "investigation_id": investigation_id},
            pk=("study", "subset"),
        )
