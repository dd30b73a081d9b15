"""Peak memory of whole runs at real model widths (issue 17): does it stay bounded by a batch?

For a random-weight GPT-2 of a real shape (default 4 layers x 768, vocabulary 50,257) and a corpus
of sequences of exactly ``--tokens`` tokens, each size in ``--sequences`` gets its own project and
its own fresh process running one investigation of ``--queries`` queries with ``--estimator``
(default ekfac, fitted on every sequence) at ``--batch-size``. The process's peak RSS comes from
``wait4`` (the kernel's high-water mark of that process alone). A baseline process that only opens
the project and loads the model gives "the model" to subtract.

Workers use the Python API (``run_investigation``, which is what ``inflq run`` calls) so that
phase times come back; ``--cli`` runs the real ``inflq run`` command instead (no phase times).
Memory figures do not depend on machine load; times do.

    OMP_NUM_THREADS=1 python benchmarks/bench_memory_real.py --sequences 64 256 1024
    OMP_NUM_THREADS=1 python benchmarks/bench_memory_real.py --layers 12 --sequences 16 64
    python benchmarks/bench_memory_real.py --vocab 2000 --tokens 128 --sequences 16 --fit-memory 0.25
    python benchmarks/bench_memory_real.py --estimator kfac --tokens 128 --sequences 16 --executor ray:num_workers=2,memory=0.5

``--fit-memory GB`` fits by module (``inflq run --fit-memory``), a pass per group of modules.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKER = r"""
import json, os, sys, threading, time
import torch
torch.set_num_threads(int(sys.argv[3]))
from inflq.progress import Monitor
from inflq.project import Project

# Resident memory sampled every 50 ms, the highest per phase (the process's own high-water mark,
# from the kernel, is the figure that counts; this only says where it happens), and each phase's
# wall seconds (summed over its spans: a fit by module enters a phase once per group).
page = os.sysconf("SC_PAGE_SIZE")
phase, peaks, done = ["load"], {}, threading.Event()
spans, since = {}, [time.perf_counter()]

def on_progress(ev):
    if ev.phase != phase[0]:
        now = time.perf_counter()
        spans[phase[0]] = spans.get(phase[0], 0.0) + now - since[0]
        phase[0], since[0] = ev.phase, now

def sample():
    with open("/proc/self/statm") as f:
        while not done.is_set():
            f.seek(0)
            rss = int(f.read().split()[1]) * page / 1e9
            peaks[phase[0]] = max(peaks.get(phase[0], 0.0), rss)
            time.sleep(0.05)

threading.Thread(target=sample, daemon=True).start()
p = Project.open(sys.argv[1])
device = os.environ.get("INFLQ_BENCH_DEVICE")
if device:
    p.runtime.configure(device)
if sys.argv[2] == "model":
    p.runtime.engine()
    out = {"phases": {}}
elif sys.argv[2] == "floor":
    # FLOOR over every sequence, in batches of the run's size: the benchmarks' one definition
    # (bench_engine.floor_seconds; argv[6] is the benchmarks folder).
    sys.path.insert(0, sys.argv[6])
    from bench_engine import floor_seconds
    from inflq.engine import make_batch
    model, rt = p.runtime.engine().model, p.runtime
    n, bs = len(rt.corpus.lengths()), int(sys.argv[5])
    batches = (make_batch(rt.corpus.many(list(range(s, min(n, s + bs)))), rt.pad_id, model.device) for s in range(0, n, bs))
    out = {"phases": {}, "floor": floor_seconds(model, batches)}
else:
    from inflq.runs import RunSettings, run_investigation
    s = RunSettings(estimator=sys.argv[4], batch_size=int(sys.argv[5]), fit_memory=json.loads(sys.argv[6]), executor=sys.argv[7] or None)
    r = run_investigation(p, "default", s, monitor=Monitor(on_progress=on_progress))
    out = {"phases": r.phases, "seconds": r.seconds}
on_progress(type("End", (), {"phase": "end"}))
out["spans"] = {k: v for k, v in spans.items() if k != "load"}
if device and device.startswith("cuda"):
    out["device_peak"] = torch.cuda.max_memory_allocated(device) / 1e9
time.sleep(0.1)
done.set()
print(json.dumps({**out, "peaks": peaks}))
"""


def build_model(folder: Path, layers: int, width: int, vocab: int, tokens: int) -> None:
    """A random-weight GPT-2 and a word-level tokenizer whose ``vocab`` words are w0, w1, ..."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    words = {"<|endoftext|>": 0, "<unk>": 1}
    for i in range(vocab - len(words)):
        words[f"w{i}"] = len(words)
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<unk>",
        model_input_names=["input_ids", "attention_mask"],
    ).save_pretrained(str(folder))
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab, n_positions=max(tokens, 64), n_embd=width, n_layer=layers, n_head=max(1, width // 64),
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(cfg).save_pretrained(str(folder), safe_serialization=True)


def build_project(folder: Path, model: Path, n: int, tokens: int, vocab: int, queries: int):
    import numpy as np

    from inflq.project import Project
    from inflq.queries import add_query

    rng = np.random.default_rng(0)
    corpus = folder / "corpus.jsonl"
    folder.mkdir(parents=True, exist_ok=True)
    with open(corpus, "w") as f:
        for i in range(n):
            text = " ".join(f"w{w}" for w in rng.integers(0, vocab - 2, size=tokens))  # one token a word
            f.write(json.dumps({"id": f"d{i}", "text": text}) + "\n")
    p = Project.init(folder / "proj", model, corpus, max_length=tokens)
    lengths = p.runtime.corpus.lengths()
    for _ in range(queries):
        add_query(p, "default", " ".join(f"w{w}" for w in rng.integers(0, vocab - 2, size=24)), " ".join(f"w{w}" for w in rng.integers(0, vocab - 2, size=8)))
    p.close()
    return folder / "proj", len(lengths), int(lengths.min()), int(lengths.max())


def measure(cmd: list[str], env: dict) -> tuple[float, dict, float]:
    """Peak RSS (GB, 10⁹ bytes) of the process ``cmd`` alone, its JSON output, wall seconds."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, text=True, env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (Popen.wait would discard it)
        proc.returncode = os.waitstatus_to_exitcode(status)
        fo.seek(0)
        fe.seek(0)
        out, err = fo.read(), fe.read()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed:\n{err[-3000:]}")
    line = [x for x in out.splitlines() if x.startswith("{")]
    return usage.ru_maxrss * 1024 / 1e9, json.loads(line[-1]) if line else {}, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--sequences", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--queries", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--estimator", default="ekfac")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fit-memory", type=float, default=None, help="GB of sums per fitting pass: fit by module (default: no limit)")
    ap.add_argument("--floor", action="store_true", help="also time FLOOR (forward + backward over the corpus, batches of --batch-size) in a fresh process, at the first size, and give each phase as a multiple of it (scaled by the number of sequences at the other sizes)")
    ap.add_argument("--executor", default=None, help="the run's executor spec, e.g. ray:num_workers=2,memory=0.6 (default: local); "
                    "the peak RSS then counts the Ray processes the run starts, the sampled figures the driver alone")
    ap.add_argument("--cli", action="store_true", help="run the real `inflq run` command (no phase times)")
    ap.add_argument("--device", default=None, help="the run's device (cpu, cuda); on CUDA each size's peak device memory is printed too")
    ap.add_argument("--workdir", default=None, help="keep the models and projects here (default: a temporary folder)")
    args = ap.parse_args()

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    if args.device:
        env["INFLQ_BENCH_DEVICE"] = args.device
    tmp = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="inflq-memreal-"))
    model = tmp / f"gpt2-{args.layers}x{args.width}"
    if not (model / "config.json").exists():
        build_model(model, args.layers, args.width, args.vocab, args.tokens)
    print(f"== peak RSS: GPT-2 {args.layers} layers x {args.width}, vocabulary {args.vocab:,}, {args.tokens}-token sequences, "
          f"{args.estimator}, batch {args.batch_size}, {args.queries} queries, {args.threads} thread(s), fit memory {args.fit_memory or 'unlimited'} GB, "
          f"executor {args.executor or 'local'}, device {args.device or 'the project default'}; "
          f"{'`inflq run`' if args.cli else 'run_investigation'} in a fresh process per size")
    rows = []
    base = None
    floor = None
    for n in args.sequences:
        proj, count, lo, hi = build_project(tmp / f"n{n}", model, n, args.tokens, args.vocab, args.queries)
        if base is None:
            base, _, _ = measure([sys.executable, "-c", WORKER, str(proj), "model", str(args.threads)], env)
            print(f"model only (open the project, load the model): peak RSS {base:.2f} GB")
        if args.cli:
            cmd = [sys.executable, "-m", "inflq.cli", "run", str(proj), "--estimator", args.estimator, "--batch-size", str(args.batch_size)]
            cmd += ["--device", args.device] if args.device else []
            cmd += ["--fit-memory", str(args.fit_memory)] if args.fit_memory else []
            cmd += ["--executor", args.executor] if args.executor else []
        else:
            cmd = [sys.executable, "-c", WORKER, str(proj), "run", str(args.threads), args.estimator, str(args.batch_size), json.dumps(args.fit_memory), args.executor or ""]
        rss, out, wall = measure(cmd, env)
        phases = out.get("phases", {})
        rows.append((n, rss, out.get("device_peak")))
        dev = f"peak device memory {out['device_peak']:.2f} GB, " if out.get("device_peak") is not None else ""
        print(f"{n:>6} sequences ({count} stored, {lo}-{hi} tokens): {dev}peak RSS {rss:.2f} GB ({rss - base:+.2f} GB over the model), "
              f"wall {wall:.0f} s" + ("; " + ", ".join(f"{k} {v:.0f} s" for k, v in phases.items()) if phases else ""), flush=True)
        if args.floor:
            if floor is None:  # timed on the first size; the same sequences and batches cost it in proportion
                _, fl, _ = measure([sys.executable, "-c", WORKER, str(proj), "floor", str(args.threads), args.estimator, str(args.batch_size), str(Path(__file__).resolve().parent)], env)
                floor = (fl["floor"], count)
            this = floor[0] * count / floor[1]
            ratios = ", ".join(f"{k} {v / this:.2f}" for k, v in phases.items() if v >= 0.5)
            how = "measured" if floor[1] == count else f"{floor[0]:.1f} s measured at {floor[1]} sequences, scaled"
            print(f"        FLOOR {this:.1f} s ({how})" + (f"; as multiples of FLOOR: {ratios}" if ratios else ""), flush=True)
        if out.get("spans"):
            print("        wall seconds by phase: " + ", ".join(f"{k} {v:.1f} s" for k, v in out["spans"].items()), flush=True)
        if out.get("peaks"):
            print("        sampled peak RSS by phase (this process): " + ", ".join(f"{k} {v:.2f} GB" for k, v in out["peaks"].items()), flush=True)
    if len(rows) > 1:
        print(f"ratio largest/smallest: {rows[-1][1] / rows[0][1]:.3f} (target <= 1.1)")
        if rows[0][2]:
            print(f"device memory ratio largest/smallest: {rows[-1][2] / rows[0][2]:.3f} (target <= 1.1)")


if __name__ == "__main__":
    main()
