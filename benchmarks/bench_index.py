"""Benchmark the gradient index (issue 16): build cost, storage, query time and accuracy.

    python benchmarks/bench_index.py            # 500 × 128-token sequences, 1,000,000 synthetic rows (a few minutes)
    python benchmarks/bench_index.py --quick    # a smoke run: tiny sizes, figures meaningless

Workload: a random 4-layer, 256-wide GPT-2 (1,000-word vocabulary) on random sequences of
``--length`` tokens (the same shape as benchmarks/bench_engine.py's random workload); 64 queries of
64 random tokens, the last 16 measured. Everything runs in this process, through inflq.index's
real code path (``fit_index``, ``build_index`` with the local mapper, ``query_rows``/``prepare``,
``top_k``) and, for the exact reference, inflq's EK-FAC estimator and ``ScorePass`` at full rank,
fitted on the same data with the same seed and damping rule.

Reported, all measured in one run:

* FLOOR: one plain forward + backward (parameter gradients, eval mode) over the corpus, same batch size;
* the index's fit (projected covariance + eigenvalue-correction passes) and build (the rows pass),
  per sequence and as ratios to FLOOR (target: build <= 1.5 × FLOOR);
* bytes per sequence on disk (target <= 4 KB at the default projection);
* per projection kind: median per-query Spearman and mean recall of the exact top-10 against
  exact EK-FAC (targets >= 0.9 and >= 0.8), and the exact top-10's recall within the index's
  top-N (the index as a candidate filter);
* the index as a candidate filter against TF-IDF on the same workload: the exact top-10's recall
  within each query's top ``--depth`` by the index (what ``--filter index:k=1000`` picks) and within
  ``tfidf:k=1000``'s candidates (the paper's filter, ``inflq_builtins.tfidf``), for the first kind;
  meaningful only with more sequences than ``--depth`` (e.g. ``--sequences 20000``);
* 64 queries against a synthetic memory-mapped index of ``--rows`` rows at the default width
  (random float16 rows in the real format): preconditioning plus the blocked top-10 scan, with the
  file's pages cold (dropped from the page cache where possible) and warm; with several sizes
  (``--rows 10000,100000,1000000``) the fitted exponent of time against rows (target: 2 s at 1M).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_engine and workloads, beside this file
from workloads import demo_workload, random_gpt2_model  # noqa: E402


def floor_seconds(model, seqs: list[np.ndarray], batch_size: int) -> float:
    """One plain forward + backward with parameter gradients over ``seqs`` (bench_engine's FLOOR)."""
    from bench_engine import floor_seconds as floor

    from inflq import make_batch

    return floor(model, (make_batch(seqs[s : s + batch_size], 0) for s in range(0, len(seqs), batch_size)))


def exact_ekfac_scores(engine, ctx, q_toks, q_starts, seqs, batch_size, pad: int = 0) -> tuple[np.ndarray, object]:
    """Exact EK-FAC scores ``[nq, n]``: inflq's estimator, full-rank queries, its ScorePass."""
    from inflq import ScorePass, Shard, make_batch, run_shard
    from inflq_builtins.estimators import EKFAC

    est = EKFAC()
    est.fit(ctx)
    grads = engine.sequence_gradients(make_batch(q_toks, pad, loss_from=q_starts), "data")
    qg = est.precondition_queries(grads, None)
    out = run_shard(engine, lambda idx: [seqs[int(i)] for i in idx], ScorePass(qg), Shard(0, np.arange(len(seqs))), pad, batch_size)
    return out["scores"].T.numpy(), est


def accuracy(index_scores: np.ndarray, exact: np.ndarray, depths: list[int]) -> dict:
    from scipy.stats import spearmanr

    rho = [spearmanr(a, b).statistic for a, b in zip(index_scores, exact, strict=True)]
    top_exact = np.argsort(-exact, axis=1)[:, :10]
    out = {"spearman_median": float(np.median(rho)), "spearman_min": float(np.min(rho))}
    for k in [10, *depths]:
        top_index = np.argsort(-index_scores, axis=1)[:, :k]
        out[f"recall10@{k}"] = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top_exact, top_index, strict=True)]))
    return out


def damping_sweep(model_i, store, q_rows, exact: np.ndarray, est, factors: list[str]) -> None:
    """The same stored rows re-scored at other dampings: a factor times each module's mean projected
    eigenvalue, ``exact`` (exact EK-FAC's own damping per module) or ``none`` (no preconditioner)."""
    from inflq.index import IndexModel, prepare, scores

    for f in factors:
        if f == "exact":
            m = IndexModel.from_tensors(model_i.tensors(), model_i.metadata())
            m.dampings = dict(est.dampings)
        elif f == "none":
            m = IndexModel.from_tensors(model_i.tensors(), model_i.metadata(), damping=1e12)
        else:
            m = IndexModel.from_tensors(model_i.tensors(), model_i.metadata(), damping_factor=float(f))
        acc = accuracy(scores(store, prepare(m, q_rows)), exact, [])
        print(f"      damping {f:>6}: Spearman median {acc['spearman_median']:.3f}, top-10 recall {acc['recall10@10']:.2f}")


def filter_recall(per_query: list[np.ndarray], exact: np.ndarray) -> float:
    """Mean over queries of the fraction of the exact top-10 among a filter's candidates."""
    top = np.argsort(-exact, axis=1)[:, :10]
    return float(np.mean([len(set(t.tolist()) & set(np.asarray(c).tolist())) / 10 for t, c in zip(top, per_query, strict=True)]))


def tfidf_candidates(seqs, q_toks, q_starts, k: int, work: Path) -> list[np.ndarray]:
    """``tfidf:k=K``'s candidates for the queries over the same sequences (the built-in filter)."""
    from inflq import FilterContext, Monitor
    from inflq_builtins.tfidf import TfidfFilter

    ctx = FilterContext(
        num_sequences=len(seqs), query_tokens=list(q_toks), query_completion_starts=list(q_starts),
        sequences=lambda idx: [seqs[int(i)] for i in idx], metadata=lambda name: np.full(len(seqs), "", dtype=object),
        artifacts_dir=work / "artifacts", corpus_fingerprint=f"bench-index-{len(seqs)}-{len(seqs[0])}", tokenizer_fingerprint="synthetic",
        seed=0, monitor=Monitor(),
    )
    return TfidfFilter(k=k, fallback="random").candidates(ctx)


def drop_page_cache(path: Path) -> bool:
    """Ask the kernel to forget ``path``'s cached pages (POSIX_FADV_DONTNEED); True if it could."""
    try:
        for f in path.glob("*.npy"):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return True
    except (AttributeError, OSError):
        return False


def synthetic_index(root: Path, model, rows: int, shard_size: int = 32768, seed: int = 0):
    """An index of ``rows`` random rows at ``model``'s width, in the real on-disk format."""
    from inflq.index import IndexStore

    store = IndexStore.create(root, f"synthetic-{rows}", model, np.arange(rows, dtype=np.int64), shard_size)
    gen = torch.Generator().manual_seed(seed)
    for i in range(store.num_shards):
        if i in store.committed():
            continue
        n = len(store.shard_rows(i))
        store.commit(i, torch.randn((n, model.width), generator=gen), torch.rand((n,), generator=gen) + 0.5)
    return store


def build_scaling(args, model, engine, many, seqs, fit_ctx, sizes: list[int], budget: int, tmp: Path) -> None:
    """Build time (the rows pass) against corpus size, with one preconditioner (fitted on the
    first ``--sequences``) for every size; each size a fresh index; FLOOR over the smallest."""
    from inflq.index import IndexSettings, build_index, fit_index, local_map

    kind = args.kinds.split(",")[0]
    model_i = fit_index(fit_ctx, IndexSettings(kind=kind, budget_bytes=budget))
    floor_seconds(model, seqs[: args.batch_size], args.batch_size)  # warm-up
    print(f"  build scaling ({kind}, width {model_i.width}); load average at start {os.getloadavg()[0]:.2f}")
    timings = []
    floor = floor_seconds(model, seqs[: sizes[0]], args.batch_size) / sizes[0]  # per sequence
    for n in sizes:
        t = time.perf_counter()
        build_index(tmp / "scaling", f"{kind}-{n}", model_i, np.arange(n, dtype=np.int64), local_map(engine, many, 0, args.batch_size), shard_size=4096)
        s = time.perf_counter() - t
        timings.append((n, s))
        print(f"    {n:>8,} sequences: build {s:8.2f} s ({1e3 * s / n:6.2f} ms/sequence) = {s / (n * floor):5.2f} x FLOOR "
              f"({1e3 * floor:.2f} ms/sequence over the first {sizes[0]:,}); load average {os.getloadavg()[0]:.2f}")
    if len(timings) >= 2:
        x, y = np.log([n for n, _ in timings]), np.log([s for _, s in timings])
        print(f"    build time ~ sequences^{np.polyfit(x, y, 1)[0]:.2f}")


def faiss_timing(store, q, nprobes: list[int], block_rows: int) -> None:
    """FAISS search (``top_k(search="faiss")``) against the exact scan: the FAISS index's build
    (once, cached beside the shards), then per ``nprobe`` the 64 queries' time (warm, median of 2)
    and their recall of the exact top 10."""
    from inflq.index import approx, top_k

    _, exact = top_k(store, q, 10, block_rows=block_rows)
    nlist = approx.default_nlist(store.num_rows)
    path = approx.faiss_path(store, "inner", nlist)
    cached = path.exists()
    t = time.perf_counter()
    approx.faiss_index(store, "inner", block_rows=block_rows)
    built = time.perf_counter() - t
    size = path.stat().st_size / 2**30
    print(f"      FAISS IVF{nlist},SQ8 ({size:.2f} GiB file): {'read from its cache file' if cached else 'built'} in {built:.1f} s")
    for nprobe in nprobes:
        times = []
        for _ in range(2):
            t = time.perf_counter()
            _, got = top_k(store, q, 10, search="faiss", nprobe=nprobe)
            times.append(time.perf_counter() - t)
        recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact.tolist(), got.tolist(), strict=True)]))
        print(f"      nprobe {nprobe:>5}: {statistics.median(times):6.3f} s, recall of the exact top 10 {recall:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sequences", type=int, default=500)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--kinds", default="orthogonal,gaussian,eigen", help="projection kinds to compare")
    ap.add_argument("--budget", type=int, default=None, help="bytes per sequence (default: the index's default)")
    ap.add_argument("--rows", default="1000000", help="synthetic index sizes for the query timing, comma-separated")
    ap.add_argument("--block-rows", type=int, default=8192)
    ap.add_argument("--depth", type=int, default=1000, help="candidates per query when comparing index:k and tfidf:k as filters")
    ap.add_argument("--dir", default=None, help="where to write indexes (default: a temporary folder)")
    ap.add_argument("--build-sizes", default=None,
                    help="instead of the rest: time the build (rows pass) over these corpus sizes, comma-separated (e.g. 1000,2000,4000), "
                         "the preconditioner fitted once on the first --sequences, and fit the exponent")
    ap.add_argument("--faiss", default=None,
                    help="also time FAISS search (inflq.index.top_k search='faiss') at these nprobe values, comma-separated (e.g. 8,32,128), "
                         "with its recall of the exact scan's top 10; needs pip install 'inflq[faiss]'")
    ap.add_argument("--only-query", action="store_true", help="skip the exact EK-FAC reference and accuracy: fit the first kind, then time queries")
    ap.add_argument("--dampings", default=None,
                    help="also re-score each kind's rows at these damping factors (x mean projected eigenvalue), comma-separated; "
                         "'exact' uses exact EK-FAC's own damping per module, 'none' no preconditioner")
    ap.add_argument("--demo", action="store_true",
                    help="the demo project's trained model, corpus and queries instead of the random workload (accuracy only)")
    ap.add_argument("--quick", action="store_true", help="a smoke run at tiny sizes (figures meaningless)")
    args = ap.parse_args()
    if args.quick:
        args.sequences, args.length, args.width, args.layers, args.queries, args.rows = 40, 32, 64, 2, 8, "20000,60000"

    from inflq import GradientEngine, select_modules
    from inflq.index import (
        BUDGET_BYTES,
        IndexSettings,
        build_index,
        candidates,
        fit_index,
        local_fit_context,
        local_map,
        prepare,
        query_rows,
        scores,
        top_k,
    )

    tmp = Path(args.dir or tempfile.mkdtemp(prefix="bench-index-"))
    rng = np.random.default_rng(0)
    build_sizes = [int(x) for x in args.build_sizes.split(",")] if args.build_sizes else []
    seqs = [rng.integers(1, args.vocab, size=args.length).astype(np.int64) for _ in range(max([args.sequences, *build_sizes]))]
    q_len = min(64, args.length)
    q_toks = [rng.integers(1, args.vocab, size=q_len).astype(np.int64) for _ in range(args.queries)]
    q_starts = [q_len - 16] * args.queries
    model = random_gpt2_model(args.width, args.layers, args.vocab, max(args.length, q_len))
    engine = GradientEngine(model, select_modules(model, "all"))
    pad = 0
    if args.demo:  # the trained model and real text (bench_index_ceiling's copy of the demo)
        engine, seqs, q_toks, q_starts, pad = demo_workload()
        model, args.sequences, args.queries, args.length = engine.model, len(seqs), len(q_toks), int(np.mean([len(x) for x in seqs]))
    many = lambda idx: [seqs[int(i)] for i in idx]  # noqa: E731
    indices = np.arange(len(seqs), dtype=np.int64)
    tokens = len(seqs) * args.length
    budget = args.budget or BUDGET_BYTES
    what = "the demo project" if args.demo else f"random GPT-2 {args.layers}x{args.width}"
    print(f"== gradient index: {what}, {len(seqs)} sequences x {args.length} tokens, "
          f"{len(engine.tracked)} modules, {args.queries} queries, batch {args.batch_size}, torch threads {torch.get_num_threads()}")

    def ctx():
        return local_fit_context(engine, many, indices[: args.sequences], pad, seed=0, batch_size=args.batch_size, shard_size=256)

    if build_sizes:
        build_scaling(args, model, engine, many, seqs, ctx(), build_sizes, budget, tmp)
        return

    default_model = None
    if args.only_query:
        default_model = fit_index(ctx(), IndexSettings(kind=args.kinds.split(",")[0], budget_bytes=budget))
    else:
        floor_seconds(model, seqs[: args.batch_size], args.batch_size)  # warm-up
        floor = floor_seconds(model, seqs, args.batch_size)
        print(f"  FLOOR (forward + backward)        {floor:8.2f} s   {1e3 * floor / len(seqs):7.2f} ms/sequence")

        t = time.perf_counter()
        exact, est = exact_ekfac_scores(engine, ctx(), q_toks, q_starts, seqs, args.batch_size, pad)
        exact_s = time.perf_counter() - t
        print(f"  exact EK-FAC fit + scoring        {exact_s:8.2f} s = {exact_s / floor:5.2f} x FLOOR")

        depths = [d for d in (50, 100, 1000) if d < len(seqs)]
        for kind in args.kinds.split(","):
            settings = IndexSettings(kind=kind, budget_bytes=budget)
            t = time.perf_counter()
            model_i = fit_index(ctx(), settings)
            fit_s = time.perf_counter() - t
            t = time.perf_counter()
            store = build_index(tmp / "built", kind, model_i, indices, local_map(engine, many, pad, args.batch_size), shard_size=4096)
            build_s = time.perf_counter() - t
            q_rows_i = query_rows(model_i, engine, q_toks, q_starts, pad)
            q = prepare(model_i, q_rows_i)
            got = scores(store, q)
            acc = accuracy(got, exact, depths)
            per_seq = sum(p.stat().st_size for p in store.path.glob("*.npy")) / len(seqs)  # rows, side and indices
            sizes = sorted(set(model_i.sizes.values()))
            print(f"  [{kind}] k_s x k_a {', '.join(f'{a}x{b}' for a, b in sizes)}, width {model_i.width}: "
                  f"{per_seq:,.0f} bytes/sequence on disk ({2 * model_i.width + 16:,} of data; target <= 4,096)")
            print(f"    fit   {fit_s:8.2f} s = {fit_s / floor:5.2f} x FLOOR")
            print(f"    build {build_s:8.2f} s = {build_s / floor:5.2f} x FLOOR (target <= 1.5)   {1e3 * build_s / len(seqs):7.2f} ms/sequence, "
                  f"{tokens / build_s:,.0f} tokens/s")
            print(f"    vs exact EK-FAC: Spearman median {acc['spearman_median']:.3f} (min {acc['spearman_min']:.3f}; target >= 0.9), "
                  f"top-10 recall {acc['recall10@10']:.2f} (target >= 0.8)"
                  + "".join(f", exact top-10 in index top-{k}: {acc[f'recall10@{k}']:.2f}" for k in depths))
            if args.dampings:
                damping_sweep(model_i, store, q_rows_i, exact, est, args.dampings.split(","))
            if args.demo:
                continue
            if default_model is None:
                default_model = model_i
                depth = min(args.depth, len(seqs))
                t = time.perf_counter()
                by_index = candidates(store, q, depth)
                index_s = time.perf_counter() - t
                t = time.perf_counter()
                by_tfidf = tfidf_candidates(seqs, q_toks, q_starts, depth, tmp)
                tfidf_s = time.perf_counter() - t
                note = " (the whole corpus: both trivially 1; use --sequences > --depth)" if depth >= len(seqs) else ""
                print(f"    as a filter, exact top-10 recall at {depth} candidates per query{note}: "
                      f"index:k={depth} {filter_recall(by_index, exact):.3f} ({index_s:.2f} s), tfidf:k={depth} {filter_recall(by_tfidf, exact):.3f} ({tfidf_s:.2f} s)")

    if args.demo:
        return
    sizes_rows = [int(x) for x in args.rows.split(",")]
    q_rows = query_rows(default_model, engine, q_toks, q_starts, 0)
    print(f"  query: {args.queries} queries, top-10 over a synthetic memory-mapped index, width {default_model.width}, blocks of {args.block_rows:,} rows")
    timings = []
    for n in sizes_rows:
        t = time.perf_counter()
        store = synthetic_index(tmp / "synthetic", default_model, n)
        made = time.perf_counter() - t
        runs = {}
        for label in ("cold", "warm", "warm"):
            if label == "cold" and not drop_page_cache(store.path):
                label = "cold?"
            t = time.perf_counter()  # preconditioning and the scan; the queries' gradients are timed below
            top_k(store, prepare(default_model, q_rows), 10, block_rows=args.block_rows)
            runs.setdefault(label, []).append(time.perf_counter() - t)
        warm = statistics.median(runs["warm"])
        timings.append((n, warm))
        cold = next((v[0] for k, v in runs.items() if k.startswith("cold")), float("nan"))
        print(f"    {n:>10,} rows ({store.size_bytes() / 2**30:5.2f} GiB, written in {made:6.1f} s): cold {cold:6.2f} s, "
              f"warm {warm:6.2f} s (target <= 2 s at 1,000,000); load average {os.getloadavg()[0]:.2f}")
        if args.faiss:
            faiss_timing(store, prepare(default_model, q_rows), [int(x) for x in args.faiss.split(",")], args.block_rows)
    if len(timings) >= 2:
        x, y = np.log([n for n, _ in timings]), np.log([s for _, s in timings])
        print(f"    query time ~ rows^{np.polyfit(x, y, 1)[0]:.2f}")
    t = time.perf_counter()
    query_rows(default_model, engine, q_toks, q_starts, 0)
    print(f"  the {args.queries} queries' projected gradients (one capture): {time.perf_counter() - t:.2f} s")
    print(f"  (indexes under {tmp}; delete when done)")


if __name__ == "__main__":
    main()
