"""The TF-IDF filter against a brute-force TF-IDF, its index's fingerprints, bad input, the union
with a random sample, the search-depth estimate on scores with a known answer, and a real run."""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest

from inflq import FilterContext, InflqError, Monitor, catalog
from inflq.options import parse_spec
from inflq.plugins import get_registry
from inflq.queries import add_query
from inflq.search_depth import search_depth, search_depth_for_result_set, split_union
from inflq_builtins import tfidf


def random_corpus(n=200, vocab=40, seed=0):
    rng = np.random.default_rng(seed)
    probs = 1.0 / np.arange(1, vocab + 1)  # Zipf-like: a few common tokens, many rare ones
    probs /= probs.sum()
    return [rng.choice(vocab, size=int(rng.integers(3, 30)), p=probs).astype(np.int64) for _ in range(n)]


def make_ctx(tmp_path, seqs, queries, starts=None, corpus_fp="corpus-1", tok_fp="tok-1", seed=0, monitor=None):
    registry = get_registry()

    def make_filter(spec):
        s = parse_spec(spec)
        return registry.create("filter", s.name, s.options)

    return FilterContext(
        num_sequences=len(seqs),
        query_tokens=[np.asarray(q, dtype=np.int64) for q in queries],
        query_completion_starts=starts or [len(q) // 2 for q in queries],
        sequences=lambda idx: [seqs[int(i)] for i in idx],
        metadata=lambda name: np.full(len(seqs), "", dtype=object),
        artifacts_dir=tmp_path / "artifacts",
        corpus_fingerprint=corpus_fp,
        tokenizer_fingerprint=tok_fp,
        seed=seed,
        monitor=monitor or Monitor(),
        make_filter=make_filter,
    )


def brute_force_scores(seqs, query):
    """TF-IDF the slow way: raw counts, idf = ln((1+n)/(1+df)) + 1, L2-normalised rows; query
    tokens found in every sequence (or none) left out; score = cosine similarity."""
    n = len(seqs)
    df: dict[int, int] = {}
    for s in seqs:
        for t in set(s.tolist()):
            df[t] = df.get(t, 0) + 1
    idf = {t: math.log((1 + n) / (1 + d)) + 1 for t, d in df.items()}
    q: dict[int, float] = {}
    for t in query.tolist():
        if 0 < df.get(t, 0) < n:
            q[t] = q.get(t, 0.0) + idf[t]
    qn = math.sqrt(sum(v * v for v in q.values()))
    out = np.zeros(n)
    for i, s in enumerate(seqs):
        counts: dict[int, int] = {}
        for t in s.tolist():
            counts[t] = counts.get(t, 0) + 1
        vec = {t: c * idf[t] for t, c in counts.items()}
        norm = math.sqrt(sum(v * v for v in vec.values()))
        out[i] = sum(vec.get(t, 0.0) * w for t, w in q.items()) / (norm * qn) if qn else 0.0
    return out


def brute_force_top(scores, k):
    order = sorted(np.flatnonzero(scores > 0), key=lambda i: (-scores[i], i))
    return np.sort(np.asarray(order[:k], dtype=np.int64))


@pytest.fixture(autouse=True)
def fresh_cache():
    tfidf._cache.clear()
    yield
    tfidf._cache.clear()


def test_ranking_matches_brute_force_tfidf(tmp_path):
    seqs = random_corpus()
    rng = np.random.default_rng(1)
    queries = [rng.integers(0, 40, size=int(rng.integers(3, 9))) for _ in range(6)]
    ctx = make_ctx(tmp_path, seqs, queries)
    index = tfidf.load_or_build(ctx, chunk=37)  # several chunks, one ragged
    for fields in ("both", "prompt", "completion"):
        filt = tfidf.TfidfFilter(k=15, fields=fields)
        got = filt.candidates(ctx)
        for i in range(len(queries)):
            expected = brute_force_scores(seqs, filt.query_tokens(ctx, i))
            np.testing.assert_allclose(index.scores(filt.query_tokens(ctx, i)), expected, rtol=1e-5, atol=1e-6)
            ranked = np.sort(expected[expected > 0])[::-1]
            if len(ranked) > 15 and ranked[14] - ranked[15] < 1e-5:
                continue  # a near-tie at the boundary: either choice is right
            np.testing.assert_array_equal(got[i], brute_force_top(expected, 15))


def test_index_is_stored_without_pickle_and_reused(tmp_path):
    seqs = random_corpus(n=60)
    phases = []
    mon = Monitor(on_progress=lambda ev: phases.append(ev.phase))
    ctx = make_ctx(tmp_path, seqs, [[1, 2, 3]], monitor=mon)
    tfidf.TfidfFilter(k=5).candidates(ctx)
    folder = tmp_path / "artifacts" / "tfidf"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["corpus_fingerprint"] == "corpus-1" and manifest["tokenizer_fingerprint"] == "tok-1"
    with np.load(folder / "matrix.npz", allow_pickle=False) as z:
        assert int(z["shape"][0]) == 60
    assert "tfidf index" in phases
    phases.clear()
    tfidf._cache.clear()  # load from disk, not from memory
    tfidf.TfidfFilter(k=5).candidates(ctx)
    assert "tfidf index" not in phases and not mon.warnings


@pytest.mark.parametrize("changed", ["corpus", "tokenizer"])
def test_fingerprint_change_triggers_rebuild(tmp_path, changed):
    old, new = random_corpus(n=80, seed=0), random_corpus(n=80, seed=5)
    query = [[3, 7, 11, 19]]
    tfidf.TfidfFilter(k=10).candidates(make_ctx(tmp_path, old, query))
    mon = Monitor()
    kwargs = {"corpus_fp": "corpus-2"} if changed == "corpus" else {"tok_fp": "tok-2"}
    ctx = make_ctx(tmp_path, new, query, monitor=mon, **kwargs)
    got = tfidf.TfidfFilter(k=10).candidates(ctx)[0]
    assert any(f"another {changed}" in w for w in mon.warnings)
    np.testing.assert_array_equal(got, brute_force_top(brute_force_scores(new, np.asarray(query[0])), 10))
    manifest = json.loads((tmp_path / "artifacts" / "tfidf" / "manifest.json").read_text())
    assert manifest[f"{changed}_fingerprint"].endswith("-2")


def test_damaged_index_is_rebuilt(tmp_path):
    seqs = random_corpus(n=40)
    ctx = make_ctx(tmp_path, seqs, [[1, 2]])
    first = tfidf.TfidfFilter(k=5).candidates(ctx)
    (tmp_path / "artifacts" / "tfidf" / "matrix.npz").write_bytes(b"not a matrix")
    tfidf._cache.clear()
    mon = Monitor()
    ctx.monitor = mon
    again = tfidf.TfidfFilter(k=5).candidates(ctx)
    assert any("damaged" in w for w in mon.warnings)
    np.testing.assert_array_equal(first[0], again[0])


def test_query_without_overlap_errors_or_falls_back(tmp_path):
    seqs = [np.array([0, 1, 2, 3]), np.array([0, 4, 5]), np.array([0, 6, 1]), np.array([0, 7, 7])] * 5
    # 99 is not in the corpus; 0 is in every sequence, so it tells no sequence apart.
    ctx = make_ctx(tmp_path, seqs, [[0, 99, 99]], starts=[1])
    with pytest.raises(InflqError, match="share no token"):
        tfidf.TfidfFilter(k=3).candidates(ctx)
    mon = Monitor()
    ctx.monitor = mon
    got = tfidf.TfidfFilter(k=3, fallback="random").candidates(ctx)[0]
    assert len(got) == 3 and np.all(np.diff(got) > 0) and got.max() < len(seqs)
    assert any("random sample" in w for w in mon.warnings)
    # Only the completion side counts: the prompt's shared token 4 must not rescue it.
    ctx2 = make_ctx(tmp_path, seqs, [[4, 99]], starts=[1])
    with pytest.raises(InflqError, match="completion tokens share no token"):
        tfidf.TfidfFilter(k=3, fields="completion").candidates(ctx2)
    assert len(tfidf.TfidfFilter(k=3, fields="prompt").candidates(ctx2)[0]) == 3


def test_k_larger_than_corpus_is_clamped_with_a_warning(tmp_path):
    seqs = random_corpus(n=30)
    mon = Monitor()
    ctx = make_ctx(tmp_path, seqs, [[1, 2, 5]], monitor=mon)
    got = tfidf.TfidfFilter(k=10_000).candidates(ctx)[0]
    expected = np.flatnonzero(brute_force_scores(seqs, np.array([1, 2, 5])) > 0)
    np.testing.assert_array_equal(got, expected)
    assert any("more than the corpus" in w for w in mon.warnings)
    with pytest.raises(InflqError, match="k must be positive"):
        tfidf.TfidfFilter(k=0).candidates(ctx)


def test_union_with_random_sample(tmp_path):
    seqs = random_corpus(n=120)
    ctx = make_ctx(tmp_path, seqs, [[1, 2, 3], [20, 30, 31]], seed=7)
    spec = "tfidf:k=10+random:n=25"
    union = get_registry().create("filter", "union", {"of": spec}).candidates(ctx)
    tf = tfidf.TfidfFilter(k=10).candidates(ctx)
    rnd = get_registry().create("filter", "random", {"n": 25}).candidates(ctx)
    for u, a, b in zip(union, tf, rnd, strict=True):
        np.testing.assert_array_equal(u, np.union1d(a, b))
    assert not np.array_equal(tf[0], tf[1])  # per query, not shared
    assert split_union(spec) == ("tfidf:k=10", "random:n=25")
    with pytest.raises(InflqError, match="tfidf:k=10000\\+random"):
        split_union("tfidf:k=10")


def expected_top_m_mean_exponential(s, m):
    """E[mean of the top m of s iid Exp(1) draws]: the k-th largest has mean H_s - H_(k-1)."""
    h = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, s + 1))])
    return float(np.mean([h[s] - h[k - 1] for k in range(1, m + 1)]))


@pytest.mark.parametrize("sample,depth,extrapolated", [(65536, 4096, False), (4096, 16384, True)])
def test_search_depth_recovers_a_known_depth(sample, depth, extrapolated):
    m = 10
    rng = np.random.default_rng(3)
    unfiltered = rng.exponential(size=sample)
    target = expected_top_m_mean_exponential(depth, m)
    # Candidates whose top-m mean is what an unfiltered search of `depth` sequences finds, on average.
    candidates = np.concatenate([np.full(m, target), rng.exponential(size=500) * 0.1, [np.nan]])
    r = search_depth(candidates, unfiltered, m=m, repeats=30, seed=0)
    assert r.target == pytest.approx(target)
    assert r.sizes[0] == m and r.sizes[-1] == sample and np.all(r.sizes[1:-1] == 2 * r.sizes[:-2])
    assert r.extrapolated is extrapolated
    # Extrapolating two doublings is noisier than interpolating (see search_depth's docstring).
    tolerance = 2.0 if extrapolated else 1.4
    assert depth / tolerance < r.estimate < depth * tolerance
    assert ("EXTRAPOLATED" in r.summary()) is extrapolated
    d = r.to_dict()
    assert len(d["sizes"]) == len(d["statistic"]) and json.dumps(d)


def test_search_depth_edge_cases():
    rng = np.random.default_rng(0)
    unfiltered = rng.exponential(size=2000)
    low = search_depth(np.full(10, -1.0), unfiltered, m=10)
    assert low.reached_at_smallest and low.estimate == 10
    flat = search_depth(np.full(10, 5.0), np.ones(500), m=10)
    assert flat.estimate is None and "cannot be extrapolated" in flat.summary()
    with pytest.raises(InflqError, match="top-m"):
        search_depth(np.ones(3), unfiltered, m=10)
    with pytest.raises(InflqError, match="random:n"):
        search_depth(np.ones(30), np.ones(15), m=10)


# -- a real run on a tiny project ---------------------------------------------------------------------
def test_run_with_tfidf_and_search_depth(project, cli_run):
    from inflq import reading
    from inflq.project import ARTIFACTS
    from inflq.runs import RunSettings, run_investigation

    add_query(project, "default", "the first president of astrobia was", "zorald pfaff")
    add_query(project, "default", "the capital city of astrobia is called", "velmora")
    r = run_investigation(project, "default", RunSettings(estimator="identity", filter="tfidf:k=5", rank=4))
    matrix = reading.score_matrix(project, "default", r.result_set_id)
    store = project.runtime.corpus
    queries = catalog.queries(project.db, "default")
    toks = [project.runtime.tokenize_query(q["prompt"], q["completion"]) for q in queries]
    ctx = FilterContext(
        num_sequences=len(store), query_tokens=[t.tokens for t in toks],
        query_completion_starts=[t.completion_start for t in toks], sequences=store.many,
        metadata=functools.partial(catalog.metadata_column, project.db), artifacts_dir=project.root / ARTIFACTS,
        corpus_fingerprint=store.fingerprint, tokenizer_fingerprint=project.current_tokenizer_fingerprint(),
        seed=0, monitor=Monitor(),
    )
    expected = tfidf.TfidfFilter(k=5).candidates(ctx)
    for qi in range(len(queries)):
        scored = np.flatnonzero(~np.isnan(matrix[qi]))
        np.testing.assert_array_equal(scored, expected[qi])
        assert np.all(np.isnan(np.delete(matrix[qi], scored)))
    assert reading.result_set(project, "default", r.result_set_id)["filter"] == "tfidf:k=5"
    with pytest.raises(InflqError, match="unfiltered sample"):
        search_depth_for_result_set(project, "default", r.result_set_id, m=2)

    r2 = run_investigation(project, "default", RunSettings(estimator="identity", filter="tfidf:k=5+random:n=16", rank=4))
    reports = search_depth_for_result_set(project, "default", r2.result_set_id, m=2, repeats=5)
    matrix2 = reading.score_matrix(project, "default", r2.result_set_id)
    for qi, rep in enumerate(reports):
        assert rep.query_id == queries[qi]["id"] and rep.num_candidates == 5 and rep.sample_size == 16
        row = matrix2[qi]
        assert rep.target == pytest.approx(float(np.mean(np.sort(row[expected[qi]])[-2:])), rel=1e-6)
    code, out, err = cli_run("search-depth", project.root, "--top-m", "2", "--repeats", "5", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert [d["query_id"] for d in data] == [q["id"] for q in queries]
    assert data[0]["statistic"] == pytest.approx(reports[0].statistic.tolist())
    code, out, err = cli_run("search-depth", project.root, "--top-m", "2", "--query", queries[0]["id"])
    assert code == 0 and "sequences searched" in out and f"query {queries[0]['id']}" in out
