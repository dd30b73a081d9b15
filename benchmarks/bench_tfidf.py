"""Benchmark the TF-IDF filter: index build time and peak memory, and top-K query time.

Targets (issue 4), on 1,000,000 synthetic sequences of ~100 tokens on a 2-core machine:
build <= 3 minutes and <= 4 GB peak memory; top-10,000 candidates for a query <= 1 second.

    python benchmarks/bench_tfidf.py              # full size
    python benchmarks/bench_tfidf.py --n 50000    # a quick run

The corpus is synthetic (no project, no model): token ids drawn from a Zipf-like distribution
over a ~50k vocabulary, written in chunks to a token store laid out like a project's
(``tokens.bin`` + ``offsets.npy``) and read back through :class:`inflq.corpus.CorpusStore`, the
memory-mapped store the filter reads in a real run. Peak memory is the process's
``ru_maxrss``, which counts the memory-mapped token pages the build touched.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from inflq import FilterContext, Monitor
from inflq.corpus import CorpusStore
from inflq_builtins import tfidf


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def zipf_cdf(vocab: int, s: float = 1.0) -> np.ndarray:
    p = 1.0 / np.arange(1, vocab + 1) ** s
    return np.cumsum(p / p.sum())


def write_store(folder: Path, n: int, vocab: int, mean_len: int, seed: int, chunk: int = 50_000) -> None:
    """A token store of ``n`` sequences with lengths uniform in mean_len ± 20%."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cdf = zipf_cdf(vocab)
    perm = rng.permutation(vocab)  # frequent tokens scattered over the id range, as in real vocabularies
    lo, hi = int(mean_len * 0.8), int(mean_len * 1.2)
    offsets = [np.zeros(1, dtype=np.int64)]
    total = 0
    with open(folder / "tokens.bin", "wb") as f:
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            lengths = rng.integers(lo, hi + 1, size=m)
            ids = perm[np.minimum(np.searchsorted(cdf, rng.random(int(lengths.sum()))), vocab - 1)]
            f.write(ids.astype(np.uint32).tobytes())
            offsets.append(total + np.cumsum(lengths))
            total += int(lengths.sum())
    np.save(folder / "offsets.npy", np.concatenate(offsets))
    (folder / "store.json").write_text(json.dumps({"fingerprint": f"synthetic-{n}-{vocab}-{mean_len}-{seed}", "num_sequences": n}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="sequences (default 1,000,000)")
    ap.add_argument("--vocab", type=int, default=50_000)
    ap.add_argument("--length", type=int, default=100, help="mean tokens per sequence")
    ap.add_argument("--k", type=int, default=10_000)
    ap.add_argument("--queries", type=int, default=20, help="queries timed")
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory() if args.dir is None else None
    work = Path(tmp.name) if tmp else args.dir
    t = time.perf_counter()
    write_store(work / "corpus", args.n, args.vocab, args.length, args.seed)
    gen_s = time.perf_counter() - t
    store = CorpusStore(work / "corpus")
    rng = np.random.default_rng(args.seed + 1)
    cdf = zipf_cdf(args.vocab)
    # Queries like real ones: ~20 tokens, some common, some rare.
    queries = [np.searchsorted(cdf, rng.random(20)).astype(np.int64) for _ in range(args.queries)]
    ctx = FilterContext(
        num_sequences=len(store), query_tokens=queries, query_completion_starts=[12] * len(queries),
        sequences=store.many, metadata=lambda name: np.full(len(store), "", dtype=object),
        artifacts_dir=work / "artifacts", corpus_fingerprint=store.fingerprint, tokenizer_fingerprint="synthetic",
        seed=0, monitor=Monitor(),
    )
    before = rss_mb()
    t = time.perf_counter()
    index = tfidf.build_index(ctx)
    build_s = time.perf_counter() - t
    build_peak = peak_mb()
    t = time.perf_counter()
    tfidf.save_index(index, tfidf.index_dir(ctx))
    save_s = time.perf_counter() - t
    size_mb = sum(p.stat().st_size for p in tfidf.index_dir(ctx).iterdir()) / 2**20
    del index
    tfidf._cache.clear()
    t = time.perf_counter()
    index = tfidf.load_or_build(ctx)
    load_s = time.perf_counter() - t
    times = []
    for q in queries:
        t = time.perf_counter()
        top = index.top(q, args.k)
        times.append(time.perf_counter() - t)
        assert len(top) == min(args.k, int(np.count_nonzero(index.scores(q) > 0)))
    t = time.perf_counter()
    tfidf.TfidfFilter(k=args.k).candidates(ctx)
    filter_s = time.perf_counter() - t
    report = {
        "sequences": args.n, "tokens": int(store.offsets[-1]), "vocab": args.vocab, "nonzeros": int(index.matrix.nnz),
        "generate_s": round(gen_s, 1), "build_s": round(build_s, 1), "rss_before_build_mb": round(before),
        "peak_rss_mb": round(build_peak), "save_s": round(save_s, 1), "index_on_disk_mb": round(size_mb),
        "load_s": round(load_s, 1), "query_top_k": args.k, "query_median_s": round(float(np.median(times)), 4),
        "query_max_s": round(float(np.max(times)), 4),
        f"filter_{len(queries)}_queries_s": round(filter_s, 2),
    }
    print(json.dumps(report, indent=2))
    ok = build_s <= 180 and build_peak <= 4096 and max(times) <= 1.0
    print("targets (build <= 180 s, peak <= 4096 MB, query <= 1 s):", "met" if ok else "NOT met")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
