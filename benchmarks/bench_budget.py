"""The gradient index's budget curve, by ground truth (issue 24, part 1).

    python benchmarks/bench_budget.py PROJECT -i INVESTIGATION [--budgets 4096,16384,65536,262144] \
        [--lds --subsets 32] [--fit-sequences N] [--json curve.json]
    python benchmarks/bench_budget.py --make-random DIR [--sequences 20000 --length 64 --width 256 --layers 4 --queries 32]

For each budget (bytes per sequence) it builds the project's gradient index through the plugin's
own build (``inflq index build PROJECT --budget B``; an index already built is reused by its key),
and reports against exact EK-FAC (inflq's estimator with full-rank queries, over every sequence,
from a whole run: ``inflq run PROJECT -i INV --estimator ekfac --rank full``, reused when the
investigation already has one with the same settings):

* the median (and mean) over queries of the Spearman correlation with exact EK-FAC;
* the recall of the exact top 10 within the index's top N, for N = 1, 2, 5, 10 and 20 % of the
  corpus (median and mean over queries): what ``inflq ask --depth N`` can find;
* the storage per sequence, the index's size, its build time, and the time of one query's scores
  from it;
* with ``--lds``: ``inflq validate --lds`` (:func:`inflq.lds.validate_lds`, saved in the catalog like
  the command's) for ``identity``, ``ekfac`` and each index (``index:key=...``), all on the same
  retrained subsets; each LDS with its 95 % interval over queries and the paired difference with
  exact EK-FAC's (per query, then its mean and 95 % interval).

``--lifted`` (for corpora too large to build four indexes on this machine) builds none: it fits
each index's projections and projected EK-FAC (the build's own fit, cached as the ``index-fit``
factor set that ``inflq index build --budget B`` then reuses) and scores every sequence in one
pass, exact EK-FAC's full-rank queries and every index's queries lifted back to the full space
(``P_Sᵀ (G' + λI)⁻¹ q' P_A``, the index estimator's own ``precondition``) side by side: the index's
scores without the rows' float16 rounding (``--estimator index`` equals them to that rounding,
tests/test_index_plugin.py). The pass is committed in shards under ``--cache`` and resumes.

``--make-random DIR`` first creates a project of a random GPT-2 (word-level tokenizer of
``--vocab`` words) over ``--sequences`` documents of ``--length`` random words, and an investigation
``random`` of ``--queries`` queries (``--length`` words, the last 16 measured), as bench_index.py's
random workload; then measures it (``--fit-sequences`` 4,096 by default there, for the exact
EK-FAC and the indexes alike).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

DEPTHS = (0.01, 0.02, 0.05, 0.10, 0.20)
BUDGETS = "4096,16384,65536,262144"


def make_random_project(root: Path, sequences: int, length: int, width: int, layers: int, vocab: int, queries: int, seed: int = 0) -> Path:
    """A project folder: a random ``layers x width`` GPT-2 with a word-level tokenizer, a corpus of
    ``sequences`` documents of ``length`` random words, an investigation ``random`` of ``queries``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    import inflq
    from inflq.queries import add_queries

    root = Path(root)
    if (root / "project" / "inflq.toml").exists():
        return root / "project"
    words = [f"w{i}" for i in range(vocab)]
    model_dir = root / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.WordLevel(vocab={"<|endoftext|>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(words)}}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<unk>",
                                   model_input_names=["input_ids", "attention_mask"])
    fast.save_pretrained(str(model_dir))
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab + 2, n_positions=length, n_embd=width, n_layer=layers, n_head=max(1, width // 64),
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(cfg).save_pretrained(str(model_dir), safe_serialization=True)
    rng = np.random.default_rng(seed)
    corpus = root / "corpus.jsonl"
    with open(corpus, "w") as f:
        for i in range(sequences):
            f.write(json.dumps({"id": f"r{i:06d}", "text": " ".join(rng.choice(words, size=length))}) + "\n")
    project = inflq.init_project(root / "project", model_dir, corpus, max_length=length)
    from inflq import catalog

    catalog.create_investigation(project.db, "random", "random queries over random text (benchmarks/bench_budget.py)")
    measured = min(16, length - 1)
    qs = []
    for _ in range(queries):
        w = rng.choice(words, size=length)
        qs.append({"prompt": " ".join(w[: length - measured]), "completion": " " + " ".join(w[length - measured :])})
    add_queries(project, "random", qs)
    project.close()
    return root / "project"


def exact_run(project, investigation: str, fit_sequences: int | None, monitor) -> tuple[np.ndarray, int, float]:
    """Exact EK-FAC over every sequence at full rank: the investigation's latest such result set,
    else a new run. ``(scores [queries, sequences], result set id, seconds of the run or 0)``."""
    from inflq import catalog
    from inflq.reading import score_matrix
    from inflq.runs import RunSettings, run_investigation

    inv = catalog.investigation(project.db, investigation)
    for rs in reversed(catalog.result_sets_scored_with(project.db, inv["id"], "ekfac", "all")):
        s = json.loads(rs["settings"])
        if s.get("rank") is None and s.get("fit_sequences") == fit_sequences and len(s["query_ids"]) == len(catalog.queries(project.db, investigation)):
            return score_matrix(project, investigation, rs["id"]), rs["id"], 0.0
    t = time.perf_counter()
    r = run_investigation(project, investigation, RunSettings(estimator="ekfac", rank=None, fit_sequences=fit_sequences, seed=project.config.seed), monitor)
    return score_matrix(project, investigation, r.result_set_id), r.result_set_id, time.perf_counter() - t


def build_index(project, budget: int, fit_sequences: int | None, monitor) -> tuple[dict, object, float]:
    """The plugin's own build at ``budget`` bytes per sequence (resumed or reused by its key)."""
    from inflq import index
    from inflq.settings import RunSettings
    from inflq_builtins import gradient_index

    t = time.perf_counter()
    row, store = gradient_index.build(project, index.IndexSettings(budget_bytes=budget), RunSettings(fit_sequences=fit_sequences, seed=project.config.seed), monitor)
    return row, store, time.perf_counter() - t


def index_scores(project, key: str, queries: list[dict], monitor) -> tuple[np.ndarray, float]:
    """``--estimator index:key=KEY``'s scores of every sequence, and one query's time."""
    from inflq.runs import scoring_context
    from inflq.runs.recipe import prepare_estimator
    from inflq.settings import RunSettings

    settings = RunSettings(estimator=f"index:key={key}")
    prepared = prepare_estimator(project, settings, monitor)
    n = len(project.runtime.corpus)
    every = np.arange(n, dtype=np.int64)

    def score(qs):
        return prepared.estimator.score_candidates(scoring_context(project, prepared.estimator, prepared.engine, qs, every, settings, monitor))

    out = np.asarray(score(queries), dtype=np.float64)
    t = time.perf_counter()
    score(queries[:1] if len(queries) < 2 else queries[1:2])
    return out, time.perf_counter() - t


def lifted_scores(project, budgets: list[int], fit_sequences: int | None, queries: list[dict], cache: Path, monitor, shard: int = 2048) -> tuple[np.ndarray, dict]:
    """``--lifted``: ``(exact [nq, n], {budget: index scores [nq, n]})`` from one scoring pass."""
    import torch

    from inflq import QueryGradients, Shard, index
    from inflq.passes import ScorePass
    from inflq.runs import LocalWorker, query_gradients
    from inflq.runs.recipe import prepare_estimator
    from inflq.settings import RunSettings
    from inflq_builtins.gradient_index import IndexEstimator, IndexFit

    seed = project.config.seed
    engine = project.runtime.engine(None)
    settings = RunSettings(estimator="ekfac", fit_sequences=fit_sequences, seed=seed)
    exact = prepare_estimator(project, settings, monitor, engine=engine).estimator
    settings.resolve_batching(engine, project)
    grads = query_gradients(project, engine, queries, settings.batch_size)
    parts = [exact.precondition(grads)]
    for b in budgets:
        t = time.perf_counter()
        fit = IndexFit(index.IndexSettings(budget_bytes=b))
        prepare_estimator(project, RunSettings(fit_sequences=fit_sequences, seed=seed), monitor, estimator=fit, engine=engine)
        lifted = IndexEstimator()
        lifted.model = fit.model
        parts.append(lifted.precondition(grads))
        print(f"  index fit at {b // 1024} KB: width {fit.model.width:,} ({time.perf_counter() - t:.0f} s, cached as a factor set)", flush=True)
    qg = QueryGradients(full={n: torch.cat([p[n].to(torch.float32) for p in parts]).contiguous() for n in parts[0]}, rank=None)
    del parts, grads
    n, nq = len(project.runtime.corpus), len(queries)
    cache.mkdir(parents=True, exist_ok=True)
    out = np.empty((n, nq * (1 + len(budgets))), dtype=np.float32)
    worker = LocalWorker(project, engine)
    tag = f"{project.model_fingerprint[:12]}-{fit_sequences}-{nq}-{'-'.join(map(str, budgets))}"
    monitor.start("scoring (exact and lifted)", n)
    t = time.perf_counter()
    for s in range(0, n, shard):
        f = cache / f"lifted-{tag}-{s:07d}.npy"
        if f.exists():
            out[s : s + shard] = np.load(f)
            monitor.advance(min(shard, n - s))
            continue
        got = worker.run(ScorePass(qg), Shard(0, np.arange(s, min(n, s + shard), dtype=np.int64)), settings.batching(), monitor)["scores"].numpy()
        np.save(f, got)
        out[s : s + shard] = got
    print(f"  one scoring pass, {qg.names and len(qg.names)} modules x {nq * (1 + len(budgets))} queries: {time.perf_counter() - t:.0f} s", flush=True)
    out = out.T.astype(np.float64)
    return out[:nq], {b: out[nq * (i + 1) : nq * (i + 2)] for i, b in enumerate(budgets)}


def recall_at(index_row: np.ndarray, exact_row: np.ndarray, depth: int, k: int = 10) -> float:
    """The share of the exact top ``k`` within the index's top ``depth``."""
    top = np.argsort(-exact_row, kind="stable")[:k]
    picked = np.argpartition(-index_row, min(depth, len(index_row) - 1))[:depth] if depth < len(index_row) else np.arange(len(index_row))
    return len(set(top.tolist()) & set(picked.tolist())) / k


def curve_row(index_m: np.ndarray, exact_m: np.ndarray) -> dict:
    from scipy.stats import spearmanr

    n = exact_m.shape[1]
    rho = np.array([spearmanr(a, b).statistic for a, b in zip(index_m, exact_m, strict=True)])
    out = {"spearman_median": float(np.median(rho)), "spearman_mean": float(np.mean(rho)), "spearman": rho.tolist(), "recall": {}}
    for d in DEPTHS:
        depth = max(10, math.ceil(d * n))
        r = np.array([recall_at(a, b, depth) for a, b in zip(index_m, exact_m, strict=True)])
        out["recall"][f"{d:g}"] = {"depth": depth, "median": float(np.median(r)), "mean": float(np.mean(r)), "min": float(r.min())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("project", nargs="?")
    ap.add_argument("-i", "--investigation", default=None)
    ap.add_argument("--budgets", default=BUDGETS, help="bytes per sequence, comma-separated")
    ap.add_argument("--fit-sequences", type=int, default=None, help="fit EK-FAC and the indexes on this many sequences (default: all; 4,096 with --make-random)")
    ap.add_argument("--lds", action="store_true", help="also inflq validate --lds for identity, ekfac and every index, on the same subsets")
    ap.add_argument("--subsets", type=int, default=32)
    ap.add_argument("--json", default=None, help="write every figure here")
    ap.add_argument("--lifted", action="store_true", help="fit the indexes but build none: score them in one pass (see above)")
    ap.add_argument("--cache", default=None, help="--lifted: where the pass's shards are kept (default: beside the project)")
    ap.add_argument("--make-random", default=None, metavar="DIR", help="create a random project in DIR first (see above)")
    ap.add_argument("--sequences", type=int, default=20000)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=32)
    args = ap.parse_args()

    import inflq
    from inflq import catalog

    if args.make_random:
        root = make_random_project(Path(args.make_random), args.sequences, args.length, args.width, args.layers, args.vocab, args.queries)
        args.project, args.investigation = str(root), args.investigation or "random"
        args.fit_sequences = args.fit_sequences or 4096
    if not args.project:
        ap.error("give PROJECT or --make-random DIR")
    investigation = args.investigation or "default"
    project = inflq.open_project(args.project)
    queries = catalog.queries(project.db, investigation)
    n = len(project.runtime.corpus)
    budgets = [int(b) for b in args.budgets.split(",")]
    print(f"== budget curve: {args.project} ({n:,} sequences, {len(queries)} queries of {investigation!r}), budgets {budgets}, "
          f"fit on {args.fit_sequences or 'all'} sequences; load average {os.getloadavg()}", flush=True)
    out: dict = {"project": str(args.project), "sequences": n, "queries": len(queries), "fit_sequences": args.fit_sequences, "budgets": {}}
    from inflq.cli.common import progress_monitor

    with progress_monitor() as monitor:
        if args.lifted:
            t = time.perf_counter()
            cache = Path(args.cache) if args.cache else Path(args.project).resolve().parent / "budget-cache"
            exact, lifted = lifted_scores(project, budgets, args.fit_sequences, queries, cache, monitor)
            np.save(cache / "exact.npy", exact)
            out["lifted_seconds"] = time.perf_counter() - t
            for b in budgets:
                c = curve_row(lifted[b], exact)
                out["budgets"][b] = c
                rec = "  ".join(f"{float(d) * 100:g}%({v['depth']}): {v['median']:.2f}/{v['mean']:.2f}" for d, v in c["recall"].items())
                print(f"{b // 1024:>4} KB  Spearman median {c['spearman_median']:.3f} (mean {c['spearman_mean']:.3f}); "
                      f"recall of the exact top 10, median/mean: {rec}", flush=True)
            print(f"load average {os.getloadavg()}", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(out, indent=1, default=float))
                print(f"wrote {args.json}")
            return
        exact, rs_id, exact_s = exact_run(project, investigation, args.fit_sequences, monitor)
        print(f"exact EK-FAC (full rank): result set {rs_id}" + (f", run in {exact_s:.0f} s" if exact_s else " (reused)")
              + f"; load average {os.getloadavg()[0]:.1f}", flush=True)
        out["exact_result_set"], out["exact_seconds"] = rs_id, exact_s
        keys = {}
        for b in budgets:
            row, store, build_s = build_index(project, b, args.fit_sequences, monitor)
            s = store.summary()
            keys[b] = row["key"]
            got, q_s = index_scores(project, row["key"], queries, monitor)
            c = curve_row(got, exact)
            c.update(key=row["key"], width=s["width"], bytes_per_sequence=s["bytes_per_sequence"], size_bytes=s["size_bytes"],
                     build_seconds=build_s, recorded_build_seconds=row.get("seconds"), query_seconds=q_s)
            out["budgets"][b] = c
            rec = "  ".join(f"{float(d) * 100:g}%({v['depth']}): {v['median']:.2f}/{v['mean']:.2f}" for d, v in c["recall"].items())
            print(f"{b // 1024:>4} KB  index {row['key'][:12]} width {s['width']:,}, {s['bytes_per_sequence']:,} B/seq, "
                  f"{s['size_bytes'] / 2**20:,.1f} MiB, built in {build_s:.0f} s (recorded {row.get('seconds') or 0:.0f} s), one query {q_s:.3f} s; "
                  f"Spearman median {c['spearman_median']:.3f} (mean {c['spearman_mean']:.3f}); recall of the exact top 10, median/mean: {rec}; "
                  f"load average {os.getloadavg()[0]:.1f}", flush=True)
        if args.lds:
            from inflq.lds import mean_and_ci, validate_lds

            specs = ["identity", "ekfac"] + [f"index:key={keys[b]}" for b in budgets]
            t = time.perf_counter()
            v = validate_lds(project, investigation, specs, subsets=args.subsets, seed=project.config.seed, monitor=monitor)
            print(f"LDS validation {v.id}: {len(queries)} queries x {args.subsets} subsets of {v.settings['subset_size']} "
                  f"({v.settings['retrained_now']} retrained now, {time.perf_counter() - t:.0f} s); load average {os.getloadavg()[0]:.1f}", flush=True)
            by = {r.estimator: r for r in v.rows}
            ek = np.asarray(by["ekfac"].per_query)
            out["lds"] = {"validation": v.id, "subsets": args.subsets, "rows": {}}
            for spec in specs:
                r = by[spec]
                diff, diff_ci = mean_and_ci(np.asarray(r.per_query) - ek)
                name = next((f"index {b // 1024} KB" for b in budgets if spec == f"index:key={keys[b]}"), spec)
                ratio = r.lds / by["ekfac"].lds if by["ekfac"].lds else float("nan")
                out["lds"]["rows"][name] = {"spec": spec, "lds": r.lds, "ci": r.ci, "pearson": r.pearson, "per_query": r.per_query,
                                            "paired_difference": diff, "paired_ci": diff_ci, "ratio_to_ekfac": ratio}
                print(f"  {name:<14} LDS {r.lds:.3f} ± {r.ci:.3f}   minus exact EK-FAC {diff:+.3f} ± {diff_ci:.3f}   ({ratio:.2f}x EK-FAC)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=float))
        print(f"wrote {args.json}")
    project.close()


if __name__ == "__main__":
    sys.exit(main())
