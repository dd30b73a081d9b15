"""Peak RSS of the true Fisher's label sampling on a GPT-2 configuration of real size (issue 17).

    python benchmarks/bench_sampling_memory.py MODE [LAYERS]

MODE: ``sample-only`` (the loss step with sampled labels, from precomputed logits), ``baseline``
(the same step with the data's labels), ``capture-sampled`` / ``capture-data`` (a whole
``GradientEngine.capture``). Vocabulary 50,257, width 768, a batch of 8 × 256 random tokens, one
thread, CPU. Prints the process's peak RSS (``ru_maxrss``: torch's allocations are invisible to
tracemalloc), so run one mode per process. To compare with another version of inflq, put its tree
first on ``PYTHONPATH``. Figures: docs/method.md ("Where labels are sampled").
"""
import resource
import sys
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from inflq.engine import GradientEngine, make_batch, select_modules

torch.set_num_threads(1)
what = sys.argv[1]  # capture-sampled | capture-data | sample-only | baseline
layers = int(sys.argv[2]) if len(sys.argv) > 2 else 1
torch.manual_seed(0)
cfg = GPT2Config(vocab_size=50257, n_positions=256, n_embd=768, n_layer=layers, n_head=12)
model = GPT2LMHeadModel(cfg).eval()
engine = GradientEngine(model, select_modules(model, "all"))
g = torch.Generator().manual_seed(0)
seqs = [torch.randint(0, 50257, (256,), generator=g).tolist() for _ in range(8)]
batch = make_batch(seqs, 0, sample_seeds=list(range(8)))
if what in ("sample-only", "baseline"):  # the loss step alone, on logits computed beforehand
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    engine.losses(logits, batch, "sampled" if what == "sample-only" else "data")
    secs = time.perf_counter() - t
else:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    engine.capture(batch, what.split("-")[1])
    secs = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(f"{what}: peak RSS {peak / 2**20:.2f} GiB (before the measured step {before / 2**20:.2f} GiB), step {secs:.2f} s")
