"""How much of exact EK-FAC's ranking can any index of a given size keep? (issue 16)

The gradient index stores ``k`` numbers per module and sequence. This measures, against exact
EK-FAC (inflq's estimator, full rank, the paper's damping), what the best choice of ``k``
*coordinates in EK-FAC's own eigenbasis* keeps: each training sequence's gradient rotated into
the eigenbasis, ``Q_Sᵀ DW Q_A``, keeping only the ``k`` coordinates with the largest corrected
eigenvalues ``Λ`` (per module, or the top ``k × modules`` over all modules by ``Λ / λ``), scored
against the full preconditioned queries. Every kept coordinate is then exact (no projection noise,
the same damping), so this is a ceiling for the index's Kronecker projections at that size, which
mix directions instead of choosing them.

It also prints, per module of the first layer, how many eigen-coordinates hold 50 / 80 / 90 % of
the expected score variance ``Σ (Λ / (Λ + λ))²`` (a query and a training sequence drawn like the
fitting data): the preconditioner's effective dimension, which decides how much any fixed-size
linear sketch can keep.

    python benchmarks/bench_index_ceiling.py            # random 4x256 GPT-2, 500 x 128 tokens (bench_index's workload)
    python benchmarks/bench_index_ceiling.py --demo     # the demo project's trained model, corpus and queries
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workloads import demo_workload, random_gpt2_model  # noqa: E402


def random_workload(n: int, length: int, queries: int):
    from inflq import GradientEngine, select_modules

    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, 1000, size=length).astype(np.int64) for _ in range(n)]
    q_toks = [rng.integers(1, 1000, size=64).astype(np.int64) for _ in range(queries)]
    model = random_gpt2_model(256, 4, 1000, length)
    return GradientEngine(model, select_modules(model, "all")), seqs, q_toks, [48] * queries, 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--demo", action="store_true", help="the demo project instead of the random workload")
    ap.add_argument("--sequences", type=int, default=500)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--keep", default="127,508,2032", help="coordinates kept per module (127: the default 4 KB index's budget)")
    args = ap.parse_args()

    from inflq import make_batch
    from inflq.index import local_fit_context
    from inflq_builtins.estimators import EKFAC

    engine, seqs, q_toks, q_starts, pad = demo_workload() if args.demo else random_workload(args.sequences, args.length, args.queries)
    n, nq = len(seqs), len(q_toks)
    names = [t.name for t in engine.tracked]
    print(f"== {'demo' if args.demo else 'random 4x256 GPT-2'}: {n} sequences, {nq} queries, {len(names)} modules, torch threads {torch.get_num_threads()}")
    est = EKFAC()
    est.fit(local_fit_context(engine, lambda idx: [seqs[int(i)] for i in idx], np.arange(n), pad, seed=0, batch_size=8, shard_size=256))
    lam = {m: est.factors[f"lambda/{m}"].to(torch.float64) for m in names}
    ratio = {m: lam[m] / est.dampings[m] for m in names}
    keeps = [int(k) for k in args.keep.split(",")]
    masks = {}
    for k in keeps:
        masks[("per module", k)] = {}
        for m in names:
            flat = lam[m].flatten()
            keep = torch.zeros(flat.numel(), dtype=torch.bool)
            keep[torch.topk(flat, min(k, flat.numel())).indices] = True
            masks[("per module", k)][m] = keep.view_as(lam[m]).float()
        threshold = torch.topk(torch.cat([ratio[m].flatten() for m in names]), k * len(names)).values[-1]
        masks[("over all modules", k)] = {m: (ratio[m] >= threshold).float() for m in names}
    queries = est._rotated(engine.sequence_gradients(make_batch(q_toks, pad, loss_from=q_starts), "data"))  # (Q_Sᵀ V Q_A) ⊘ (Λ + λ)
    exact = np.zeros((nq, n))
    kept = {key: np.zeros((nq, n)) for key in masks}
    for s in range(0, n, 8):
        grads = engine.sequence_gradients(make_batch(seqs[s : s + 8], pad), "data")
        for m in names:
            rot = est.factors[f"qs/{m}"].T @ grads[m].to(torch.float32) @ est.factors[f"qa/{m}"]
            exact[:, s : s + 8] += torch.einsum("qoi,boi->qb", queries[m], rot).double().numpy()
            for key, mk in masks.items():
                kept[key][:, s : s + 8] += torch.einsum("qoi,boi->qb", queries[m] * mk[m], rot).double().numpy()
    top = np.argsort(-exact, 1)[:, :10]
    for (how, k), got in kept.items():
        rho = [spearmanr(a, b).statistic for a, b in zip(got, exact, strict=True)]
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top, np.argsort(-got, 1)[:, :10], strict=True)])
        print(f"  top {k:>5} eigen-coordinates per module ({how}): Spearman median {np.median(rho):.3f} (min {np.min(rho):.3f}), top-10 recall {recall:.2f}")
    print("  effective dimension (eigen-coordinates holding 50 / 80 / 90 % of the expected score variance):")
    for m in names[:4]:
        r = ratio[m].flatten().sort(descending=True).values
        share = (r / (1 + r)).square()
        cum = share.cumsum(0) / share.sum()
        print(f"    {m} ({lam[m].numel():,} coordinates): " + " / ".join(f"{int((cum < f).sum()) + 1:,}" for f in (0.5, 0.8, 0.9)))


if __name__ == "__main__":
    main()
