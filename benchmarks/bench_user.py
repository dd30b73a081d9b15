"""What users get: whole processes at default settings, inflq against Kronfluence (issue 12).

    python benchmarks/bench_user.py [--kf-python /tmp/kfenv/bin/python] [--workloads demo,random128]

Every figure is one whole process, timed from start to exit, with nothing pinned: default threads,
default batching, default everything, as a user types it.

* start-up: ``inflq --help``, ``inflq runs PROJECT`` and the TUI's first screen (median of 3);
* ``inflq run PROJECT --estimator ekfac --refit`` (fit + score every query against every sequence)
  at defaults, and the same with ``OMP_NUM_THREADS=1`` (default threads must never be slower) and
  with ``--batch-size 8`` (the old default, for reference);
* Kronfluence's whole script at its own defaults (``kronfluence_user.py``: automatic batch size,
  default threads, true Fisher sampled at the training loss's positions, full-rank queries) on the
  same model, corpus and queries, in the venv given by ``--kf-python`` (see bench_engine.py for the
  three commands that make it).

Wall seconds and user CPU seconds are printed per process, with the ratios inflq / Kronfluence
(goal: <= 0.5) and default / one thread (must be <= 1). Workloads: the demo (1,971 sequences, mean
20 tokens, its 9 queries) and ``random128``: a random 4-layer, 256-wide GPT-2 on ``--sequences``
random 128-token sequences with 8 queries.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import random_corpus, random_gpt2, split_query  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "projects" / "demo"
INFLQ = [sys.executable, "-m", "inflq.cli"]


def timed(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> tuple[float, float, str]:
    """(wall seconds, user + system CPU seconds of the process and its children, output tail)."""
    before = os.times()
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=cwd)
    wall = time.perf_counter() - t
    after = os.times()
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    if p.returncode != 0:
        raise SystemExit(f"failed ({p.returncode}): {' '.join(map(str, cmd))}\n{p.stderr[-3000:]}")
    return wall, cpu, (p.stdout + p.stderr)[-400:]


PAINT = """
import asyncio, sys
from inflq.tui.app import InflqApp

async def main():
    app = InflqApp(sys.argv[1])
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        print("painted", flush=True)
        await app.workers.wait_for_complete()
        print("workers done", flush=True)

asyncio.run(main())
"""


def first_paint(root: Path, env: dict) -> tuple[float, float]:
    """Seconds from starting a process to the TUI's first screen (Textual's test driver, no
    terminal), and to its start-up workers (model check, first loads) finishing."""
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", PAINT, str(root)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    painted = done = float("nan")
    for line in p.stdout:
        if line.startswith("painted"):
            painted = time.perf_counter() - t
        elif line.startswith("workers done"):
            done = time.perf_counter() - t
    p.wait()
    return painted, done


def clean_env() -> dict:
    """The environment a user's shell has: none of our thread settings."""
    return {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "OPENBLAS_NUM_THREADS")}


def make_workload(name: str, tmp: Path, sequences: int) -> tuple[Path, Path, Path, int, bool]:
    """(model folder, corpus, queries file, max length, append EOS) for a workload."""
    if name == "demo":
        q = tmp / "demo-queries.jsonl"
        q.write_text((DEMO / "queries.jsonl").read_text())
        return DEMO / "model", DEMO / "corpus.jsonl", q, 64, True
    if name == "random128":
        model = random_gpt2(tmp / "r128-model", width=256, layers=4, heads=4, positions=160, vocab_words=2000)
        corpus = random_corpus(tmp / "r128-corpus.jsonl", sequences, 128, 2000)
        docs = [json.loads(x) for x in corpus.read_text().splitlines()[:8]]
        q = tmp / "r128-queries.jsonl"
        q.write_text("".join(json.dumps(split_query(d["text"])) + "\n" for d in docs))
        return model, corpus, q, 128, False
    raise SystemExit(f"unknown workload {name!r}")


def init_project(root: Path, model: Path, corpus: Path, queries: Path, max_length: int, append_eos: bool) -> None:
    timed([*INFLQ, "init", str(root), "--model", str(model), "--corpus", str(corpus), "--max-length", str(max_length)])
    toml = root / "inflq.toml"
    text = toml.read_text()
    text = text.replace(f"append_eos = {str(not append_eos).lower()}", f"append_eos = {str(append_eos).lower()}")
    toml.write_text(text)
    timed([*INFLQ, "corpus", "rebuild", str(root)])
    timed([*INFLQ, "query", "add", str(root), "--file", str(queries)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="demo,random128")
    ap.add_argument("--sequences", type=int, default=1000, help="random128: number of sequences")
    ap.add_argument("--kf-python", default=os.environ.get("INFLQ_KRONFLUENCE_PYTHON"))
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: one-thread,batch8,kronfluence")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    env = clean_env()
    tmp = Path(tempfile.mkdtemp(prefix="inflq-user-"))
    print(f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}; python {sys.version.split()[0]}", flush=True)
    startup = [timed([*INFLQ, "--help"], env)[0] for _ in range(3)]
    print(f"inflq --help: {statistics.median(startup):.2f} s (median of 3)", flush=True)
    rows = []
    for name in args.workloads.split(","):
        model, corpus, queries, max_length, eos = make_workload(name, tmp, args.sequences)
        root = tmp / f"{name}-project"
        init_project(root, model, corpus, queries, max_length, eos)
        runs = [timed([*INFLQ, "runs", str(root)], env)[0] for _ in range(3)]
        print(f"[{name}] inflq runs: {statistics.median(runs):.2f} s (median of 3)", flush=True)
        paints = [first_paint(root, env) for _ in range(3)]
        print(f"[{name}] TUI first screen: {statistics.median(p[0] for p in paints):.2f} s, start-up workers done: "
              f"{statistics.median(p[1] for p in paints):.2f} s (median of 3)", flush=True)
        row = {"workload": name}
        run = [*INFLQ, "run", str(root), "--estimator", "ekfac", "--refit"]
        row["inflq"] = timed(run, env)[:2]
        print(f"[{name}] inflq run (defaults): {row['inflq'][0]:.1f} s wall, {row['inflq'][1]:.1f} s CPU", flush=True)
        if "one-thread" not in skip:
            row["inflq 1 thread"] = timed(run, {**env, "OMP_NUM_THREADS": "1"})[:2]
            print(f"[{name}] inflq run (OMP_NUM_THREADS=1): {row['inflq 1 thread'][0]:.1f} s wall, {row['inflq 1 thread'][1]:.1f} s CPU", flush=True)
        if "batch8" not in skip:
            row["inflq batch 8"] = timed([*run, "--batch-size", "8"], env)[:2]
            print(f"[{name}] inflq run --batch-size 8: {row['inflq batch 8'][0]:.1f} s wall, {row['inflq batch 8'][1]:.1f} s CPU", flush=True)
        if args.kf_python and "kronfluence" not in skip:
            out = tmp / f"{name}-kf.npy"
            row["kronfluence"] = timed([args.kf_python, str(REPO / "benchmarks" / "kronfluence_user.py"), str(model), str(corpus), str(queries), str(max_length), "1" if eos else "0", str(out)], env)[:2]
            print(f"[{name}] Kronfluence whole script (defaults): {row['kronfluence'][0]:.1f} s wall, {row['kronfluence'][1]:.1f} s CPU", flush=True)
        rows.append(row)
    print("\nworkload    inflq s   1-thread s  default/1-thread  batch-8 s  Kronfluence s  inflq/Kronfluence (goal <= 0.5)")
    for r in rows:
        one = r.get("inflq 1 thread")
        kf = r.get("kronfluence")
        b8 = r.get("inflq batch 8")
        print(f"{r['workload']:<10}  {r['inflq'][0]:7.1f}   {one[0] if one else float('nan'):9.1f}   "
              f"{r['inflq'][0] / one[0] if one else float('nan'):15.2f}   {b8[0] if b8 else float('nan'):8.1f}   "
              f"{kf[0] if kf else float('nan'):12.1f}   {r['inflq'][0] / kf[0] if kf else float('nan'):8.2f}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
