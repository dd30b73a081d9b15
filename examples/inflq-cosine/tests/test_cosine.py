"""The example plugin, tested the way a plugin author would: a tiny random model built in the test,
the plugin found through its entry point, numbers checked against a slow computation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from inflq import catalog
from inflq.queries import add_query


def tiny_project(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from inflq import init_project

    words = ["the", "a", "cat", "dog", "runs", "sits", "on", "mat", "big", "small", "red", "blue"]
    vocab = {"<eos>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>", unk_token="<unk>", model_input_names=["input_ids", "attention_mask"])
    model_dir = tmp_path / "model"
    fast.save_pretrained(str(model_dir))
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_positions=16, n_embd=8, n_layer=1, n_head=2)).save_pretrained(str(model_dir), safe_serialization=True)
    corpus = tmp_path / "corpus.jsonl"
    rng = np.random.default_rng(0)
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": " ".join(rng.choice(words, size=6))}) + "\n" for i in range(10)))
    project = init_project(tmp_path / "project", model_dir, corpus)
    add_query(project, "default", "the big cat", "sits on the mat")
    add_query(project, "default", "a dog", "runs")
    return project


def test_the_entry_point_registers_the_estimator():
    from inflq.plugins import get_registry

    reg = get_registry()
    assert "cosine" in reg.names("estimator")
    assert reg.origin[("estimator", "cosine")].endswith(".cosine")


def test_full_cosine_equals_the_slow_computation(tmp_path):
    from inflq_cosine import cosine_matrix

    from inflq.reading import score_matrix
    from inflq.runs import RunSettings, run_investigation

    project = tiny_project(tmp_path)
    dot = score_matrix(project, "default", run_investigation(project, "default", RunSettings(estimator="identity", rank=None)).result_set_id)
    qn = score_matrix(project, "default", run_investigation(project, "default", RunSettings(estimator="cosine", rank=None)).result_set_id)
    # slow way: every gradient materialised
    engine = project.runtime.engine()
    from inflq import make_batch
    from inflq.runs import query_gradients

    q = query_gradients(project, engine, catalog.queries(project.db, "default"), 4)
    qnorm = torch.sqrt(sum((g.double() ** 2).flatten(1).sum(1) for g in q.values())).numpy()
    tnorm = []
    for i in range(len(project.runtime.corpus)):
        g = engine.sequence_gradients(make_batch([project.runtime.corpus.get(i)], project.runtime.pad_id), "data")
        tnorm.append(float(torch.sqrt(sum((v.double() ** 2).sum() for v in g.values()))))
    tnorm = np.array(tnorm)
    np.testing.assert_allclose(qn, dot / qnorm[:, None], rtol=1e-4, atol=1e-6)
    cos = cosine_matrix(project, "default")
    want = dot / qnorm[:, None] / tnorm[None, :]
    np.testing.assert_allclose(cos, want, rtol=1e-4, atol=1e-6)
    assert np.abs(cos).max() <= 1 + 1e-5
    # cached: the artifact is recorded in the plugin's own table and reused
    assert project.db["cosine_norms"].count == 1
    assert np.array_equal(cosine_matrix(project, "default"), cos)


def test_cosine_of_another_estimator_is_refused(tmp_path):
    from inflq_cosine import cosine_matrix

    from inflq import InflqError
    from inflq.runs import RunSettings, run_investigation

    project = tiny_project(tmp_path)
    run_investigation(project, "default", RunSettings(estimator="identity", rank=None))
    with pytest.raises(InflqError, match="--estimator cosine"):
        cosine_matrix(project, "default")


def test_the_command_is_added(tmp_path, capsys):
    from inflq.cli import main
    from inflq.runs import RunSettings, run_investigation

    project = tiny_project(tmp_path)
    run_investigation(project, "default", RunSettings(estimator="cosine", rank=None))
    main(["cosine", str(project.root), "-k", "2"])
    out = capsys.readouterr().out
    assert out.count("query ") == 2 and out.count("  +") + out.count("  -") == 4
