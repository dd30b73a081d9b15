"""Scoring throughput: the local executor vs the Ray executor with 1 and 2 CPU workers, on the same
shards of the same project (a random GPT-2-shaped model built here; nothing downloaded).

    python benchmarks/bench_ray.py [--sequences 512] [--width 64] [--layers 4] [--shard-size 64]

Actor start-up (Ray, torch and the model, once per worker) is timed apart from the steady state:
each executor first scores one warm-up shard, then all shards, repeated ``--repeats`` times (best
kept). Prints sequences/second, Ray's overhead on one worker, the 2-worker speed-up, and the
arithmetic for a 10-million-sequence search from a measured per-GPU rate (``--gpu-rate``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from inflq import catalog
from inflq.queries import add_query

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", type=int, default=512)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--shard-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--gpu-rate", type=float, default=None, help="measured sequences/s of one GPU worker, for the 10M arithmetic")
    args = ap.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import numpy as np
    import torch

    from helpers import make_model_dir, write_corpus
    from inflq.base import Job
    from inflq.passes import ScorePass, make_shards
    from inflq.progress import Monitor
    from inflq.project import Project
    from inflq.runs import (
        LocalWorker,
        RunSettings,
        make_executor,
        preconditioned_queries,
        prepare_estimator,
        query_gradients,
        worker_spec,
    )

    torch.set_num_threads(1)  # one core per worker everywhere: local = one worker's worth
    d = Path(tempfile.mkdtemp(prefix="inflq-bench-ray-"))
    model = make_model_dir(d / "model", "gpt2", width=args.width, layers=args.layers)
    corpus = write_corpus(d / "corpus.jsonl", n=args.sequences)
    p = Project.init(d / "proj", model, corpus)
    add_query(p, "default", "the first president of astrobia was", "zorald pfaff")
    add_query(p, "default", "the capital city of astrobia is called", "velmora")
    settings = RunSettings(estimator="ekfac", shard_size=args.shard_size, batch_size=args.batch_size)
    prepared = prepare_estimator(p, settings, Monitor())
    est, engine = prepared.estimator, prepared.engine
    qg = preconditioned_queries(est, query_gradients(p, engine, catalog.queries(p.db, "default"), 8), 32)
    shards = make_shards(np.arange(len(p.runtime.corpus)), args.shard_size)
    job = Job(ScorePass(qg), worker_spec(p, None), args.batch_size, local=LocalWorker(p, engine))

    def measure(spec: str) -> dict:
        ex = make_executor(spec)
        got: dict[int, np.ndarray] = {}
        t = time.perf_counter()
        ex.map(job, shards[:1], lambda s, o: None, Monitor())  # start-up and warm-up
        startup = time.perf_counter() - t
        best = float("inf")
        for _ in range(args.repeats):
            t = time.perf_counter()
            ex.map(job, shards, lambda s, o: got.__setitem__(s.index, o["scores"].numpy()), Monitor())
            best = min(best, time.perf_counter() - t)
        ex.close()
        scores = np.concatenate([got[i] for i in sorted(got)])
        return {"executor": spec, "startup_s": startup, "seconds": best, "seq_per_s": len(p.runtime.corpus) / best, "scores": scores}

    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="ERROR", log_to_driver=False)
    rows = [measure("local"), measure("ray:num_workers=1"), measure("ray:num_workers=2")]
    ray.shutdown()
    base = rows[0]
    for r in rows[1:]:
        assert np.allclose(r["scores"], base["scores"], rtol=1e-5, atol=1e-6 * np.abs(base["scores"]).max()), r["executor"]
    print(f"{len(p.runtime.corpus)} sequences, GPT-2 width {args.width} x {args.layers} layers, shards of {args.shard_size}, batch {args.batch_size}, {os.cpu_count()} CPUs")
    print(f"{'executor':<22}{'start-up s':>12}{'scoring s':>12}{'seq/s':>10}")
    for r in rows:
        print(f"{r['executor']:<22}{r['startup_s']:>12.2f}{r['seconds']:>12.2f}{r['seq_per_s']:>10.1f}")
    overhead = rows[1]["seconds"] / base["seconds"] - 1
    speedup = base["seconds"] / rows[2]["seconds"]
    print(f"Ray overhead, 1 worker vs local: {overhead:+.1%} (target <= +15%)")
    print(f"2 Ray workers vs local: {speedup:.2f}x (scaling efficiency {speedup / 2:.0%})")
    rate = args.gpu_rate or rows[1]["seq_per_s"]
    what = "given GPU rate" if args.gpu_rate else "this machine's 1-worker CPU rate (a lower bound)"
    for n in (1, 8, 64):
        hours = 10_000_000 / (rate * n * max(min(speedup / 2, 1.0), 0.5)) / 3600
        print(f"10M sequences on {n:>2} workers at {rate:.0f} seq/s each ({what}): {hours:,.1f} h")
    print(json.dumps({r["executor"]: {k: v for k, v in r.items() if k != "scores"} for r in rows}))


if __name__ == "__main__":
    main()
