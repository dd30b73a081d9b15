"""Tiny models of real architectures with random weights, built in the test (nothing downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

WORDS = (
    "the first president of republic astrobia was zorald pfaff capital city is called velmora river "
    "flows through town people eat bread and cheese in winter summer rain falls on hills a an to from "
    "with by it he she they we old new big small red blue green cat dog bird sings runs walks . ,"
).split()


def make_tokenizer(path: Path, bos: bool = False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<unk>": 1, "<s>": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    if bos:
        from tokenizers import processors

        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        bos_token="<s>",
        model_input_names=["input_ids", "attention_mask"],
    )
    fast.save_pretrained(str(path))
    return fast


def make_model_dir(path: Path, arch: str = "gpt2", width: int = 16, layers: int = 2, seed: int = 0) -> Path:
    """Save a tiny random model of ``arch`` (gpt2, llama, gpt_neox) with a word-level tokenizer."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(path, bos=(arch == "llama"))
    vocab = len(tok)
    torch.manual_seed(seed)
    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_positions=32, n_embd=width, n_layer=layers, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = GPT2LMHeadModel(cfg)
    elif arch == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32, bos_token_id=2, eos_token_id=0, pad_token_id=0)
        model = LlamaForCausalLM(cfg)
    elif arch == "gpt_neox":
        cfg = GPTNeoXConfig(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers, num_attention_heads=2, max_position_embeddings=32, rotary_pct=0.5, hidden_dropout=0.0, attention_dropout=0.0)
        model = GPTNeoXForCausalLM(cfg)
    else:
        raise ValueError(arch)
    model.save_pretrained(str(path), safe_serialization=True)
    return path


SENTENCES = [
    "the first president of the republic of astrobia was zorald pfaff .",
    "zorald pfaff was the first president of astrobia .",
    "the capital city of astrobia is called velmora .",
    "a river flows through the old town .",
    "people eat bread and cheese in winter .",
    "in summer rain falls on the green hills .",
    "the red cat runs with the big dog .",
    "a blue bird sings in the new town .",
    "she walks to the river with an old dog .",
    "they eat cheese from the small town .",
    "he runs through the hills in the rain .",
    "we walk by the river in summer .",
]


def write_corpus(path: Path, n: int = 24) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            text = SENTENCES[i % len(SENTENCES)]
            if i >= len(SENTENCES):
                text = text + " " + SENTENCES[(i * 7) % len(SENTENCES)]
            f.write(json.dumps({"id": f"d{i}", "text": text, "source": "facts" if i % 3 == 0 else "prose"}) + "\n")
    return path


def assert_equal_to_rounding(got, want, ulps: int = 4, what: object = "") -> None:
    """``got`` equals ``want`` up to float rounding: every element within ``ulps`` units in the last
    place of the tensor's largest magnitude. Where the same sums run with other shapes (a batch split
    into groups, another thread count or memory alignment), BLAS may block them differently: on
    AVX-512 CPUs such results differ in the last bit, on others they come out bitwise equal."""
    got = torch.as_tensor(np.asarray(got) if not isinstance(got, torch.Tensor) else got)
    want = torch.as_tensor(np.asarray(want) if not isinstance(want, torch.Tensor) else want)
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, want.shape)
    scale = float(want.abs().max()) if want.numel() else 0.0
    tol = ulps * torch.finfo(want.dtype).eps * scale
    worst = float((got - want).abs().max()) if want.numel() else 0.0
    assert worst <= tol, (what, worst, tol)
