"""Corpus formats, query tokenization (chat templates, BOS) and the Python API."""

from __future__ import annotations

import json

import numpy as np
import pytest

import inflq
from helpers import make_model_dir
from inflq import catalog
from inflq.errors import InflqError
from inflq.project import Project
from inflq.queries import add_query


def test_datasets_folder_corpus(tmp_path, gpt2_dir):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["the red cat runs .", "a blue bird sings ."], "id": ["a", "b"], "source": ["x", "y"]})
    ds.save_to_disk(str(tmp_path / "ds"))
    p = Project.init(tmp_path / "p", gpt2_dir, tmp_path / "ds")
    rows = list(p.db["sequences"].rows_where(order_by="idx"))
    assert [r["seq_id"] for r in rows] == ["a:0", "b:0"]
    assert [r["source"] for r in rows] == ["x", "y"]
    assert p.runtime.token_strings(p.runtime.corpus.get(1)) == ["a", "blue", "bird", "sings", "."]


def test_chat_template_queries(tmp_path):
    m = make_model_dir(tmp_path / "m", "gpt2")
    cfg = json.loads((m / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}we {{ m['content'] }} .{% endfor %}{% if add_generation_prompt %} she{% endif %}"
    (m / "tokenizer_config.json").write_text(json.dumps(cfg))
    c = tmp_path / "c.jsonl"
    c.write_text(json.dumps({"text": "the red cat runs ."}) + "\n")
    p = Project.init(tmp_path / "p", m, c)
    q = p.runtime.tokenize_query("the red cat", "runs", chat=True)
    toks = p.runtime.token_strings(q.tokens)
    assert toks[q.completion_start:] == ["runs"]
    assert toks[: q.completion_start] == ["we", "the", "red", "cat", ".", "she"]
    add_query(p, "default", "the red cat", "runs", chat=True)
    assert catalog.queries(p.db, "default")[0]["chat"] == 1


def test_chat_without_template_is_an_error(project):
    with pytest.raises(InflqError, match="no chat template"):
        project.runtime.tokenize_query("the red cat", "runs", chat=True)


def test_measured_tokens_are_the_completion(project):
    q = project.runtime.tokenize_query("the first president of astrobia was", "zorald pfaff")
    toks = project.runtime.token_strings(q.tokens)
    assert toks[q.completion_start:] == ["zorald", "pfaff"]
    # the joined text, not two separate tokenizations
    assert project.runtime.tokenize_query("the first president of astrobia was ", " zorald pfaff").tokens.tolist() == q.tokens.tolist()


def test_python_api_matches_cli_contract(project):
    from inflq.reading import score_matrix
    from inflq.runs import RunSettings, run_investigation

    add_query(project, "default", "the capital city of astrobia is called", "velmora")
    run_investigation(project, "default", RunSettings(estimator="identity", filter="random:n=5"))
    same = inflq.open_project(project.root)
    m = score_matrix(same, "default")
    assert m.shape == (1, len(same.runtime.corpus)) and m.dtype == np.float32
    assert np.isfinite(m).sum() == 5


def test_plain_text_corpus_and_ids(tmp_path, gpt2_dir):
    c = tmp_path / "c.txt"
    c.write_text("the red cat runs .\n\n\n\na blue bird sings .\n")
    p = Project.init(tmp_path / "p", gpt2_dir, c)
    assert [r["seq_id"] for r in p.db["sequences"].rows_where(order_by="idx")] == ["doc-0:0", "doc-1:0"]


def test_duplicate_document_ids(tmp_path, gpt2_dir):
    c = tmp_path / "c.jsonl"
    c.write_text(json.dumps({"id": "a", "text": "the red cat"}) + "\n" + json.dumps({"id": "a", "text": "the blue cat"}) + "\n")
    with pytest.raises(InflqError, match="appears twice"):
        Project.init(tmp_path / "p", gpt2_dir, c)
    assert not (tmp_path / "p").exists()


def test_investigations_crud(project):
    catalog.create_investigation(project.db, "x")
    qid = add_query(project, "x", "the red cat", "runs")
    catalog.add_probe(project.db, qid, "the red cat runs .", "forward")
    catalog.rename_investigation(project.db, "x", "y")
    assert [p["text"] for p in catalog.probes(project.db, qid)] == ["the red cat runs ."]
    with pytest.raises(InflqError, match="already exists"):
        catalog.create_investigation(project.db, "y")
    project.delete_investigation("y")
    assert project.db["queries"].count == 0 and project.db["probes"].count == 0
    with pytest.raises(InflqError, match="no investigation"):
        catalog.investigation(project.db, "y")


def test_open_read_only(project):
    """``Project.open(..., readonly=True)`` reads, and refuses every write, whoever runs it."""
    import sqlite3

    from inflq import catalog

    project.close()
    p = Project.open(project.root, readonly=True)
    assert p.readonly
    assert [i["name"] for i in catalog.investigations(p.db)] == ["default"]
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        catalog.create_investigation(p.db, "another")
    with pytest.raises(InflqError, match="read-only"):
        p.runtime.rebuild_corpus()
    p.close()
