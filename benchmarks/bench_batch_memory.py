"""Where one batch's bytes go on a GPT-2 of real width (issue 17): resident memory around each step.

    OMP_NUM_THREADS=1 python benchmarks/bench_batch_memory.py --layers 12

A random-weight GPT-2 (``--layers`` x 768, vocabulary 50,257) captures two batches of 8 x 256
random tokens with sampled labels, each added into EK-FAC's running covariance sums
(``CovariancePass.accumulate``). Before each step the process's high-water mark is reset
(``/proc/self/clear_refs``), so each line's ``HWM`` is that step's own peak resident memory (the
whole process's, model and sums included); ``RSS after`` is what the step leaves behind, and
page faults and CPU seconds are cumulative. The second capture runs with the first batch's sums
held, as every batch of a fit does. Linux only (``/proc``). ``--whole-passes`` captures the batch
in one forward and backward pass (``pass_tokens=0``), ``--default-malloc`` keeps glibc's own
mmap threshold; to measure another version of inflq put its tree first on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch


def status() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, value = line.split(":", 1)
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024 / 1e9
    return out


def step(name: str, fn):
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current resident memory
    started = time.perf_counter()
    result = fn()
    s, ru = status(), resource.getrusage(resource.RUSAGE_SELF)
    print(f"{name:24s} HWM {s['VmHWM']:.2f} GB, RSS after {s['VmRSS']:.2f} GB, {time.perf_counter() - started:.1f} s; "
          f"so far {ru.ru_minflt / 1e6:.2f}M page faults, user {ru.ru_utime:.1f} s, sys {ru.ru_stime:.1f} s", flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--labels", default="sampled", choices=("sampled", "data"))
    ap.add_argument("--whole-passes", action="store_true", help="one forward and backward pass per batch (pass_tokens=0)")
    ap.add_argument("--default-malloc", action="store_true", help="keep glibc's own mmap threshold")
    ap.add_argument("--workdir", default=None, help="keep the model here (default: a temporary folder)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_memory_real import build_model
    from transformers import GPT2LMHeadModel

    import inflq.engine as engine_module
    from inflq.engine import GradientEngine, make_batch, select_modules
    from inflq_builtins.estimators import CovariancePass

    folder = Path(args.workdir or tempfile.mkdtemp(prefix="inflq-batchmem-")) / f"gpt2-{args.layers}x768"
    if not (folder / "config.json").exists():
        build_model(folder, args.layers, 768, 50257, 256)
    model = GPT2LMHeadModel.from_pretrained(str(folder)).eval()
    if args.default_malloc and hasattr(engine_module, "tune_allocator"):
        engine_module._allocator_policy = "default"  # as if already decided: mallopt is never called
    kw = {"pass_tokens": 0} if args.whole_passes and hasattr(engine_module, "_PASS_TOKENS") else {}
    engine = GradientEngine(model, select_modules(model, "all"), **kw)
    print(f"GPT-2 {args.layers} x 768, batch 8 x 256, {args.labels} labels; model loaded: RSS {status()['VmRSS']:.2f} GB; "
          f"passes of {getattr(engine, 'pass_tokens', 0) or 'all'} tokens; malloc policy: {getattr(engine_module, '_allocator_policy', None)}")
    gen = torch.Generator().manual_seed(0)
    batch = make_batch([torch.randint(0, 50255, (256,), generator=gen).numpy() for _ in range(8)], 0, sample_seeds=list(range(8)))
    pass_, sums = CovariancePass(), {}
    for i in range(2):
        captures, _ = step(f"capture #{i}", lambda: engine.capture(batch, args.labels))
        step(f"accumulate #{i}", lambda caps=captures: pass_.accumulate(engine, batch, caps, sums))
        del captures
        step("captures dropped", lambda: None)
    print(f"covariance sums: {sum(v.numel() * v.element_size() for v in sums.values()) / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
