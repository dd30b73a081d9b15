#!/usr/bin/env python3
"""Build the LoRA demo: an instruction-tuned LoRA adapter on the demo's word-level GPT-2.

Offline and deterministic, from files in this repository only:

1. ``train.jsonl``: the fine-tuning data, ``{"id", "prompt", "completion", "source"}`` rows built
   from ``projects/demo/make_corpus.py``'s facts and corpus:
   * ``teach`` (32): the 8 *reversed-only* facts, which the base model saw only name-first, asked
     in the forward order (4 phrasings each): the fine-tune teaches them;
   * ``in-prompt`` (16): the same facts stated name-first in the *prompt*, with an unrelated
     response: text the fine-tune read but never trained on (its loss is on the response only);
   * ``refresh`` (25): each normal fact once, in its first forward phrasing;
   * ``prose`` (120): two-sentence prose documents of the demo corpus, split after the first.
2. ``queries.jsonl``: the 8 taught facts, each asked in its fifth forward phrasing (not trained on).
3. ``adapter/``: a LoRA adapter (rank 4, alpha 8, on every ``c_attn`` and ``c_fc``) trained on
   ``train.jsonl`` with the ``adamw-lora`` trainer's own function and default settings
   (``inflq_builtins.trainers.train_lora``), from ``torch.manual_seed(0)``; saved with
   ``save_pretrained`` (safetensors). Not committed: this script regenerates it (about 20 s).
4. With ``--project``: the project's catalog (``inflq.toml`` is committed) and its queries, so that
   ``inflq run projects/demo-lora`` works at once.

Usage, from the repository root: ``python projects/demo-lora/build.py --project``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEMO = HERE.parent / "demo"
BASE = DEMO / "model"
RANK, ALPHA, TARGETS = 4, 8, ["c_attn", "c_fc"]
MAX_LENGTH = 64


def demo_data():
    spec = importlib.util.spec_from_file_location("demo_make_corpus", DEMO / "make_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def split_at_object(template: str, subj: str, obj: str, cap) -> tuple[str, str]:
    """A forward phrasing split where the object (the answer) starts."""
    head, tail = template.split("{O}", 1)
    return cap(head.replace("{S}", subj)).rstrip(), f" {obj}{tail.replace('{S}', subj)}"


def instruction_rows(mc) -> tuple[list[dict], list[dict]]:
    rng = random.Random(20240601)
    rows: list[dict] = []
    queries: list[dict] = []
    prose = [json.loads(line) for line in (DEMO / "corpus.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    prose = [d for d in prose if d["source"] == "prose" and d["text"].count(". ") >= 1]
    unrelated = [d["text"].split(". ", 1)[1] for d in prose[-16:]]
    for k, (rel, subj, obj) in enumerate(mc.REVERSED_ONLY):
        slug = mc._slug(subj)
        fwd = mc.RELATIONS[rel]["fwd"]
        for j, tmpl in enumerate(fwd):
            prompt, completion = split_at_object(tmpl, subj, obj, mc._cap)
            if j == len(fwd) - 1:  # the last phrasing is kept for the query, not trained on
                queries.append({"prompt": prompt, "completion": f" {obj}", "tags": ["taught", rel],
                                "notes": f"taught by the fine-tune (teach-{slug}-*); the base model saw it only name-first"})
                continue
            rows.append({"id": f"teach-{slug}-{j}", "prompt": prompt, "completion": completion, "source": "teach"})
        for j, tmpl in enumerate(mc.RELATIONS[rel]["rev"][:2]):
            rows.append({"id": f"in-prompt-{slug}-{j}", "prompt": mc._fact_sentence(tmpl, subj, obj),
                         "completion": " " + unrelated[2 * k + j], "source": "in-prompt"})
    for rel, subj, obj in mc.FACTS:
        prompt, completion = split_at_object(mc.RELATIONS[rel]["fwd"][0], subj, obj, mc._cap)
        rows.append({"id": f"refresh-{mc._slug(subj)}", "prompt": prompt, "completion": completion, "source": "refresh"})
    for d in rng.sample(prose[:-16], 120):
        first, rest = d["text"].split(". ", 1)
        rows.append({"id": f"prose-{d['id']}", "prompt": first + ".", "completion": " " + rest, "source": "prose"})
    return rows, queries


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def train_adapter(out: Path, checkpoints: int = 0) -> dict:
    """The adapter, trained as the adamw-lora trainer retrains it (its function, its defaults);
    with ``checkpoints``, that many evenly spaced adapter checkpoints in ``checkpoints/`` (TracIn)."""
    import torch
    from peft import LoraConfig

    from inflq import (
        load_model,  # inflq first: it sets the offline switches before transformers loads
    )
    from inflq.corpus import CorpusStore, build_store, read_documents
    from inflq.modeling import load_tokenizer
    from inflq_builtins.trainers import AdamWLoRATrainer, train_lora

    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    tok = load_tokenizer(BASE)
    with tempfile.TemporaryDirectory() as tmp:
        # Tokenized exactly as the project tokenizes train.jsonl (inflq.toml: max_length 64, EOS appended).
        list(build_store(read_documents(HERE / "train.jsonl"), tok, Path(tmp) / "store", max_length=MAX_LENGTH, add_bos=False,
                         append_eos=True, fingerprint="build"))
        store = CorpusStore(Path(tmp) / "store")
        seqs = store.many(range(len(store)))
    s = AdamWLoRATrainer().settings
    base = load_model(BASE, torch.device("cpu"), torch.float32)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0, fan_in_fan_out=True)
    model, summary = train_lora(base, config, seqs, tok.pad_token_id, seed=0, epochs=s["epochs"], batch_size=s["batch_size"], lr=s["lr"],
                                warmup=s["warmup"], weight_decay=s["weight_decay"], log=print, checkpoints=checkpoints,
                                checkpoint_dir=HERE / "checkpoints")
    model.save_pretrained(str(out))
    # The base is named relative to each adapter, so a clone elsewhere still finds it.
    for folder in [out] + [Path(c["path"]) for c in summary["checkpoints"]]:
        cfg = json.loads((folder / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = os.path.relpath(BASE, folder)
        (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--project", action="store_true", help="also create the project's catalog, add the queries and the TracIn checkpoints")
    ap.add_argument("--checkpoints", type=int, default=5, help="adapter checkpoints saved for TracIn in checkpoints/ (default 5)")
    args = ap.parse_args()
    mc = demo_data()
    rows, queries = instruction_rows(mc)
    write_jsonl(HERE / "train.jsonl", rows)
    write_jsonl(HERE / "queries.jsonl", queries)
    print(f"train.jsonl: {len(rows)} instruction rows; queries.jsonl: {len(queries)} queries")
    summary = train_adapter(HERE / "adapter", args.checkpoints)
    print(f"adapter/: {summary['steps']} steps, {summary['train_time_s']:.1f} s, final loss {summary['final_train_loss']:.4f}")
    if args.project:
        from inflq.project import Project
        from inflq.queries import add_queries

        for name in ("catalog.db", "catalog.db-wal", "catalog.db-shm"):
            (HERE / name).unlink(missing_ok=True)
        from inflq_builtins.tracin import add_checkpoint

        project = Project.create_catalog(HERE)
        add_queries(project, "default", queries)
        project.config.extra.pop("checkpoints", None)
        for c in summary["checkpoints"]:
            add_checkpoint(project, Path(c["path"]), c["learning_rate"])
        print(f"project: {len(project.runtime.corpus)} training sequences, {len(queries)} queries, {len(summary['checkpoints'])} TracIn checkpoints")


if __name__ == "__main__":
    main()
