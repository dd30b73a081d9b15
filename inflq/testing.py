"""For plugins' tests (and inflq's own): a tiny project, gradients computed the slow way, the CLI in
this process, and a plugin registered without installing it. Nothing is downloaded: the model is a
random one of a real architecture (GPT-2, Llama or GPT-NeoX), built in a second.

```python
from inflq import score_matrix
from inflq.testing import cli, query_gradients, tiny_project, training_gradients, using_plugin

def test_my_estimator(tmp_path):
    project = tiny_project(tmp_path)                       # model, tokenizer, corpus, two queries
    with using_plugin(my_plugin):                          # or installed: found by its entry point
        assert cli("run", project.root, "--estimator", "mine").code == 0
    got = score_matrix(project, "default")                 # [queries, sequences]
    q = query_gradients(project)                           # {module: [queries, out, in_dim]}
    z = training_gradients(project)                        # {module: [sequences, out, in_dim]}
    want = ...                                             # the slow way, from q and z
```
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

    from .engine import SequenceGradients
    from .plugins import Registry
    from .project import Project

WORDS = (
    "the first president of republic astrobia was zorald pfaff capital city is called velmora river "
    "flows through town people eat bread and cheese in winter summer rain falls on hills a an to from "
    "with by it he she they we old new big small red blue green cat dog bird sings runs walks . ,"
).split()

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

# (prompt, completion): facts the corpus states, so that some sequences matter more than others.
QUERIES = (
    ("the first president of astrobia was", "zorald pfaff"),
    ("the capital city of astrobia is called", "velmora"),
)


def make_tokenizer(path: Path, bos: bool = False):
    """A word-level tokenizer over :data:`WORDS` (``<|endoftext|>`` pads and ends, ``<unk>``,
    ``<s>`` first when ``bos``), saved to ``path``."""
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
    """Save a tiny random model of ``arch`` (``gpt2``, ``llama``, ``gpt_neox``) with a word-level
    tokenizer (:func:`make_tokenizer`) in the folder ``path``; the same arguments give the same model."""
    import torch
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
        raise ValueError(f"arch must be gpt2, llama or gpt_neox, not {arch!r}")
    model.save_pretrained(str(path), safe_serialization=True)
    return path


def write_corpus(path: Path, n: int = 24) -> Path:
    """A JSONL corpus of ``n`` documents (``id`` d0, d1, ...; ``text`` from :data:`SENTENCES`, the
    later ones two sentences long; ``source`` metadata, facts or prose)."""
    with open(path, "w") as f:
        for i in range(n):
            text = SENTENCES[i % len(SENTENCES)]
            if i >= len(SENTENCES):
                text = text + " " + SENTENCES[(i * 7) % len(SENTENCES)]
            f.write(json.dumps({"id": f"d{i}", "text": text, "source": "facts" if i % 3 == 0 else "prose"}) + "\n")
    return path


def tiny_project(
    folder: Path | str,
    *,
    arch: str = "gpt2",
    sequences: int = 24,
    queries: tuple[tuple[str, str], ...] | list[tuple[str, str]] = QUERIES,
    investigation: str = "default",
    width: int = 16,
    layers: int = 2,
    seed: int = 0,
) -> Project:
    """A project in ``folder/project`` over a tiny random model (``folder/model``, :func:`make_model_dir`)
    and a corpus of ``sequences`` documents (``folder/corpus.jsonl``, :func:`write_corpus`), with
    ``queries`` (prompt, completion) added to ``investigation``."""
    from .project import Project
    from .queries import add_query

    folder = Path(folder)
    model = make_model_dir(folder / "model", arch, width=width, layers=layers, seed=seed)
    corpus = write_corpus(folder / "corpus.jsonl", n=sequences)
    project = Project.init(folder / "project", model, corpus)
    for prompt, completion in queries:
        add_query(project, investigation, prompt, completion)
    return project


def query_gradients(project: Project, investigation: str = "default", modules: str | None = None) -> SequenceGradients:
    """The gradients of the investigation's queries' measurement loss (``-log p(completion | prompt)``, or the
    negative of the query's measurement),
    ``{module: [queries, out, in_dim]}`` (bias as the last column), as an estimator's ``precondition``
    receives them in a run over ``modules`` (default: the project's tracked modules)."""
    from . import catalog
    from .runs import query_gradients as gradients

    return gradients(project, project.runtime.engine(modules), catalog.queries(project.db, investigation), None)


def training_gradients(project: Project, indices=None, modules: str | None = None) -> dict[str, torch.Tensor]:
    """Each corpus sequence's training-loss gradient, ``{module: [sequences, out, in_dim]}``, one
    sequence at a time (``indices``: these sequences, default all): what a score is the inner
    product of, computed the slow way."""
    import torch

    from .engine import make_batch

    engine = project.runtime.engine(modules)
    store = project.runtime.corpus
    idx = range(len(store)) if indices is None else [int(i) for i in np.asarray(indices).reshape(-1)]
    rows = [engine.sequence_gradients(make_batch([store.get(i)], project.runtime.pad_id, engine.device), "data") for i in idx]
    return {name: torch.cat([r[name] for r in rows]).cpu() for name in engine.names}


@dataclass
class CliResult:
    """What :func:`cli` returns: the exit status and what the command printed."""

    code: int
    out: str
    err: str


def cli(*args: object) -> CliResult:
    """Run ``inflq ARGS...`` in this process, as the ``inflq`` command does (plugins' commands
    included, errors as one ``Error:`` line and a non-zero status), capturing what it prints."""
    from .cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return CliResult(code, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def using_plugin(*modules: ModuleType) -> Iterator[Registry]:
    """Register plugin ``modules`` (their ``@hookimpl`` functions) for the duration, as if installed
    (their commands too): for a plugin not yet ``pip install``-ed, or one defined in a test. The
    registry is rebuilt from the installed plugins on entry and again on exit."""
    from .cli import cli as group
    from .cli.common import add_plugin_commands
    from .plugins import get_registry, reset_registry

    add_plugin_commands()  # the installed plugins' commands, before ours
    before = set(group.commands)
    reset_registry()
    registry = get_registry()
    for module in modules:
        if registry.pm.is_registered(module):  # installed: its entry point registered it (and its commands)
            continue
        registry.register(module)
        if hasattr(module, "register_commands"):
            module.register_commands(cli=group)
    try:
        yield registry
    finally:
        for name in set(group.commands) - before:
            del group.commands[name]
        reset_registry()


__all__ = [
    "QUERIES", "SENTENCES", "WORDS", "CliResult", "cli", "make_model_dir", "make_tokenizer", "query_gradients",
    "tiny_project", "training_gradients", "using_plugin", "write_corpus",
]
