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

Wall seconds, CPU seconds, system seconds and minor page faults are printed per process (from
``wait4``), with the ratios inflq / Kronfluence (issue 27's goal: <= 0.4) and default / one thread
(must be <= 1). Kronfluence also runs at a fixed batch of 64 sequences (``--kf-batch``; its fastest
setting on short sequences) besides its automatic batch size. Workloads:

* ``demo``: the demo (1,971 sequences, mean 20 tokens, its 9 queries);
* ``facts3k``: a held-out-like facts workload (issue 27): 3,000 short sequences (at most 24
  tokens: the demo's documents and single sentences of them), a 2 x 128 GPT-2 (the demo model's
  first two blocks, its trained embeddings and head) and 15 queries (the demo's 9 and 6 facts
  split before their last two words);
* ``random128``: a random 4-layer, 256-wide GPT-2 on ``--sequences`` random 128-token sequences
  with 8 queries.
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
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import random_corpus, random_gpt2, split_query  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "projects" / "demo"
INFLQ = [sys.executable, "-m", "inflq.cli"]


LAST: dict[str, float] = {}  # the last timed process's system seconds and minor page faults


def timed(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> tuple[float, float, str]:
    """(wall seconds, user + system CPU seconds of the process and its children, output tail);
    its system seconds and minor page faults (``wait4``'s rusage) go to ``LAST``."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}, cwd=cwd)
    texts: dict[str, str] = {}
    readers = [threading.Thread(target=lambda k=k, f=f: texts.__setitem__(k, f.read())) for k, f in (("out", p.stdout), ("err", p.stderr))]
    for r in readers:
        r.start()
    _, status, usage = os.wait4(p.pid, 0)  # reaped here, so that its own rusage comes back
    wall = time.perf_counter() - t
    for r in readers:
        r.join()
    p.returncode = os.waitstatus_to_exitcode(status)
    out, err = texts["out"], texts["err"]
    cpu = usage.ru_utime + usage.ru_stime
    LAST.update(system=usage.ru_stime, faults=usage.ru_minflt)
    if p.returncode != 0:
        raise SystemExit(f"failed ({p.returncode}): {' '.join(map(str, cmd))}\n{err[-3000:]}")
    return wall, cpu, (out + err)[-400:]


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
    if name == "facts3k":
        return facts_workload(tmp)
    raise SystemExit(f"unknown workload {name!r}")


def facts_workload(tmp: Path, n: int = 3000) -> tuple[Path, Path, Path, int, bool]:
    """The held-out-like facts workload (see the module's docstring): deterministic, offline."""
    import re

    from transformers import AutoModelForCausalLM

    model_dir = tmp / "facts-model"
    model = AutoModelForCausalLM.from_pretrained(str(DEMO / "model"), use_safetensors=True)
    model.transformer.h = model.transformer.h[:2]
    model.config.n_layer = 2
    model.save_pretrained(str(model_dir), safe_serialization=True)
    for f in (DEMO / "model").iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, model_dir / f.name)
    docs = [json.loads(x) for x in (DEMO / "corpus.jsonl").read_text().splitlines() if x.strip()]
    texts = [d["text"] for d in docs]
    sentences = sorted({s for d in texts for s in re.split(r"(?<=\.) ", d)})
    texts += sentences[: n - len(texts)]
    corpus = tmp / "facts-corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"f{i:05d}", "text": t}) + "\n" for i, t in enumerate(texts[:n])))
    queries = [json.loads(x) for x in (DEMO / "queries.jsonl").read_text().splitlines() if x.strip()]
    facts = [d["text"] for d in docs if d["id"].startswith("fact-") and d["id"].endswith("-fwd-00")]
    for text in facts[: 15 - len(queries)]:
        words = text.rstrip(".").split(" ")
        queries.append({"prompt": " ".join(words[:-2]), "completion": " " + " ".join(words[-2:])})
    q = tmp / "facts-queries.jsonl"
    q.write_text("".join(json.dumps({"prompt": x["prompt"], "completion": x["completion"]}) + "\n" for x in queries))
    return model_dir, corpus, q, 24, True


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
    ap.add_argument("--kf-batch", type=int, default=64, help="Kronfluence also at this fixed batch size (0: not)")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: startup,one-thread,batch8,kronfluence")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    env = clean_env()
    tmp = Path(tempfile.mkdtemp(prefix="inflq-user-"))
    print(f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}; python {sys.version.split()[0]}", flush=True)
    if "startup" not in skip:
        startup = [timed([*INFLQ, "--help"], env)[0] for _ in range(3)]
        print(f"inflq --help: {statistics.median(startup):.2f} s (median of 3)", flush=True)
    rows = []

    def measure(row: dict, key: str, name: str, cmd: list[str], extra_env: dict | None = None) -> None:
        load = os.getloadavg()[0]
        wall, cpu, _ = timed(cmd, {**env, **(extra_env or {})})
        row[key] = (wall, cpu, LAST["system"], LAST["faults"], load)
        print(f"[{name}] {key}: {wall:.1f} s wall, {cpu:.1f} s CPU, {LAST['system']:.1f} s system ({LAST['system'] / wall:.0%} of wall), "
              f"{LAST['faults'] / 1e6:.2f} M minor page faults; load average {load:.2f} at the start", flush=True)

    for name in args.workloads.split(","):
        model, corpus, queries, max_length, eos = make_workload(name, tmp, args.sequences)
        root = tmp / f"{name}-project"
        init_project(root, model, corpus, queries, max_length, eos)
        if "startup" not in skip:
            runs = [timed([*INFLQ, "runs", str(root)], env)[0] for _ in range(3)]
            print(f"[{name}] inflq runs: {statistics.median(runs):.2f} s (median of 3)", flush=True)
            paints = [first_paint(root, env) for _ in range(3)]
            print(f"[{name}] TUI first screen: {statistics.median(p[0] for p in paints):.2f} s, start-up workers done: "
                  f"{statistics.median(p[1] for p in paints):.2f} s (median of 3)", flush=True)
        row = {"workload": name}
        run = [*INFLQ, "run", str(root), "--estimator", "ekfac", "--refit"]
        measure(row, "inflq", name, run)
        if "one-thread" not in skip:
            measure(row, "inflq 1 thread", name, run, {"OMP_NUM_THREADS": "1"})
        if "batch8" not in skip:
            measure(row, "inflq batch 8", name, [*run, "--batch-size", "8"])
        if args.kf_python and "kronfluence" not in skip:
            kf = [args.kf_python, str(REPO / "benchmarks" / "kronfluence_user.py"), str(model), str(corpus), str(queries), str(max_length),
                  "1" if eos else "0", str(tmp / f"{name}-kf.npy")]
            measure(row, "kronfluence", name, kf)
            if args.kf_batch:
                measure(row, f"kronfluence batch {args.kf_batch}", name, [*kf, str(args.kf_batch)])
        rows.append(row)
    nan = (float("nan"),) * 5
    kb = f"kronfluence batch {args.kf_batch}"
    print(f"\nworkload    inflq s  system share  1-thread s  default/1-thread  batch-8 s  Kronfluence s  KF batch {args.kf_batch} s  "
          f"inflq/KF  inflq/KF batch {args.kf_batch}  (goal <= 0.4)")
    for r in rows:
        one, kf, b8, k64 = (r.get(k, nan) for k in ("inflq 1 thread", "kronfluence", "inflq batch 8", kb))
        print(f"{r['workload']:<10}  {r['inflq'][0]:7.1f}  {r['inflq'][2] / r['inflq'][0]:12.0%}  {one[0]:10.1f}  {r['inflq'][0] / one[0]:16.2f}  "
              f"{b8[0]:9.1f}  {kf[0]:13.1f}  {k64[0]:13.1f}  {r['inflq'][0] / kf[0]:8.2f}  {r['inflq'][0] / k64[0]:18.2f}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
