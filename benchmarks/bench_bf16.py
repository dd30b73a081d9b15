"""bf16 against float32: the same project's EK-FAC scores with the model in bfloat16 and in float32.

    python benchmarks/bench_bf16.py            # the LoRA demo (projects/demo-lora, built by its build.py)
    python benchmarks/bench_bf16.py --demo     # the demo (projects/demo), full model, 9 queries

Both runs fit their own factors (captures in float32, sums in float64 whatever the model's dtype)
with the empirical Fisher (no sampling noise between the two) and score every training sequence
against every query. Printed: the Spearman correlation of the two score matrices, pooled and per
query (median and minimum), and how many of float32's top 10 per query bf16's top 10 holds.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

HERE = Path(__file__).resolve().parent
PROJECTS = HERE.parent / "projects"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", action="store_true", help="the demo's full model instead of the LoRA demo's adapter")
    args = ap.parse_args()
    import torch

    from inflq.project import Project
    from inflq.queries import add_queries
    from inflq.reading import score_matrix
    from inflq.runs import RunSettings, run_investigation

    torch.set_num_threads(2)
    if args.demo:
        model, corpus, queries, init = PROJECTS / "demo" / "model", PROJECTS / "demo" / "corpus.jsonl", PROJECTS / "demo" / "queries.jsonl", {}
    else:
        lora = PROJECTS / "demo-lora"
        if not (lora / "adapter" / "adapter_model.safetensors").is_file():
            raise SystemExit(f"build the LoRA demo first: python {lora / 'build.py'}")
        model, corpus, queries = PROJECTS / "demo" / "model", lora / "train.jsonl", lora / "queries.jsonl"
        init = {"adapter": lora / "adapter"}
    rows = [json.loads(line) for line in queries.read_text().splitlines() if line.strip()]
    scores = {}
    with tempfile.TemporaryDirectory(prefix="inflq-bf16-") as tmp:
        for dtype in ("float32", "bfloat16"):
            p = Project.init(Path(tmp) / dtype, model, corpus, append_eos=True, max_length=64, dtype=dtype, **init)
            add_queries(p, "default", [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
            r = run_investigation(p, "default", RunSettings(estimator="ekfac:fisher=empirical", rank=None, batch_size=16))
            scores[dtype] = score_matrix(p, "default", r.result_set_id)
    a, b = scores["float32"], scores["bfloat16"]
    per = [float(spearmanr(x, y)[0]) for x, y in zip(a, b)]
    top = [len(set(np.argsort(-x)[:10]) & set(np.argsort(-y)[:10])) for x, y in zip(a, b)]
    print(f"{'demo' if args.demo else 'demo-lora'}: {a.shape[0]} queries x {a.shape[1]} sequences, ekfac (empirical Fisher)")
    print(f"Spearman bf16 vs float32: pooled {float(spearmanr(a.ravel(), b.ravel())[0]):.4f}, per query median {np.median(per):.4f}, "
          f"min {min(per):.4f}; top-10 overlap per query: median {np.median(top):.0f}/10, min {min(top)}/10; load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
