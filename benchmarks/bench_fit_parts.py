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
the eigendecompositions once, so ``fit / FLOOR`` follows from these parts: the last column is the
N from which it is at most 3. The two passes, each a capture and its sums, are also shown on their
own (issue 27's goal: each at most 2 x FLOOR). ``--eigh-max N`` skips the decompositions of larger
matrices (at 4,096 wide the MLP's are 16,384²) and extrapolates their time at n³ from the largest
measured. Medians of ``--repeats``. The captures run as a fit runs them (``capture_parts`` with the
engine's reused buffers, one batch consumed before the next), and FLOOR in the same process, under
the same allocator policy (inflq's, chosen when the engine is built).

Timings depend on machine load (the memory-bound parts most). ``--clock cpu`` times each part by the
CPU time of the process instead of the wall clock: with one thread, a figure that other processes
on the machine change much less (they still share caches and memory bandwidth); with more threads
it counts every thread's time, so use the wall clock there. ``--width-shape`` picks the sequences:
``--tokens 24 --batch-size 170 --vocab 593`` is a short-sequence batch of the CPU's 4,096-token
budget with the demo's vocabulary.

    OMP_NUM_THREADS=1 python benchmarks/bench_fit_parts.py --widths 768 1024
    OMP_NUM_THREADS=1 python benchmarks/bench_fit_parts.py --widths 128 --layers 2 --tokens 24 --batch-size 170 --vocab 593 --clock cpu
    OMP_NUM_THREADS=1 python benchmarks/bench_fit_parts.py --widths 4096 --layers 1 --repeats 1 --eigh-max 4097
"""

from __future__ import annotations

import argparse
import statistics
import time

CLOCK = time.perf_counter
SYNC = lambda: None  # noqa: E731 - waits for a CUDA device's queued kernels (set in main)


def timed(fn, repeats: int) -> float:
    out = []
    for _ in range(repeats):
        SYNC()
        t = CLOCK()
        fn()
        SYNC()
        out.append(CLOCK() - t)
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
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="wall clock, or the process's CPU time (see above)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda: where the model, captures, sums and eigendecompositions run")
    ap.add_argument("--eigh-max", type=int, default=None,
                    help="skip eigendecompositions of matrices larger than this (their time extrapolated at n³ from the largest measured)")
    args = ap.parse_args()

    import os

    import inflq  # noqa: F401 - before torch, as in `inflq run`: torch's workers sleep between operations (inflq/threads.py)

    # isort: split
    import torch

    global CLOCK, SYNC
    if args.clock == "cpu":
        CLOCK = time.process_time
    if args.device.startswith("cuda"):
        SYNC = lambda: torch.cuda.synchronize(args.device)  # noqa: E731
    torch.set_num_threads(args.threads)
    print(f"== EK-FAC fit parts per batch of {args.batch_size} x {args.tokens} tokens, GPT-2 {args.layers} layers, "
          f"vocabulary {args.vocab:,}, {args.threads} thread(s), median of {args.repeats}, {args.clock} clock, device {args.device}; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    print("| width | FLOOR | capture | covariance sums | correction sums | pass 1 (capture + covariance) | pass 2 (capture + correction) "
          "| per batch (2 captures + sums) | eigh, all modules (once per fit) | largest eigh measured | fit <= 3 x FLOOR from (sequences) "
          "| allocator | peak device memory |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for width in args.widths:
        print(width_row(args, width), flush=True)


def width_row(args, width: int) -> str:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from inflq import GradientEngine, make_batch
    from inflq.engine import select_modules
    from inflq.linalg import eigh, unpack_upper
    from inflq_builtins.estimators import CovariancePass, EigenCorrectionPass

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=args.vocab, n_positions=args.tokens, n_embd=width, n_layer=args.layers, n_head=width // 64,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval().to(args.device)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(args.device)
    tracked = select_modules(model, "all")
    engine = GradientEngine(model, tracked)
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, args.vocab, (args.tokens,), generator=gen).numpy() for _ in range(args.batch_size)]
    batch = make_batch(seqs, 0, args.device, sample_seeds=list(range(args.batch_size)))

    def floor():
        model.zero_grad(set_to_none=True)
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.input_ids, use_cache=False)
        out.loss.backward()

    def capture():  # as a fit's passes do: a group at a time, into the engine's buffers
        for _ in engine.capture_parts(batch, "sampled", reuse=True):
            pass

    floor()  # a warm-up, as the others get below
    floor_s = timed(floor, args.repeats)
    model.zero_grad(set_to_none=True)
    capture()
    capture_s = timed(capture, args.repeats)
    captures, _ = engine.capture(batch, "sampled")
    cov = CovariancePass()
    sums: dict[str, torch.Tensor] = {}
    cov.accumulate(engine, batch, captures, sums)
    cov_s = timed(lambda: cov.accumulate(engine, batch, captures, sums), args.repeats)
    qa, qs, eig_s, largest, guessed = {}, {}, 0.0, (0, 0.0), 0
    measured: list[tuple[int, float]] = []
    for tm in tracked:
        for key, store in (("A", qa), ("S", qs)):
            n = tm.in_dim if key == "A" else tm.out_features
            if args.eigh_max and n > args.eigh_max:
                # Not decomposed here (a 16,384² float64 eigh takes most of an hour on one thread):
                # identity eigenvectors cost the correction the same as any dense ones.
                store[tm.name] = torch.eye(n)
                guessed += 1
                continue
            m = unpack_upper(sums[f"{key}/{tm.name}"]) / float(sums["tokens"])
            t = time.perf_counter()
            _, q = eigh(m, args.device)  # on a CUDA device there (float64), as a fit on it does
            dt = time.perf_counter() - t
            eig_s += dt
            measured.append((n, dt))
            largest = max(largest, (n, dt))
            store[tm.name] = q.to(torch.float32)
    sums.clear()  # the float64 sums: 3 GB at 4,096 wide
    if guessed:  # the skipped ones, from the largest measured, at n³
        big_n, big_s = largest
        eig_s += sum(big_s * ((tm.in_dim if k == "A" else tm.out_features) / big_n) ** 3
                     for tm in tracked for k in ("A", "S") if (tm.in_dim if k == "A" else tm.out_features) > args.eigh_max)
    corr = EigenCorrectionPass(qa, qs)
    corr_sums: dict[str, torch.Tensor] = {}
    corr.accumulate(engine, batch, captures, corr_sums)
    corr_s = timed(lambda: corr.accumulate(engine, batch, captures, corr_sums), args.repeats)
    per_batch = (2 * capture_s + cov_s + corr_s) / floor_s
    eig_floor = eig_s / floor_s
    # A fit of N sequences: N / batch batches at per_batch FLOORs each, plus the eigendecompositions once.
    from_n = f"{args.batch_size * eig_floor / (3 - per_batch):,.0f}" if per_batch < 3 else "never"
    note = f" ({guessed} of them extrapolated at n³)" if guessed else ""
    from inflq import engine as engine_module

    peak = f"{torch.cuda.max_memory_allocated(args.device) / 1e9:.2f} GB" if args.device.startswith("cuda") else "-"

    return (f"| {width} | {floor_s:.3f} s | {capture_s / floor_s:.2f} | {cov_s / floor_s:.2f} | {corr_s / floor_s:.2f} | "
            f"**{(capture_s + cov_s) / floor_s:.2f}** | **{(capture_s + corr_s) / floor_s:.2f}** | {per_batch:.2f} | "
            f"{eig_s:.1f} s = {eig_floor:.1f} FLOOR{note} | {largest[0]}²: {largest[1]:.1f} s | {from_n} | "
            f"{engine_module._allocator_policy} | {peak} |")


if __name__ == "__main__":
    main()
