"""The parts of an EK-FAC fit at real widths, per batch, as ratios to FLOOR (issue 17).

For a random-weight GPT-2 (``--layers`` x each ``--widths``, vocabulary 50,257) and one batch of
``--batch-size`` random sequences of ``--tokens`` tokens, in one process at ``--threads`` threads:

* FLOOR: a plain forward + backward pass with parameter gradients (``loss.backward()``);
* capture: inflq's forward + backward with sampled labels, capturing every tracked module;
* covariance sums: adding the batch's Gram matrices into the running float64 sums;
* eigenvalue correction: the rotated per-sequence gradients squared, added into the sums;
* eigendecomposition: float64 ``eigh`` of every A and S once per fit (not per batch), reported in
  seconds and as FLOORs.

A fit of N sequences costs about (N / batch) x (capture + covariance + capture + correction) plus
the eigendecompositions once, so ``fit / FLOOR`` follows from these parts. Medians of
``--repeats``. Timings depend on machine load (the memory-bound parts most).

    OMP_NUM_THREADS=1 python benchmarks/bench_fit_parts.py --widths 768 1024
"""

from __future__ import annotations

import argparse
import statistics
import time


def timed(fn, repeats: int) -> float:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--widths", type=int, nargs="+", default=[768, 1024])
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    print(f"== EK-FAC fit parts per batch of {args.batch_size} x {args.tokens} tokens, GPT-2 {args.layers} layers, "
          f"vocabulary {args.vocab:,}, {args.threads} thread(s), median of {args.repeats}")
    print("| width | FLOOR | capture | covariance sums | correction sums | eigh, all modules (once per fit) | largest eigh |")
    print("|---|---|---|---|---|---|---|")
    for width in args.widths:
        print(width_row(args, width), flush=True)


def width_row(args, width: int) -> str:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from inflq import GradientEngine, eigh, make_batch, select_modules, unpack_upper
    from inflq_builtins.estimators import CovariancePass, EigenCorrectionPass

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=args.vocab, n_positions=args.tokens, n_embd=width, n_layer=args.layers, n_head=width // 64,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg).eval()
    tracked = select_modules(model, "all")
    engine = GradientEngine(model, tracked)
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, args.vocab, (args.tokens,), generator=gen).numpy() for _ in range(args.batch_size)]
    batch = make_batch(seqs, 0, "cpu", sample_seeds=list(range(args.batch_size)))

    def floor():
        model.zero_grad(set_to_none=True)
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.input_ids, use_cache=False)
        out.loss.backward()

    floor_s = timed(floor, args.repeats)
    model.zero_grad(set_to_none=True)
    capture_s = timed(lambda: engine.capture(batch, "sampled"), args.repeats)
    captures, _ = engine.capture(batch, "sampled")
    cov = CovariancePass()
    sums: dict[str, torch.Tensor] = {}
    cov.accumulate(engine, batch, captures, sums)
    cov_s = timed(lambda: cov.accumulate(engine, batch, captures, sums), args.repeats)
    qa, qs, eig_s, largest = {}, {}, 0.0, (0, 0.0)
    for tm in tracked:
        for key, store in (("A", qa), ("S", qs)):
            m = unpack_upper(sums[f"{key}/{tm.name}"]) / float(sums["tokens"])
            t = time.perf_counter()
            _, q = eigh(m, "cpu")
            dt = time.perf_counter() - t
            eig_s += dt
            largest = max(largest, (m.shape[0], dt))
            store[tm.name] = q.to(torch.float32)
    corr = EigenCorrectionPass(qa, qs)
    corr_sums: dict[str, torch.Tensor] = {}
    corr_s = timed(lambda: corr.accumulate(engine, batch, captures, corr_sums), args.repeats)
    return (f"| {width} | {floor_s:.2f} s | {capture_s / floor_s:.2f} | {cov_s / floor_s:.2f} | {corr_s / floor_s:.2f} | "
            f"{eig_s:.1f} s = {eig_s / floor_s:.1f} FLOOR | {largest[0]}²: {largest[1]:.1f} s |")

if __name__ == "__main__":
    main()
