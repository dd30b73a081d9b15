"""`inflq ask` (issue 24): the gradient index picks, exact EK-FAC scores. On a tiny random GPT-2 over
a seeded corpus of random word sequences; the exact answers are a whole `inflq run --estimator
ekfac --rank full` over every sequence, never ask's own code."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import inflq_builtins.gradient_index as index_plugin
from helpers import WORDS, make_model_dir
from inflq import catalog, get_registry, open_project
from inflq.queries import add_query
from inflq.reading import score_matrix
from inflq.runs import RunSettings, run_investigation

PROMPT, COMPLETION = "the old town", "river"
N = 60


@pytest.fixture(autouse=True)
def _index_plugin():
    from inflq.cli import cli

    get_registry().register(index_plugin, name="inflq.index", distribution="inflq")
    if "index" not in cli.commands:
        index_plugin.register_commands(cli=cli)


def _build(project, **sizes) -> str:
    from inflq import index

    row, _ = index_plugin.build(project, index.IndexSettings(**sizes), RunSettings(seed=project.config.seed), _monitor())
    return row["key"]


def _monitor():
    from inflq import Monitor

    return Monitor()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    """A project of N random word sequences with a small index (3 x 3 per module), a full-width
    index, and the exact answer: a full-rank EK-FAC run of the question in the investigation
    "exact" (its factors cached). Copied per test: the folder holds model, corpus and project."""
    get_registry().register(index_plugin, name="inflq.index", distribution="inflq")
    d = tmp_path_factory.mktemp("ask")
    make_model_dir(d / "model", "gpt2")
    rng = np.random.default_rng(7)
    words = [w for w in WORDS if w not in (".", ",")]
    with open(d / "corpus.jsonl", "w") as f:
        for i in range(N):
            f.write(json.dumps({"id": f"s{i:02d}", "text": " ".join(rng.choice(words, size=int(rng.integers(6, 14))))}) + "\n")
    from inflq.project import Project

    p = Project.init(d / "proj", d / "model", d / "corpus.jsonl")
    small = _build(p, k_s=3, k_a=3)
    full = _build(p, k_s=100000, k_a=100000)
    catalog.create_investigation(p.db, "exact", "the full run")
    add_query(p, "exact", PROMPT, COMPLETION)
    rs = run_investigation(p, "exact", RunSettings(estimator="ekfac", rank=None, top_k=N)).result_set_id
    row = score_matrix(p, "exact", rs)[0].astype(np.float64)
    # The small index's own scores of the question (what picks the candidates), and the full one's.
    preview = {}
    for key in (small, full):
        from inflq.runs import prepare_estimator, scoring_context

        settings = RunSettings(estimator=f"index:key={key}")
        prepared = prepare_estimator(p, settings)
        ctx = scoring_context(p, prepared.estimator, prepared.engine, [{"prompt": PROMPT, "completion": COMPLETION, "chat": 0}], np.arange(N), settings, _monitor())
        preview[key] = np.asarray(prepared.estimator.score_candidates(ctx))[0]
    p.close()
    return {"dir": d, "small": small, "full": full, "exact": row, "preview": preview}


@pytest.fixture
def proj(base, tmp_path) -> Path:
    shutil.copytree(base["dir"], tmp_path / "b")
    return tmp_path / "b" / "proj"


def _ask(cli_run, proj, *args):
    code, out, err = cli_run("ask", proj, PROMPT, COMPLETION, "--json", *args)
    assert code == 0, err
    (entry,) = json.loads(out)
    return entry, err


def _top(values: np.ndarray, k: int, among=None, bottom: bool = False) -> list[int]:
    idx = np.arange(len(values)) if among is None else np.asarray(among)
    key = values[idx] if bottom else -values[idx]
    return [int(i) for i in idx[np.argsort(key, kind="stable")][:k]]


def test_ask_scores_are_the_full_runs_and_its_top_is_the_exact_top_of_the_index_candidates(base, proj, cli_run):
    exact = base["exact"]
    depth = 20
    entry, err = _ask(cli_run, proj, "--index", base["small"], "--depth", depth, "-k", 10)
    assert "fitting" not in err  # the full run cached the factors
    rows = entry["results"]
    got = np.array([r["score"] for r in rows])
    idx = [r["seq_idx"] for r in rows]
    # Exactness: each shown score is the full run's for that sequence.
    np.testing.assert_allclose(got, exact[idx], rtol=0, atol=1e-5 * np.abs(exact).max())
    # The candidates are the index's top `depth`; the answer is their exact top 10, in order.
    cand = _top(base["preview"][base["small"]], depth)
    assert idx == _top(exact, 10, among=cand)
    # Recall of the full run's top 10 is the index's recall at that depth: here, with 3 x 3 per
    # module, it misses some (the test would not tell a miss from a hit if it found all).
    recall = len(set(idx) & set(_top(exact, 10))) / 10
    assert recall == len(set(cand) & set(_top(exact, 10))) / 10 and 0 < recall < 1, recall
    # The layer breakdown sums to the score.
    for r in rows:
        assert sum(r["layer_scores"].values()) == pytest.approx(r["score"], rel=1e-4, abs=1e-6 * np.abs(exact).max())
    # At a full-width index the index's ranking is exact EK-FAC's, and a third of the corpus
    # finds the whole exact top 10: recall 1.
    entry, _ = _ask(cli_run, proj, "--index", base["full"], "--depth", N // 3)
    assert [r["seq_idx"] for r in entry["results"]] == _top(exact, 10)
    # Every sequence: the full run's top and bottom 10 with its scores; --no-index likewise.
    for extra in (("--index", base["small"], "--depth", N), ("--no-index",)):
        entry, _ = _ask(cli_run, proj, *extra)
        assert [r["seq_idx"] for r in entry["results"]] == _top(exact, 10)
        entry, _ = _ask(cli_run, proj, *extra, "--bottom", "-k", 5)
        assert [r["seq_idx"] for r in entry["results"]] == _top(exact, 5, bottom=True)
        assert all(r["side"] == "bottom" for r in entry["results"])
    # --bottom picks the index's lowest candidates.
    entry, _ = _ask(cli_run, proj, "--index", base["small"], "--depth", depth, "--bottom", "-k", 3)
    low = _top(base["preview"][base["small"]], depth, bottom=True)
    assert [r["seq_idx"] for r in entry["results"]] == _top(exact, 3, among=low, bottom=True)


def test_json_has_the_shape_of_top_json(base, proj, cli_run):
    entry, _ = _ask(cli_run, proj, "--index", base["small"], "-k", 3)
    code, out, err = cli_run("top", proj, "-i", "exact", "--json", "-k", 3)
    assert code == 0, err
    (stored,) = json.loads(out)
    assert set(entry) == set(stored) == {"query", "stale", "results"}
    assert set(entry["query"]) == set(stored["query"])
    assert entry["query"]["id"] is None and (entry["query"]["prompt"], entry["query"]["completion"]) == (PROMPT, COMPLETION)
    assert [set(r) for r in entry["results"]] == [set(r) for r in stored["results"]]


def _snapshot(root: Path) -> dict[str, str]:
    """Every file of the project folder and its SHA-256 (SQLite's transient -wal/-shm aside)."""
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(root.rglob("*"))
            if f.is_file() and not f.name.endswith(("-wal", "-shm"))}


def test_nothing_is_written_without_save(base, proj, cli_run):
    before = _snapshot(proj)
    assert any(k.startswith("artifacts/factors/") for k in before) and any(k.startswith("artifacts/index/") for k in before)
    for extra in ((), ("--bottom",), ("--no-index",), ("--index", base["full"], "--depth", 5), ("--rank", "2")):
        code, out, err = cli_run("ask", proj, PROMPT, COMPLETION, *extra)
        assert code == 0, err
        assert "rank" in out and "makes the completion more likely" in " ".join(out.split())
    # A refused --save (no such investigation) writes nothing either.
    code, _, err = cli_run("ask", proj, PROMPT, COMPLETION, "--save", "-i", "nowhere")
    assert code == 1 and "nowhere" in err
    assert _snapshot(proj) == before


def test_save_records_the_question_and_a_run_reproduces_it(base, proj, cli_run):
    assert cli_run("investigation", "add", proj, "asked")[0] == 0
    entry, err = _ask(cli_run, proj, "--index", base["small"], "--depth", 20, "--save", "-i", "asked", "-k", 5)
    qid = entry["query"]["id"]
    assert f"saved as query {qid}" in err
    p = open_project(proj)
    (q,) = catalog.queries(p.db, "asked")
    assert (q["id"], q["prompt"], q["completion"]) == (qid, PROMPT, COMPLETION)
    rs = catalog.result_sets_of(p.db, catalog.investigation(p.db, "asked")["id"])[-1]
    assert rs["estimator"] == "ekfac" and rs["filter"] == f"index:k=20,key={base['small']}" and rs["num_candidates"] == 20
    p.close()
    code, out, err = cli_run("top", proj, "-i", "asked", "--query", qid, "--json", "-k", 5)
    assert code == 0, err
    (stored,) = json.loads(out)
    assert stored["results"] == entry["results"]
    # The recorded filter spec is a run's: scoring the same question with it gives the same scores.
    assert cli_run("investigation", "add", proj, "again")[0] == 0
    assert cli_run("query", "add", proj, PROMPT, COMPLETION, "-i", "again")[0] == 0
    code, _, err = cli_run("run", proj, "-i", "again", "--estimator", "ekfac", "--rank", "full", "--filter", rs["filter"])
    assert code == 0, err
    p = open_project(proj)
    again = score_matrix(p, "again")[0]
    saved = score_matrix(p, "asked")[0]
    p.close()
    assert np.array_equal(np.isnan(again), np.isnan(saved))
    np.testing.assert_allclose(again[~np.isnan(again)], saved[~np.isnan(saved)], rtol=1e-5, atol=1e-6 * np.nanmax(np.abs(saved)))


def test_no_index_says_how_to_build_one_and_no_factors_are_fitted_and_said(tmp_path, gpt2_dir, corpus_file, cli_run):
    p = tmp_path / "p"
    assert cli_run("init", p, "--model", gpt2_dir, "--corpus", corpus_file)[0] == 0
    code, out, err = cli_run("ask", p, PROMPT, COMPLETION)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "inflq index build" in err and "--no-index" in err
    assert cli_run("index", "build", p, "--k-s", "2", "--k-a", "2")[0] == 0
    code, out, err = cli_run("ask", p, PROMPT, COMPLETION)
    assert code == 0, err
    assert "no cached ekfac factors" in err and "fitted ekfac factors" in err
    code, out, err = cli_run("ask", p, PROMPT, COMPLETION)
    assert code == 0 and "factors" not in err
    proj = open_project(p)
    assert [fs["estimator"] for fs in catalog.factor_sets(proj.db) if fs["estimator"] == "ekfac"] == ["ekfac"]
    proj.close()


def test_bad_input_is_one_line(base, proj, cli_run):
    for args, words in (
        (("-i", "exact"), "--save"),
        (("--no-index", "--depth", "5"), "--depth"),
        (("--no-index", "--index", base["small"]), "--index"),
        (("--rank", "zero"), "--rank"),
        (("--chat",), "chat template"),
        (("--index", "zzz"), "no gradient index"),
    ):
        code, out, err = cli_run("ask", proj, PROMPT, COMPLETION, *args)
        assert code == 1 and out == "" and err.startswith("Error:") and err.count("\n") == 1 and words in err, (args, err)
    code, _, err = cli_run("ask", proj, PROMPT, "zzzz qqqq")
    assert code == 1 and "unknown" in err


def test_chat_questions_are_measured_as_query_add_chat_measures_them(tmp_path, gpt2_dir, cli_run):
    """With a chat template, `ask --chat` scores what `query add --chat` and a run score."""
    model = tmp_path / "model"
    shutil.copytree(gpt2_dir, model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}the {{ m['content'] }} .{% endfor %}"
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    corpus = tmp_path / "c.jsonl"
    rng = np.random.default_rng(3)
    words = [w for w in WORDS if w not in (".", ",")]
    corpus.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, size=8))}) + "\n" for _ in range(30)))
    p = tmp_path / "p"
    assert cli_run("init", p, "--model", model, "--corpus", corpus)[0] == 0
    assert cli_run("index", "build", p, "--k-s", "2", "--k-a", "2")[0] == 0
    assert cli_run("query", "add", p, PROMPT, COMPLETION, "--chat")[0] == 0
    assert cli_run("run", p, "--estimator", "ekfac", "--rank", "full")[0] == 0
    proj = open_project(p)
    exact = score_matrix(proj, "default")[0].astype(np.float64)
    proj.close()
    entry, _ = _ask(cli_run, p, "--chat", "--no-index")
    assert entry["query"]["chat"] == 1
    assert [r["seq_idx"] for r in entry["results"]] == _top(exact, 10)
    np.testing.assert_allclose([r["score"] for r in entry["results"]], exact[_top(exact, 10)], rtol=0, atol=1e-5 * np.abs(exact).max())
    plain, _ = _ask(cli_run, p, "--no-index")
    assert [r["score"] for r in plain["results"]] != [r["score"] for r in entry["results"]]  # the template changed the measurement
