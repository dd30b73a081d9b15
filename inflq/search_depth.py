"""Search depth: how many unfiltered training sequences must be searched for their top influences
to match the top influences among the TF-IDF candidates (Grosse et al. 2023, "Candidate selection").

TF-IDF favours lexical overlap, so the paper used it as a yardstick: score the TF-IDF candidates and
a random unfiltered sample, then ask how large an unfiltered search must be before its strongest
influences (here the mean of the top ``m`` scores) are as large as the candidates'. The curve
(sample size -> top-``m`` statistic) is returned as data a UI can plot; the estimate is
interpolated on it, or extrapolated log-linearly past the largest sample (and marked so).

Scores are influences: positive when adding the sequence makes the completion more likely.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np

from . import catalog
from .errors import InflqError
from .plugins import get_registry


@dataclass
class SearchDepth:
    """One query's search-depth curve and estimate."""

    m: int
    target: float  # mean of the top-m influences among the TF-IDF candidates
    num_candidates: int
    sample_size: int  # scored sequences in the random unfiltered sample
    sizes: np.ndarray  # unfiltered search sizes on the curve
    statistic: np.ndarray  # mean over repeats of the top-m mean influence at each size
    spread: np.ndarray  # standard deviation over repeats at each size
    estimate: float | None  # unfiltered sequences needed to match ``target``; None if it cannot be told
    extrapolated: bool  # the estimate lies beyond the largest sample
    reached_at_smallest: bool = False  # already matched by the smallest size: the estimate is an upper bound
    query_id: int | None = None
    corpus_size: int | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Plain JSON-ready data (for the TUI and ``--json``)."""
        d = asdict(self)
        for key in ("sizes", "statistic", "spread"):
            d[key] = [float(v) if key != "sizes" else int(v) for v in getattr(self, key)]
        return d

    def summary(self) -> str:
        """One line saying what the curve shows."""
        head = f"query {self.query_id}: " if self.query_id is not None else ""
        base = (
            f"{head}mean of the top {self.m} influences among {self.num_candidates:,} TF-IDF candidates is "
            f"{self.target:.6g}; "
        )
        if self.estimate is None:
            return base + self.note
        where = f"{self.estimate:,.0f} sequences"
        if self.corpus_size:
            where += f" ({self.estimate / self.corpus_size:.2%} of the corpus's {self.corpus_size:,})"
        if self.reached_at_smallest:
            return base + f"a random unfiltered search matches it already at {where} (the smallest sample tried)"
        if self.extrapolated:
            return base + (
                f"a random unfiltered search would match it at about {where}, EXTRAPOLATED log-linearly "
                f"beyond the largest sample ({self.sample_size:,}); score a larger random sample to confirm"
            )
        return base + f"a random unfiltered search matches it at about {where} (interpolated)"


def top_m_mean(scores: np.ndarray, m: int) -> float:
    """Mean of the ``m`` largest finite scores."""
    s = np.asarray(scores, dtype=np.float64)
    s = s[np.isfinite(s)]
    if len(s) < m:
        raise InflqError(f"search depth: only {len(s)} score{'' if len(s) == 1 else 's'}, fewer than top-m = {m}; lower --top-m")
    return float(np.mean(np.partition(s, len(s) - m)[len(s) - m :]))


def search_depth(
    candidate_scores: np.ndarray,
    unfiltered_scores: np.ndarray,
    m: int = 10,
    sizes: list[int] | None = None,
    repeats: int = 20,
    seed: int = 0,
) -> SearchDepth:
    """The search-depth curve and estimate for one query.

    ``candidate_scores``: influences of the TF-IDF candidates; ``unfiltered_scores``: influences of
    a uniform random sample of the corpus (NaNs are dropped). At each size on the curve (doubling
    from ``m`` up to the whole sample unless ``sizes`` is given), ``repeats`` random subsamples of
    the unfiltered scores are drawn and the mean of their top-``m`` means is recorded. The estimate
    is where the curve reaches the candidates' top-``m`` mean: interpolated linearly in log(size)
    between the two sizes around it, or, if the largest size falls short, extrapolated along a
    least-squares line in log(size) through the sizes from ``2m`` to half the sample. Each doubling
    extrapolated adds noise: on exponential scores, 2 doublings past a 4,096 sample land within a
    factor of 2; confirm a far extrapolation with a larger random sample.
    """
    if m < 1:
        raise InflqError("search depth: top-m must be at least 1")
    cand = np.asarray(candidate_scores, dtype=np.float64)
    cand = cand[np.isfinite(cand)]
    unf = np.asarray(unfiltered_scores, dtype=np.float64)
    unf = unf[np.isfinite(unf)]
    if len(cand) < m:
        raise InflqError(f"search depth: only {len(cand)} TF-IDF candidates were scored, fewer than top-m = {m}; lower --top-m or raise tfidf:k")
    if len(unf) < 2 * m:
        raise InflqError(f"search depth: only {len(unf)} unfiltered sequences were scored; the random sample needs at least {2 * m} (raise random:n)")
    target = top_m_mean(cand, m)
    n = len(unf)
    if sizes is None:
        sizes = []
        s = m
        while s < n:
            sizes.append(s)
            s *= 2
        sizes.append(n)
    sizes = sorted({int(s) for s in sizes if m <= int(s) <= n})
    if len(sizes) < 2:
        raise InflqError(f"search depth: need at least two sample sizes between top-m ({m}) and the sample ({n})")
    rng = np.random.default_rng(seed)
    stat, spread = [], []
    for s in sizes:
        draws = 1 if s == n else max(1, repeats)
        vals = [top_m_mean(unf if s == n else unf[rng.choice(n, size=s, replace=False)], m) for _ in range(draws)]
        stat.append(float(np.mean(vals)))
        spread.append(float(np.std(vals)))
    x = np.log(np.asarray(sizes, dtype=np.float64))
    y = np.asarray(stat)
    common = dict(m=m, target=target, num_candidates=len(cand), sample_size=n, sizes=np.asarray(sizes, dtype=np.int64),
                  statistic=y, spread=np.asarray(spread))
    hit = np.flatnonzero(y >= target)
    if len(hit):
        i = int(hit[0])
        if i == 0:
            return SearchDepth(**common, estimate=float(sizes[0]), extrapolated=False, reached_at_smallest=True)
        frac = (target - y[i - 1]) / (y[i] - y[i - 1])
        return SearchDepth(**common, estimate=float(np.exp(x[i - 1] + frac * (x[i] - x[i - 1]))), extrapolated=False)
    # Subsamples of more than half the sample share most of its top scores, so the curve flattens
    # there for no reason but the sample's finiteness; fit the part below (and above m, where a
    # top-m mean is still a mean of everything).
    sizes_a = np.asarray(sizes)
    fit = (sizes_a >= 2 * m) & (sizes_a <= n // 2)
    if fit.sum() < 2:
        fit = np.zeros(len(sizes), dtype=bool)
        fit[-2:] = True
    slope, intercept = np.polyfit(x[fit], y[fit], 1)
    # A flat curve fits a slope of rounding noise (1e-17, either sign): growth counts only when it
    # moves the statistic by more than rounding over the fitted range, and an extrapolation past
    # what a float can hold is no estimate either.
    rise = slope * float(x[fit].max() - x[fit].min())
    noise = 1e-9 * max(float(np.abs(y[fit]).max()), float(abs(target)), 1e-300)
    log_estimate = (target - intercept) / slope if rise > noise else np.inf
    if not np.isfinite(log_estimate) or log_estimate > np.log(np.finfo(np.float64).max):
        return SearchDepth(**common, estimate=None, extrapolated=True,
                           note="the unfiltered curve does not grow with the sample size, so the depth cannot be extrapolated; score a larger random sample")
    return SearchDepth(**common, estimate=float(np.exp(log_estimate)), extrapolated=True)


def unfiltered_filters(registry=None) -> set[str]:
    """The names of the loaded filters that choose without looking at the queries (``Filter.unfiltered``)."""
    if registry is None:
        from .plugins import get_registry

        registry = get_registry()
    return {name for name, cls in registry.all("filter").items() if getattr(cls, "unfiltered", False)}


def split_union(spec: str, unfiltered_names: set[str] | None = None) -> tuple[str, str]:
    """Split a union filter spec into its filtered part (e.g. tfidf) and its unfiltered part (the
    filters in ``unfiltered_names``, default :func:`unfiltered_filters`: random, all)."""
    from .options import parse_specs

    baseline = unfiltered_filters() if unfiltered_names is None else unfiltered_names
    parts = [p.strip() for p in spec.split("+")]
    names = [s.name for s in parse_specs(spec)]
    filtered = [p for p, n in zip(parts, names, strict=True) if n not in baseline]
    unfiltered = [p for p, n in zip(parts, names, strict=True) if n in baseline]
    if not filtered or not unfiltered:
        raise InflqError(
            f"search depth needs a result set scored with a filter and an unfiltered sample, not {spec!r}: "
            "run with --filter tfidf:k=10000+random:n=100000"
        )
    return "+".join(filtered), "+".join(unfiltered)


def search_depth_for_result_set(
    project,
    investigation: str,
    result_set_id: int | None = None,
    query_ids: list[int] | None = None,
    m: int = 10,
    repeats: int = 20,
    sizes: list[int] | None = None,
    monitor=None,
) -> list[SearchDepth]:
    """Search depth for queries of a result set scored with ``tfidf:k=K+random:n=N``.

    Which candidates came from which filter is recomputed by running the two filters again with the
    run's seed (both are deterministic for a given corpus, tokenizer and seed)."""
    from .progress import Monitor
    from .reading import result_set, scores
    from .runs import filter_context, make_filter

    monitor = monitor or Monitor()
    rs = result_set(project, investigation, result_set_id)
    filtered_spec, unfiltered_spec = split_union(rs["filter"], unfiltered_filters(get_registry()))
    settings = json.loads(rs["settings"])
    run_ids = list(settings.get("query_ids") or [])
    wanted = list(query_ids) if query_ids else run_ids
    for q in wanted:
        if q not in run_ids:
            raise InflqError(f"query {q} was not part of result set {rs['id']} (its queries: {run_ids})")
    queries = [catalog.query(project.db, q) for q in wanted]
    store = project.runtime.corpus
    modules = settings.get("modules")
    modules = ",".join(modules) if isinstance(modules, list) else modules
    ctx = filter_context(project, queries, int(settings.get("seed", 0)), monitor, make_filter, modules)
    filtered = make_filter(filtered_spec).candidates(ctx)
    unfiltered = make_filter(unfiltered_spec).candidates(ctx)
    indices, matrix = scores(project, rs)
    out = []
    for qi, q in enumerate(queries):
        row = matrix[run_ids.index(q["id"])]

        def take(idx: np.ndarray, row=row) -> np.ndarray:
            cols = np.searchsorted(indices, idx)
            if len(idx) and (cols.max() >= len(indices) or not np.array_equal(indices[np.minimum(cols, len(indices) - 1)], idx)):
                raise InflqError(
                    f"result set {rs['id']}'s candidates differ from those its filter chooses now "
                    "(the corpus or tokenizer changed); run it again"
                )
            return row[cols]

        report = search_depth(take(filtered[qi]), take(unfiltered[qi]), m=m, sizes=sizes, repeats=repeats,
                              seed=int(settings.get("seed", 0)))
        report.query_id = q["id"]
        report.corpus_size = len(store)
        report.extra = {"result_set_id": rs["id"], "filtered": filtered_spec, "unfiltered": unfiltered_spec}
        out.append(report)
    return out
