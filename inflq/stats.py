"""Statistics of influence scores: the power-law tail of a query's distribution, and the agreement
of two result sets on the same query (rank correlation, top-K overlap)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import stats as _st

from .errors import InflqError


def ccdf(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(x, P(X >= x))`` of the positive values, x ascending (for a log-log plot)."""
    x = np.sort(np.asarray(values, dtype=np.float64))
    x = x[np.isfinite(x) & (x > 0)]
    return x, 1.0 - np.arange(len(x)) / max(len(x), 1)


@dataclass
class PowerLawFit:
    """A power-law tail ``p(x) ∝ x^-alpha`` for ``x >= xmin``; its CCDF has slope ``1 - alpha``
    on log-log axes. Estimated by maximum likelihood (the Hill estimator, Clauset et al. 2009)."""

    alpha: float
    xmin: float
    n_tail: int
    stderr: float
    method: str = "Hill (continuous MLE) over the top tail"

    @property
    def ccdf_slope(self) -> float:
        return 1.0 - self.alpha


def powerlaw_tail(scores: np.ndarray, tail_fraction: float = 0.2, min_tail: int = 5) -> PowerLawFit | None:
    """Fit the upper tail of the positive ``scores`` (negate them for the negative tail).

    The tail is the largest ``tail_fraction`` of the positive values (at least ``min_tail``); the
    exponent is the continuous MLE ``alpha = 1 + n / Σ ln(x / xmin)`` with standard error
    ``(alpha - 1) / sqrt(n)``. Returns None when there are too few positive values to fit.
    """
    x = np.asarray(scores, dtype=np.float64)
    x = np.sort(x[np.isfinite(x) & (x > 0)])[::-1]
    n = max(min_tail, int(np.ceil(tail_fraction * len(x))))
    if len(x) < min_tail or n > len(x):
        return None
    tail = x[:n]
    xmin = float(tail[-1])
    logs = np.log(tail / xmin).sum()
    if logs <= 0:
        return None
    alpha = 1.0 + n / logs
    return PowerLawFit(float(alpha), xmin, int(n), float((alpha - 1.0) / np.sqrt(n)))


@dataclass
class Comparison:
    """Two rankings of the same query. ``only_a``: sequences in A's top K but not in B's, as
    ``(corpus index, score in A, rank in B or None)``; ``only_b`` the other way round."""

    spearman: float
    n_common: int
    k: int
    overlap: int
    only_a: list[tuple[int, float, int | None]] = field(default_factory=list)
    only_b: list[tuple[int, float, int | None]] = field(default_factory=list)


def _ranks(idx: np.ndarray, sc: np.ndarray) -> tuple[np.ndarray, dict[int, int]]:
    ok = np.isfinite(sc)
    idx, sc = idx[ok], sc[ok]
    order = idx[np.argsort(-sc, kind="stable")]
    return order, {int(i): r + 1 for r, i in enumerate(order)}


def compare_scores(idx_a: np.ndarray, sc_a: np.ndarray, idx_b: np.ndarray, sc_b: np.ndarray, k: int = 20) -> Comparison:
    """Compare two score vectors over corpus indices (NaN = not scored)."""
    if k <= 0:
        raise InflqError("K must be positive")
    a = {int(i): float(s) for i, s in zip(idx_a, sc_a) if np.isfinite(s)}
    b = {int(i): float(s) for i, s in zip(idx_b, sc_b) if np.isfinite(s)}
    common = sorted(set(a) & set(b))
    rho = float("nan")
    if len(common) >= 3:
        rho = float(_st.spearmanr([a[i] for i in common], [b[i] for i in common]).statistic)
    order_a, rank_a = _ranks(np.asarray(idx_a), np.asarray(sc_a, dtype=np.float64))
    order_b, rank_b = _ranks(np.asarray(idx_b), np.asarray(sc_b, dtype=np.float64))
    top_a, top_b = [int(i) for i in order_a[:k]], [int(i) for i in order_b[:k]]
    sa, sb = set(top_a), set(top_b)
    return Comparison(
        spearman=rho, n_common=len(common), k=k, overlap=len(sa & sb),
        only_a=[(i, a[i], rank_b.get(i)) for i in top_a if i not in sb],
        only_b=[(i, b[i], rank_a.get(i)) for i in top_b if i not in sa],
    )


def compare_result_sets(project, investigation: str, rs_a: int, rs_b: int, query_id: int, k: int = 20) -> Comparison:
    """Compare two result sets of an investigation on one query."""
    from .reading import query_scores, result_set

    a, b = result_set(project, investigation, rs_a), result_set(project, investigation, rs_b)
    return compare_scores(*query_scores(project, a, query_id), *query_scores(project, b, query_id), k=k)
