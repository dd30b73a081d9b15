"""Saved validations, read back: what ``inflq validate list`` and ``inflq validate show`` print,
and the API the TUI's view of them calls. Reads the catalog only (no torch, no model).

``inflq validate`` (:mod:`inflq.validate`, :mod:`inflq.lds`) saves one catalog row per estimator of
each validation; a validation is the group of rows with one number. Its ``method`` is ``pbrf``
(against the proximal Bregman response), ``lds`` (against retraining on random subsets) or ``loo``
(leave-one-out retraining, saved with method ``lds`` and ``settings["method"] == "loo"``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from . import catalog
from .display import plural
from .errors import InflqError

# Below MIN_SAMPLE sampled sequences a correlation has no confidence interval (Fisher's z needs
# n > 3; over 2 points it is always ±1): refused. Below STEADY_SAMPLE a warning says how wide it is.
MIN_SAMPLE = 4
STEADY_SAMPLE = 8


def fisher_ci(r: float, n: int) -> tuple[float, float]:
    """The 95 % interval of a correlation ``r`` over ``n`` pairs (Fisher's z; NaN for n <= 3)."""
    if r is None or not math.isfinite(r) or n <= 3:
        return float("nan"), float("nan")
    z, half = math.atanh(max(-0.999999, min(0.999999, r))), 1.96 / math.sqrt(n - 3)
    return math.tanh(z - half), math.tanh(z + half)


def mean_correlation_ci(r: float, queries: int, sequences: int) -> tuple[float, float]:
    """The 95 % interval of a mean over ``queries`` per-query correlations, each over ``sequences``
    points: Fisher's z of the mean with the degrees of freedom of all of them, ``queries × (sequences − 3)``
    (NaN below 4 sequences)."""
    if sequences <= 3:
        return float("nan"), float("nan")
    return fisher_ci(r, queries * (sequences - 3) + 3)


def sample_warning(sample: int, queries: int) -> str | None:
    """What a small sample means for the correlations, or None from :data:`STEADY_SAMPLE` up."""
    if sample >= STEADY_SAMPLE:
        return None
    lo, hi = mean_correlation_ci(0.5, queries, sample)
    return (f"--sample {sample}: each query's correlation rests on {plural(sample, 'sequence')}, so a correlation of 0.5 "
            f"has a 95 % interval of [{lo:.2f}, {hi:.2f}] over {plural(queries, 'query')}; use --sample {STEADY_SAMPLE} or more to tell estimators apart")


@dataclass
class ValidationSummary:
    """One saved validation, as ``inflq validate list`` shows it."""

    id: int
    method: str  # "pbrf", "lds" or "loo"
    investigation: str
    created_at: str
    estimators: list[str]
    num_queries: int
    num_sequences: int  # pbrf: sampled sequences; lds: subsets; loo: sequences left out

    def describe(self) -> str:
        unit = {"pbrf": "sequence", "lds": "subset", "loo": "sequence left out"}[self.method]
        many = {"loo": "sequences left out"}.get(self.method)
        return f"{plural(self.num_queries, 'query')} × {plural(self.num_sequences, unit, many)}"


@dataclass
class SavedValidation:
    """One saved validation with its rows (catalog dicts, ``settings`` decoded), as ``inflq validate
    show`` prints it: :meth:`title`, :meth:`columns` and :meth:`table` give the table."""

    id: int
    method: str
    investigation: str
    created_at: str
    rows: list[dict[str, Any]]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def queries(self) -> list[int]:
        return list(self.settings.get("queries") or [])

    @property
    def recommended_damping(self) -> float | None:
        return self.settings.get("recommended_damping")

    def title(self) -> str:
        if self.method != "pbrf":
            from .lds import lds_title

            return lds_title(self.id, self.settings) + f" ({self.investigation}, {self.created_at.replace('T', ' ')})"
        s = self.settings
        n = len(s.get("sample") or []) or (self.rows[0]["num_sequences"] if self.rows else 0)
        eps = s.get("epsilon")
        what = f"ε={eps:.3g}, {s.get('pbrf_steps')} steps, {plural(s.get('fit_sequences') or 0, 'fitting sequence')}" if eps is not None else ""
        return (f"validation {self.id}: {plural(len(self.queries), 'query')} × {plural(n, 'sequence')} vs PBRF"
                f" ({what}; {self.investigation}, {self.created_at.replace('T', ' ')})")

    def columns(self) -> tuple[str, ...]:
        if self.method != "pbrf":
            from .lds import LDS_COLUMNS

            return LDS_COLUMNS
        return PBRF_COLUMNS

    def table(self) -> list[tuple[str, ...]]:
        if self.method != "pbrf":
            from .lds import lds_table_rows

            return lds_table_rows(self.rows)
        return pbrf_table_rows(self.rows)

    def per_query(self) -> list[tuple[str, list[float]]]:
        """Per estimator, each query's Spearman correlation (PBRF) or LDS, in :attr:`queries` order."""
        out = []
        for r in self.rows:
            pq = r["settings"].get("per_query") or []
            out.append((r["estimator"], [float(v[1]) if isinstance(v, (list, tuple)) else float(v) for v in pq]))
        return out


PBRF_COLUMNS = ("estimator", "pearson [95% CI]", "spearman [95% CI]", "fit s", "IHVP s")


def pbrf_table_rows(rows: list[Any]) -> list[tuple[str, ...]]:
    """The cells of a PBRF validation's table (:data:`PBRF_COLUMNS`) for :class:`inflq.validate.ValidationRow`s
    or saved rows: each correlation is the mean over queries of a query's correlation over the sampled
    sequences, with its 95 % interval (:func:`mean_correlation_ci`); IHVP: the inverse-Hessian-vector
    products of the query gradients."""

    def num(x, form: str) -> str:
        return "—" if x is None or not math.isfinite(x) else format(x, form)

    def with_ci(r, q, n) -> str:
        lo, hi = mean_correlation_ci(r, q, n)
        return num(r, ".3f") + ("" if not math.isfinite(lo) else f" [{lo:.2f}, {hi:.2f}]")

    out = []
    for r in rows:
        get = r.get if isinstance(r, dict) else lambda k, r=r: getattr(r, k)
        q, n = int(get("num_queries") or 0), int(get("num_sequences") or 0)
        pearson, spearman = get("pearson"), get("spearman")
        out.append((get("estimator"), with_ci(pearson, q, n), with_ci(spearman, q, n), num(get("fit_seconds"), ".2f"), num(get("ihvp_seconds"), ".3f")))
    return out


def _method(summary: dict[str, Any]) -> str:
    return "loo" if summary["settings"].get("method") == "loo" else summary["method"]


def list_validations(project, investigation: str | None = None) -> list[ValidationSummary]:
    """The project's saved validations (``investigation``: only its), oldest first."""
    inv = catalog.investigation(project.db, investigation)["id"] if investigation is not None else None
    return [ValidationSummary(s["validation"], _method(s), s["investigation"], s["created_at"], s["estimators"], s["num_queries"] or 0, s["num_sequences"] or 0)
            for s in catalog.validation_summaries(project.db, inv)]


def get_validation(project, validation_id: int | None = None) -> SavedValidation:
    """Saved validation ``validation_id`` (default: the latest), with its rows."""
    rows = catalog.validation_rows(project.db, validation_id)
    if not rows:
        have = [s.id for s in list_validations(project)]
        if validation_id is None:
            raise InflqError("no validation has been saved in this project yet; run `inflq validate PROJECT -i INVESTIGATION`")
        raise InflqError(f"no validation {validation_id}; the project has {', '.join(map(str, have)) or 'none'} (see `inflq validate list`)")
    first = rows[0]
    inv = catalog.investigation(project.db, first["investigation_id"])["name"]
    method = "loo" if first["settings"].get("method") == "loo" else first["method"]
    return SavedValidation(first["validation"], method, inv, first["created_at"], rows, first["settings"])
