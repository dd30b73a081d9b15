"""Speed and memory of inflq's influence engine (issue 3), with Kronfluence side by side.

    python benchmarks/bench_engine.py            # full run (about 20 minutes on 2 CPU cores)
    python benchmarks/bench_engine.py --quick    # smaller corpora, one repeat (a few minutes)

Every inflq time is reported as a ratio to FLOOR: one plain forward + backward pass
(``loss.backward()`` with parameter gradients, model in eval mode, same batch size) over the same
sequences, measured in the same process with the same thread count. Targets (issue 3):

* fitting EK-FAC factors (covariance pass, float64 eigendecomposition, eigenvalue-correction
  pass) <= 4 x FLOOR;
* scoring one query against the corpus <= 1.5 x FLOOR, 64 queries <= 2 x FLOOR (rank 32);
* peak memory while scoring 100,000 sequences within 1.2 x of scoring 10,000.

Workloads: the demo model (``projects/demo/model`` on ``projects/demo/corpus.jsonl``, skipped with
a note if the model has not been trained yet) and a random 4-layer, 256-wide GPT-2 on random
128-token sequences. inflq runs through its real code path: a project built with
``Project.init``, factors through ``ensure_factors`` and the local executor, query gradients through
``runs.query_gradients`` / ``preconditioned_queries``, scores through ``ScorePass``.

Kronfluence runs the same workload (same sequences, queries, batch size, damping, threads, tracked
modules, rank 32 with an exact SVD) in a subprocess, ``benchmarks/kronfluence_worker.py``, with the
Python given by ``--kf-python`` (default: ``$INFLQ_KRONFLUENCE_PYTHON``, else this Python if it can
import kronfluence). Kronfluence 1.0 pins ``torchvision``, which would replace our torch, so
install it in its own environment::

    python -m venv /tmp/kfenv --system-site-packages
    /tmp/kfenv/bin/pip install --no-deps kronfluence
    /tmp/kfenv/bin/pip install accelerate einops einconv opt-einsum   # torchvision is never imported
    python benchmarks/bench_engine.py --kf-python /tmp/kfenv/bin/python

Scores come back through ``.npy`` files; the two score matrices are compared by Spearman
correlation. Each tool fits its own factors with its own sampled labels, so the correlation
includes sampling noise; the benchmark also reports inflq against itself with another seed
(``--noise-check``) as the ceiling such a comparison can reach.

``--agreement-seeds N`` measures that agreement instead of timings: both tools fit their factors at
N seeds each (the true Fisher unless ``--fisher empirical``; both damped by their default, 0.1 × the
mean eigenvalue per module, unless ``--damping``), score the same queries at rank ``--rank``, and the
benchmark reports Spearman correlations of inflq vs Kronfluence against Kronfluence seed vs
Kronfluence seed (and inflq vs inflq), an inflq seed and a Kronfluence seed each against the mean of
N - 1 other Kronfluence seeds, and the score scale ratio (RMS of inflq's seed-mean scores over
Kronfluence's)::

    python benchmarks/bench_engine.py --agreement-seeds 4 --kf-python /tmp/kfenv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from inflq.queries import add_query

REPO = Path(__file__).resolve().parents[1]
FULL_RANK_MB = 1024  # set by --full-rank-mb
FISHER = "true"  # set by --fisher: "true" (sampled labels) or "empirical" (the data's labels, no sampling noise)
DEMO = REPO / "projects" / "demo"


# -- workloads -------------------------------------------------------------------------------------
def word_tokenizer(path: Path, words: list[str]):
    """A word-level tokenizer (one token per whitespace-separated word), saved beside the model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<unk>": 1}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<unk>",
        model_input_names=["input_ids", "attention_mask"],
    )
    fast.save_pretrained(str(path))
    return fast


def random_gpt2(path: Path, width: int, layers: int, heads: int, positions: int, vocab_words: int, seed: int = 0) -> Path:
    """A random-weight GPT-2 with a word-level tokenizer, saved as safetensors."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    path.mkdir(parents=True, exist_ok=True)
    tok = word_tokenizer(path, [f"w{i}" for i in range(vocab_words)])
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=positions, n_embd=width, n_layer=layers, n_head=heads,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    GPT2LMHeadModel(cfg).save_pretrained(str(path), safe_serialization=True)
    return path


def random_corpus(path: Path, n: int, length: int, vocab_words: int, seed: int = 0) -> Path:
    """``n`` documents of exactly ``length`` random words (= tokens)."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i, row in enumerate(rng.integers(0, vocab_words, size=(n, length))):
            f.write(json.dumps({"id": f"r{i}", "text": " ".join(f"w{w}" for w in row)}) + "\n")
    return path


def split_query(text: str) -> dict:
    """A query made from a document: the first ~60% of its words is the prompt, the rest the completion."""
    words = text.split()
    cut = max(1, min(len(words) - 1, int(len(words) * 0.6)))
    return {"prompt": " ".join(words[:cut]), "completion": " " + " ".join(words[cut:]), "chat": False}



def floor_seconds(model, batches) -> float:
    """FLOOR: one plain forward + backward with parameter gradients (eval mode) over ``batches``
    (inflq Batches, made lazily), the unit every benchmark states its costs in."""
    import torch
    from torch.nn import functional as F

    model.eval()
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(True)
    started = time.perf_counter()
    for b in batches:
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits
        targets = torch.zeros_like(b.input_ids)
        targets[:, :-1] = b.input_ids[:, 1:]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="none")
        (ce * b.loss_mask.reshape(-1)).sum().backward()
        model.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - started
    for p, f in flags:
        p.requires_grad_(f)
    return seconds

def demo_model_ready() -> bool:
    model = DEMO / "model"
    return (model / "config.json").is_file() and any(model.glob("*.safetensors"))


# -- the inflq side --------------------------------------------------------------------------------
class InflqBench:
    """One workload's project, engine and timed phases (all in this process)."""

    def __init__(self, root: Path, model: Path, corpus: Path, queries: list[dict], batch_size: int, **init) -> None:
        from inflq.project import Project
        from inflq.runs import default_executor

        self.project = Project.init(root, model, corpus, **init)
        self.engine = self.project.runtime.engine()
        self.executor = default_executor()
        self.store = self.project.runtime.corpus
        self.indices = np.arange(len(self.store), dtype=np.int64)
        self.batch_size = batch_size
        self.queries = queries
        self.factors: dict | None = None
        toks = self.store.lengths()
        self.tokens = int(toks.sum())

    def floor(self) -> float:
        """One plain forward + backward (parameter gradients, eval mode) over the corpus."""
        from inflq.engine import make_batch

        chunks = (self.indices[s : s + self.batch_size] for s in range(0, len(self.indices), self.batch_size))
        return floor_seconds(self.engine.model, (make_batch(self.store.many(c), self.project.runtime.pad_id, self.engine.device) for c in chunks))

    def fit(self, seed: int = 0) -> float:
        """EK-FAC factors (covariance + eigendecomposition + eigenvalue correction), refitted."""
        from inflq.progress import Monitor
        from inflq.runs import RunSettings, prepare_estimator

        settings = RunSettings(estimator=f"ekfac:fisher={FISHER}", batch_size=self.batch_size, seed=seed, refit=True)
        started = time.perf_counter()
        est = prepare_estimator(self.project, settings, Monitor(), engine=self.engine, executor=self.executor).estimator
        seconds = time.perf_counter() - started
        self.factors = dict(est.factors)
        return seconds

    def default_damping(self) -> float:
        """One absolute λ for both tools: 0.1 × the mean refitted eigenvalue over all modules."""
        lams = [v.double().flatten() for k, v in self.factors.items() if k.startswith("lambda/")]
        import torch

        return 0.1 * float(torch.cat(lams).mean())

    def score(self, nq: int, damping: float, rank: int | None) -> tuple[float, np.ndarray]:
        """Query gradients, preconditioning, rank-``rank`` compression and the scoring pass over the corpus."""
        import torch

        from inflq.base import Job
        from inflq.passes import ScorePass, make_shards
        from inflq.progress import Monitor
        from inflq.runs import (
            LocalWorker,
            RunSettings,
            make_estimator,
            preconditioned_queries,
            query_compression,
            query_gradients,
            worker_spec,
        )

        # damping None: the estimator's default, 0.1 × the mean eigenvalue per module.
        spec = f"ekfac:fisher={FISHER}" if damping is None else f"ekfac:damping={damping!r},fisher={FISHER}"
        est = make_estimator(spec)
        est.load_factors(self.factors)
        parts: dict[int, torch.Tensor] = {}
        started = time.perf_counter()
        grads = query_gradients(self.project, self.engine, self.queries[:nq], self.batch_size)
        # As run_investigation does: rank ``rank``, full rank where scoring is cheaper that way.
        policy = query_compression(RunSettings(rank=rank, full_rank_mb=FULL_RANK_MB), self.store.lengths()[self.indices])
        qg = preconditioned_queries(est, grads, policy)
        job = Job(ScorePass(qg), worker_spec(self.project, None), self.batch_size, local=LocalWorker(self.project, self.engine))
        self.executor.map(job, make_shards(self.indices, 512), lambda sh, out: parts.__setitem__(sh.index, out["scores"]), Monitor())
        seconds = time.perf_counter() - started
        scores = torch.cat([parts[i] for i in sorted(parts)]).T.to(torch.float64).numpy()
        return seconds, scores

    def export_for_kronfluence(self, folder: Path, damping: float | None, rank: int | None, threads: int, repeats: int, counts: list[int],
                               seeds: list[int] | None = None) -> None:
        from inflq import targets_of

        lens = self.store.lengths()
        tok = np.full((len(lens), int(lens.max())), self.project.runtime.pad_id, dtype=np.int64)
        trained = np.zeros(tok.shape, dtype=np.uint8)
        for i in range(len(lens)):
            seq = self.store.get(i)
            tok[i, : lens[i]] = seq
            trained[i, 1 : lens[i]] = 1 if targets_of(seq) is None else targets_of(seq)[1:]
        np.save(folder / "train_targets.npy", trained)  # the loss mask: the responses of instruction data
        q = [self.project.runtime.tokenize_query(x["prompt"], x["completion"]) for x in self.queries]
        qlen = np.array([len(t.tokens) for t in q], dtype=np.int64)
        qtok = np.full((len(q), int(qlen.max())), self.project.runtime.pad_id, dtype=np.int64)
        for i, t in enumerate(q):
            qtok[i, : len(t.tokens)] = t.tokens
        np.save(folder / "train_tokens.npy", tok)
        np.save(folder / "train_lengths.npy", lens.astype(np.int64))
        np.save(folder / "query_tokens.npy", qtok)
        np.save(folder / "query_lengths.npy", qlen)
        np.save(folder / "query_starts.npy", np.array([t.completion_start for t in q], dtype=np.int64))
        (folder / "job.json").write_text(json.dumps({
            "model": str(self.project.model_path.resolve()), "modules": self.engine.names, "pad_id": self.project.runtime.pad_id,
            "adapter": str(self.project.adapter_path.resolve()) if self.project.adapter_path is not None else None,
            "batch_size": self.batch_size, "fisher": FISHER, "damping": damping, "rank": rank, "threads": threads, "repeats": repeats,
            "query_counts": counts, "seed": 0, "seeds": seeds,
        }))


def spearman(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Spearman correlation of the flattened matrices, and the median over queries (rows)."""
    from scipy.stats import spearmanr

    flat = float(spearmanr(a.ravel(), b.ravel()).statistic)
    rows = [float(spearmanr(x, y).statistic) for x, y in zip(a, b)]
    return flat, float(np.median(rows))


def kronfluence_python(arg: str | None) -> str | None:
    for cand in (arg, os.environ.get("INFLQ_KRONFLUENCE_PYTHON")):
        if cand:
            return cand
    ok = subprocess.run([sys.executable, "-c", "import kronfluence"], capture_output=True).returncode == 0
    return sys.executable if ok else None


def bench_workload(name: str, model: Path, corpus: Path, queries: list[dict], args, tmp: Path) -> dict:
    import torch

    torch.manual_seed(0)
    b = InflqBench(tmp / f"{name}-project", model, corpus, queries, args.batch_size)
    lens = b.store.lengths()
    print(f"\n== {name}: {len(b.indices)} sequences, {b.tokens} tokens (mean length {lens.mean():.1f}, max {lens.max()}), "
          f"{len(b.engine.tracked)} tracked modules, batch size {args.batch_size}, {torch.get_num_threads()} threads", flush=True)
    reps = args.repeats
    b.floor()  # warm-up
    floors = [b.floor() for _ in range(reps)]
    floor = statistics.median(floors)
    print(f"  FLOOR (forward + backward)      {floor:8.2f} s   runs {fmt(floors)}", flush=True)
    b.fit()  # warm-up (also leaves seed-0 factors for scoring)
    fits = [b.fit() for _ in range(reps)]
    fit = statistics.median(fits)
    print(f"  fit EK-FAC factors              {fit:8.2f} s = {fit / floor:5.2f} x FLOOR (target <= 4)   runs {fmt(fits)}", flush=True)
    damping = args.damping if args.damping is not None else b.default_damping()
    out = {"name": name, "sequences": len(b.indices), "tokens": b.tokens, "floor": floor, "fit": fit, "damping": damping, "scores": {}}
    counts = [1, 64]
    for nq in counts:
        b.score(nq, damping, args.rank)  # warm-up
        runs = [b.score(nq, damping, args.rank) for _ in range(reps)]
        sec = statistics.median(r[0] for r in runs)
        out[f"score_{nq}"] = sec
        out["scores"][nq] = runs[-1][1]
        target = 1.5 if nq == 1 else 2.0
        print(f"  score {nq:2d} quer{'y  ' if nq == 1 else 'ies'} (rank {args.rank})     {sec:8.2f} s = {sec / floor:5.2f} x FLOOR "
              f"(target <= {target})   runs {fmt([r[0] for r in runs])}", flush=True)
    if args.noise_check:
        b.fit(seed=1)
        _, other = b.score(64, damping, args.rank)
        b.fit(seed=0)
        out["noise"] = spearman(out["scores"][64], other)
        print(f"  inflq seed 0 vs seed 1 (64 queries): Spearman {out['noise'][0]:.3f} (median per query {out['noise'][1]:.3f})")
    kf_py = kronfluence_python(args.kf_python)
    if args.skip_kronfluence or kf_py is None:
        print("  Kronfluence: skipped" + ("" if args.skip_kronfluence else " (not importable; give --kf-python, see the docstring)"))
        return out
    folder = tmp / f"{name}-kronfluence"
    folder.mkdir()
    b.export_for_kronfluence(folder, damping, args.rank, torch.get_num_threads(), reps, counts)
    proc = subprocess.run([kf_py, str(Path(__file__).with_name("kronfluence_worker.py")), str(folder)], capture_output=True, text=True)
    if proc.returncode != 0:
        print("  Kronfluence failed:\n" + proc.stderr[-3000:])
        return out
    kf = json.loads((folder / "kf_result.json").read_text())
    out["kf"] = kf
    print(f"  Kronfluence (damping {damping:.3g} absolute, same batches, same threads):")
    print(f"    {'':18s} {'inflq':>9s} {'Kronfluence':>12s} {'inflq/KF':>9s}   (KF/its own FLOOR)")
    print(f"    {'FLOOR':18s} {floor:9.2f} {kf['floor']:12.2f} {floor / kf['floor']:9.2f}")
    rows = [("fit", "fit"), ("score 1 query", "score_1"), ("score 64 queries", "score_64")]
    for label, key in rows:
        print(f"    {label:18s} {out[key]:9.2f} {kf[key]:12.2f} {out[key] / kf[key]:9.2f}   ({kf[key] / kf['floor']:.2f} x)")
    for nq in counts:
        kfs = np.load(folder / f"kf_scores_{nq}.npy")
        flat, med = spearman(out["scores"][nq], kfs)
        out[f"spearman_{nq}"] = (flat, med)
        print(f"    Spearman inflq vs Kronfluence, {nq:2d} quer{'y  ' if nq == 1 else 'ies'}: {flat:.3f} (median per query {med:.3f}; goal >= 0.95)")
    return out


def agreement_workload(name: str, model: Path, corpus: Path, queries: list[dict], args, tmp: Path, **init) -> dict | None:
    """Spearman agreement of inflq and Kronfluence, each at ``args.agreement_seeds`` seeds, against
    the agreement of Kronfluence with itself across seeds; and the ratio of the score scales.
    ``init``: options of the project (the LoRA demo's adapter and tokenization)."""
    import torch

    torch.manual_seed(0)
    b = InflqBench(tmp / f"{name}-project", model, corpus, queries, args.batch_size, **init)
    nq = min(64, len(queries))
    seeds = list(range(args.agreement_seeds))
    lens = b.store.lengths()
    print(f"\n== {name} (agreement): {len(b.indices)} sequences, {b.tokens} tokens (mean length {lens.mean():.1f}), "
          f"{len(b.engine.tracked)} tracked modules, {nq} queries, rank {args.rank}, fisher {FISHER}, seeds {seeds}, "
          f"damping {'0.1 × mean eigenvalue per module' if args.damping is None else args.damping}", flush=True)
    ours = []
    started = time.perf_counter()
    for seed in seeds:
        b.fit(seed=seed)
        ours.append(b.score(nq, args.damping, args.rank)[1])
    print(f"  inflq: {len(seeds)} fits and scorings in {time.perf_counter() - started:.0f} s", flush=True)
    kf_py = kronfluence_python(args.kf_python)
    if kf_py is None:
        print("  Kronfluence: not importable; give --kf-python (see the docstring)")
        return None
    folder = tmp / f"{name}-kronfluence"
    folder.mkdir()
    b.export_for_kronfluence(folder, args.damping, args.rank, torch.get_num_threads(), 1, [nq], seeds=seeds)
    started = time.perf_counter()
    proc = subprocess.run([kf_py, str(Path(__file__).with_name("kronfluence_worker.py")), str(folder)], capture_output=True, text=True)
    if proc.returncode != 0:
        print("  Kronfluence failed:\n" + proc.stderr[-3000:])
        return None
    print(f"  Kronfluence: {len(seeds)} fits and scorings in {time.perf_counter() - started:.0f} s", flush=True)
    theirs = [np.load(folder / f"kf_scores_seed{s}.npy") for s in seeds]

    def mean_pairs(pairs) -> tuple[float, float]:
        got = [spearman(a, c) for a, c in pairs]
        return float(np.mean([g[0] for g in got])), float(np.mean([g[1] for g in got]))

    within = [(i, j) for i in seeds for j in seeds if i < j]
    kf_mean = np.mean(theirs, axis=0)
    rows = {
        "inflq vs Kronfluence (each seed pair)": mean_pairs([(ours[i], theirs[j]) for i in seeds for j in seeds]),
        "Kronfluence vs Kronfluence (seed pairs)": mean_pairs([(theirs[i], theirs[j]) for i, j in within]),
        "inflq vs inflq (seed pairs)": mean_pairs([(ours[i], ours[j]) for i, j in within]),
        # Both against a mean of N - 1 Kronfluence seeds, so that both means are as noisy.
        f"inflq seed vs Kronfluence's other {len(seeds) - 1} seeds' mean": mean_pairs(
            [(ours[i], np.mean([theirs[j] for j in seeds if j != i], axis=0)) for i in seeds]),
        f"Kronfluence seed vs its other {len(seeds) - 1} seeds' mean": mean_pairs(
            [(theirs[i], np.mean([theirs[j] for j in seeds if j != i], axis=0)) for i in seeds]),
    }
    rms = lambda x: float(np.sqrt(np.mean(np.square(x))))  # noqa: E731
    scale = rms(np.mean(ours, axis=0)) / rms(kf_mean)
    per_seed = [rms(ours[i]) / rms(theirs[i]) for i in seeds]
    print(f"    {'Spearman, mean over pairs':52s} {'pooled':>7s} {'per query (median)':>19s}")
    for label, (flat, med) in rows.items():
        print(f"    {label:52s} {flat:7.3f} {med:19.3f}")
    print(f"    score scale inflq / Kronfluence (RMS of the seed means) {scale:.3f}; per seed {fmt(per_seed)}")
    return {"name": name, "rows": rows, "scale": scale, "scale_per_seed": per_seed}


def lora_workload(args, tmp: Path) -> dict | None:
    """The LoRA demo (projects/demo-lora, built by its build.py): both tools track the adapter's
    lora_A and lora_B layers, with the loss on the instruction rows' responses only; queries: the
    demo's 8 and the first 24 training rows asked as queries."""
    lora = DEMO.parent / "demo-lora"
    if not args.agreement_seeds:
        raise SystemExit("--only lora measures agreement: give --agreement-seeds N")
    if not (lora / "adapter" / "adapter_model.safetensors").is_file():
        print(f"\n== lora: skipped, build the adapter first: python {lora / 'build.py'}")
        return None
    rows = [json.loads(line) for line in (lora / "train.jsonl").read_text().splitlines() if line.strip()]
    queries = [json.loads(line) for line in (lora / "queries.jsonl").read_text().splitlines() if line.strip()] + rows[:24]
    queries = [{"prompt": q["prompt"], "completion": q["completion"], "chat": False} for q in queries]
    return agreement_workload("lora", DEMO / "model", lora / "train.jsonl", queries, args, tmp, adapter=lora / "adapter", append_eos=True, max_length=64)


def fmt(xs) -> str:
    return "[" + ", ".join(f"{x:.2f}" for x in xs) + "]"


# -- memory ----------------------------------------------------------------------------------------
def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def peak_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def memory_worker(root: Path, threads: int) -> None:
    """In a fresh process: open the project, load the model and fitted factors, then score the whole
    corpus through ``run_investigation``; print RSS before and the peak RSS during scoring."""
    import torch

    torch.set_num_threads(threads)
    from inflq.project import Project
    from inflq.runs import RunSettings, run_investigation

    project = Project.open(root)
    settings = RunSettings(estimator="ekfac", fit_sequences=512, batch_size=64, rank=32)
    project.runtime.engine()  # load the model
    before = rss_kib()
    # Reset the process's high-water mark so the peak is the scoring run's own (Linux >= 4.0).
    try:
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    t = time.perf_counter()
    run_investigation(project, "default", settings)
    print(json.dumps({"before_kib": before, "peak_kib": peak_kib(), "hwm_reset": reset, "seconds": time.perf_counter() - t}))


def memory_part(sizes: list[int], threads: int, tmp: Path) -> dict:
    """Peak RSS while scoring ``sizes`` sequences (short, synthetic), one fresh process per size."""
    from inflq.project import Project

    model = random_gpt2(tmp / "mem-model", width=32, layers=2, heads=2, positions=16, vocab_words=200)
    out = {}
    print(f"\n== memory: scoring {' vs '.join(f'{n:,}' for n in sizes)} sequences of 12 tokens (random 2-layer, 32-wide GPT-2, "
          "ekfac, 2 queries, rank 32, batch size 64); peak RSS of a fresh process per size", flush=True)
    for n in sizes:
        corpus = random_corpus(tmp / f"mem-{n}.jsonl", n, 12, 200, seed=1)
        proj = Project.init(tmp / f"mem-{n}", model, corpus)
        add_query(proj, "default", "w1 w2 w3 w4", " w5 w6")
        add_query(proj, "default", "w7 w8 w9", " w10")
        proj.close()
        proc = subprocess.run([sys.executable, __file__, "--memory-worker", str(tmp / f"mem-{n}"), "--threads", str(threads)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        out[n] = r
        print(f"  {n:>8,} sequences: RSS before {r['before_kib'] / 1024:7.1f} MiB, peak while scoring {r['peak_kib'] / 1024:7.1f} MiB "
              f"(growth {(r['peak_kib'] - r['before_kib']) / 1024:6.1f} MiB), {r['seconds']:.1f} s", flush=True)
    small, large = out[sizes[0]], out[sizes[-1]]
    ratio = large["peak_kib"] / small["peak_kib"]
    print(f"  peak ratio {sizes[-1]:,} / {sizes[0]:,}: {ratio:.3f} (target <= 1.2); growth above the loaded model "
          f"{(small['peak_kib'] - small['before_kib']) / 1024:.1f} -> {(large['peak_kib'] - large['before_kib']) / 1024:.1f} MiB")
    out["ratio"] = ratio
    return out


# -- main ------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small corpora and one repeat")
    # One thread by default: on a shared machine, multi-threaded BLAS/LAPACK stalls at its barriers
    # whenever another process holds a core, which swamps what is being measured.
    ap.add_argument("--threads", type=int, default=1, help="torch threads for every measurement (both tools)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per phase (median reported)")
    ap.add_argument("--damping", type=float, default=None, help="absolute λ for both tools (default: 0.1 × mean refitted eigenvalue)")
    ap.add_argument("--random-sequences", type=int, default=None, help="corpus size of the random 256-wide model")
    ap.add_argument("--demo-sequences", type=int, default=None, help="use only the first N demo documents")
    ap.add_argument("--kf-python", default=None, help="Python with kronfluence installed")
    ap.add_argument("--skip-kronfluence", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--fisher", choices=["true", "empirical"], default="true",
                    help="both tools' Fisher: true (sampled labels) or empirical (data labels: deterministic, so the "
                         "correlation measures implementation agreement without sampling noise)")
    ap.add_argument("--full-rank-mb", type=int, default=1024,
                    help="inflq's --full-rank-memory: MiB of query gradients kept at full rank where scoring is cheaper "
                         "that way (0: rank --rank everywhere, as Kronfluence does)")
    ap.add_argument("--noise-check", action="store_true", help="also correlate inflq with itself at another seed")
    ap.add_argument("--agreement-seeds", type=int, default=0,
                    help="instead of timings: fit both tools at this many seeds and report their Spearman agreement "
                         "against Kronfluence's with itself, and the score scale ratio (see the docstring)")
    ap.add_argument("--only", choices=["demo", "random", "memory", "lora"], default=None,
                    help="one workload; lora (with --agreement-seeds only): the LoRA demo's adapter modules and loss mask")
    ap.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    global FISHER, FULL_RANK_MB
    FISHER = args.fisher
    FULL_RANK_MB = args.full_rank_mb

    import torch

    torch.set_num_threads(args.threads)
    if args.memory_worker:
        memory_worker(Path(args.memory_worker), args.threads)
        return
    from inflq.modeling import quiet_transformers

    quiet_transformers()
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    n_random = args.random_sequences or (64 if args.quick else 256)
    n_demo = args.demo_sequences or (400 if args.quick else None)
    print(f"inflq engine benchmark: torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs, "
          f"median of {args.repeats} after a warm-up; command: python benchmarks/bench_engine.py {' '.join(sys.argv[1:])}")
    tmp = Path(tempfile.mkdtemp(prefix="inflq-bench-"))
    workload = agreement_workload if args.agreement_seeds else bench_workload
    if args.agreement_seeds:
        args.skip_memory = True
    results = []
    try:
        if args.only in (None, "demo"):
            if demo_model_ready():
                docs = [json.loads(line) for line in (DEMO / "corpus.jsonl").read_text().splitlines() if line.strip()]
                if n_demo:
                    docs = docs[:n_demo]
                corpus = tmp / "demo-corpus.jsonl"
                corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
                queries = [json.loads(line) for line in (DEMO / "queries.jsonl").read_text().splitlines() if line.strip()]
                queries = [{"prompt": q["prompt"], "completion": q["completion"], "chat": False} for q in queries]
                queries += [split_query(d["text"]) for d in docs[:: max(1, len(docs) // 64)]]
                results.append(workload("demo", DEMO / "model", corpus, queries[:64], args, tmp))
            else:
                print(f"\n== demo: skipped, {DEMO / 'model'} is not there yet (train it with projects/demo/train_model.py)")
        if args.only in (None, "random"):
            model = random_gpt2(tmp / "gpt2-256", width=256, layers=4, heads=4, positions=128, vocab_words=1000)
            corpus = random_corpus(tmp / "random.jsonl", n_random + 64, 128, 1000)
            # The last 64 documents become queries; the corpus is the rest.
            lines = corpus.read_text().splitlines()
            (tmp / "random-corpus.jsonl").write_text("\n".join(lines[:n_random]) + "\n")
            queries = [split_query(json.loads(x)["text"]) for x in lines[n_random:]]
            results.append(workload("gpt2-4x256", model, tmp / "random-corpus.jsonl", queries, args, tmp))
        if args.only == "lora":
            results.append(lora_workload(args, tmp))
        if not args.skip_memory and args.only in (None, "memory"):
            memory_part([2_000, 20_000] if args.quick else [10_000, 100_000], args.threads, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
