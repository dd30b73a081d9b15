#!/usr/bin/env python3
"""Train the small word-level GPT-2 used by the inflq demo.

Reads ``corpus.jsonl`` and ``queries.jsonl`` beside this script, trains

* a word-level tokenizer (``tokenizers`` WordLevel model, ``Whitespace``
  pre-tokenizer, i.e. splits on ``\\w+|[^\\w\\s]+``; special tokens
  ``<|endoftext|>`` = eos = bos = pad and ``<unk>``), wrapped in
  ``transformers.PreTrainedTokenizerFast`` that returns only ``input_ids`` and
  ``attention_mask``;
* a randomly initialised ``GPT2LMHeadModel`` (4 layers, 128 wide, 4 heads,
  64 positions) on every document followed by ``<|endoftext|>``;

and saves both with ``save_pretrained`` (safetensors) into ``--out`` (default
``model/`` beside this script).  It then prints, for every query, the
log-probability of the completion (summed over completion tokens) and the
greedy continuation of the prompt, and the training wall time; the same
numbers go to ``<out>/train_summary.json``.

``--checkpoints K`` also saves K evenly spaced training checkpoints for TracIn
into ``--checkpoint-dir`` (default ``checkpoints/`` beside this script, not
committed: rerun to regenerate them), ``step-NNNNN/`` each with its learning
rate in ``checkpoint.json``, and prints the ``inflq checkpoint add`` commands
that register them.  The final model is the same, bit for bit, with or without.

Deterministic: fixed seed, fixed thread count, deterministic algorithms.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from inflq_builtins.trainers import train_causal_lm

HERE = Path(__file__).resolve().parent
EOS = "<|endoftext|>"
UNK = "<unk>"
N_POSITIONS = 64


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def build_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # WordPiece decoder without cleanup = join tokens with single spaces.
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    trainer = trainers.WordLevelTrainer(special_tokens=[EOS, UNK], min_frequency=1,
                                        show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        bos_token=EOS,
        pad_token=EOS,
        unk_token=UNK,
        model_max_length=N_POSITIONS,
        padding_side="right",
        model_input_names=["input_ids", "attention_mask"],
        clean_up_tokenization_spaces=False,
    )


def encode_docs(tokenizer, texts: list[str]) -> list[list[int]]:
    out = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False)["input_ids"]
        ids = ids[: N_POSITIONS - 1] + [tokenizer.eos_token_id]
        out.append(ids)
    return out


@torch.no_grad()
def score_query(model, tokenizer, prompt: str, completion: str, n_extra: int = 2) -> dict:
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    full = tokenizer(prompt + completion, add_special_tokens=False)["input_ids"]
    assert full == p_ids + c_ids, "prompt/completion tokenization is not additive"
    ids = torch.tensor([p_ids + c_ids])
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
    logp = torch.log_softmax(logits.float(), dim=-1)
    token_logps = [logp[len(p_ids) - 1 + j, t].item() for j, t in enumerate(c_ids)]

    gen = list(p_ids)
    for _ in range(len(c_ids) + n_extra):
        x = torch.tensor([gen[-N_POSITIONS:]])
        nxt = int(model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -1].argmax())
        gen.append(nxt)
        if nxt == tokenizer.eos_token_id:
            break
    greedy_ids = gen[len(p_ids):]
    return {
        "logprob": sum(token_logps),
        "token_logprobs": token_logps,
        "completion_tokens": tokenizer.convert_ids_to_tokens(c_ids),
        "greedy": tokenizer.decode(greedy_ids),
        "greedy_correct": greedy_ids[: len(c_ids)] == c_ids,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description="Train the inflq demo GPT-2.")
    ap.add_argument("--corpus", type=Path, default=HERE / "corpus.jsonl")
    ap.add_argument("--queries", type=Path, default=HERE / "queries.jsonl")
    ap.add_argument("--out", type=Path, default=HERE / "model")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--checkpoints", type=int, default=0,
                    help="save this many evenly spaced checkpoints for TracIn (default: none)")
    ap.add_argument("--checkpoint-dir", type=Path, default=HERE / "checkpoints")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    try:
        torch.use_deterministic_algorithms(True)
    except Exception as e:  # pragma: no cover
        print(f"warning: deterministic algorithms unavailable: {e}")

    docs = read_jsonl(args.corpus)
    queries = read_jsonl(args.queries) if args.queries.exists() else []
    texts = [d["text"] for d in docs]

    tokenizer = build_tokenizer(texts)
    print(f"tokenizer: {len(tokenizer)} tokens (eos/bos/pad={EOS!r} id {tokenizer.eos_token_id}, "
          f"unk={UNK!r} id {tokenizer.unk_token_id})")
    seqs = encode_docs(tokenizer, texts)
    n_unk = sum(s.count(tokenizer.unk_token_id) for s in seqs)
    assert n_unk == 0, f"{n_unk} <unk> tokens in the corpus"

    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=N_POSITIONS,
        n_embd=128,
        n_layer=4,
        n_head=4,
        n_inner=512,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters")

    # The training loop is the built-in `adamw` trainer's (LDS retrains with the same recipe).
    stats = train_causal_lm(model, seqs, tokenizer.pad_token_id, epochs=args.epochs,
                            batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                            log=lambda line: print(line, flush=True),
                            checkpoints=args.checkpoints, checkpoint_dir=args.checkpoint_dir)
    step, train_time = stats["steps"], stats["train_time_s"]
    print(f"training wall time: {train_time:.1f}s ({step} steps, {args.threads} threads)")

    model.eval()
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)  # transformers >= 5 always writes model.safetensors
    tokenizer.save_pretrained(args.out)
    # transformers 5 names the class "TokenizersBackend", which transformers 4 does not know;
    # "PreTrainedTokenizerFast" loads the same tokenizer under both.
    tok_cfg_path = os.path.join(args.out, "tokenizer_config.json")
    with open(tok_cfg_path) as f:
        tok_cfg = json.load(f)
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(tok_cfg_path, "w") as f:
        json.dump(tok_cfg, f, indent=2)
    assert (args.out / "model.safetensors").exists()
    assert not (args.out / "pytorch_model.bin").exists()

    results = []
    for i, q in enumerate(queries):
        r = score_query(model, tokenizer, q["prompt"], q["completion"])
        r.update({"query": i, "prompt": q["prompt"], "completion": q["completion"],
                  "tags": q.get("tags", [])})
        results.append(r)
        print(f"[{i}] {q['prompt']!r} -> {q['completion']!r}  logp {r['logprob']:10.4g}  "
              f"greedy {r['greedy']!r}  {'OK' if r['greedy_correct'] else 'WRONG'}  "
              f"({', '.join(q.get('tags', []))})")
    summary = {
        "seed": args.seed, "epochs": args.epochs, "steps": step, "batch_size": args.batch_size,
        "lr": args.lr, "threads": args.threads, "train_time_s": round(train_time, 1),
        "n_params": n_params, "vocab_size": len(tokenizer), "n_docs": len(seqs),
        "final_train_loss": stats["final_train_loss"],
        "queries": results,
    }
    with open(args.out / "train_summary.json", "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    size = os.path.getsize(args.out / "model.safetensors") / 1e6
    print(f"saved to {args.out} (model.safetensors {size:.2f} MB)")
    if stats["checkpoints"]:
        print(f"{len(stats['checkpoints'])} checkpoints in {args.checkpoint_dir}; register them for TracIn with")
        for c in stats["checkpoints"]:
            print(f"  inflq checkpoint add PROJECT {c['path']} --lr {c['learning_rate']!r}")


if __name__ == "__main__":
    main()
