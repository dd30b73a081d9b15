"""Workloads shared by the index benchmarks (bench_index.py, bench_index_ceiling.py): a random
GPT-2 in memory, and a fresh copy of the demo project's model, corpus and queries."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def random_gpt2_model(width: int, layers: int, vocab: int, positions: int, seed: int = 0):
    """A random-weight GPT-2 in memory (one head per 64 dimensions, no dropout)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=width, n_layer=layers, n_head=max(1, width // 64),
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def demo_workload():
    """The demo's engine, tokenized sequences, queries' tokens and completion starts, and pad id,
    from a fresh copy of projects/demo (its catalog and artifacts left behind)."""
    import inflq
    from inflq.demo import ensure_demo

    root = Path(tempfile.mkdtemp(prefix="inflq-ceiling-")) / "demo"
    shutil.copytree(REPO / "projects" / "demo", root, ignore=shutil.ignore_patterns("catalog.db*", "artifacts", "corpus"))
    os.environ["INFLQ_DEMO"] = str(root)
    ensure_demo()
    rt = inflq.open_project(root).runtime
    seqs = rt.corpus.many(np.arange(len(rt.corpus)))
    qs = [json.loads(line) for line in (root / "queries.jsonl").read_text().splitlines() if line.strip()]
    tq = [rt.tokenize_query(q["prompt"], q["completion"]) for q in qs]
    return rt.engine(), seqs, [t.tokens for t in tq], [t.completion_start for t in tq], rt.pad_id
