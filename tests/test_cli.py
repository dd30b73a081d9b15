"""The CLI contract end to end, and every bad input named in the foundation issue."""

from __future__ import annotations

import json
import os
import sqlite3

import numpy as np
import pytest

from helpers import make_model_dir
from inflq import catalog
from inflq.queries import add_query


def _catalog_dump(root):
    conn = sqlite3.connect(root / "catalog.db")
    out = {t: conn.execute(f"SELECT * FROM [{t}]").fetchall() for (t,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    conn.close()
    return out


def _one_line_error(code, err):
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("Error: ")
    assert "Traceback" not in err


def test_init_query_run_top_export(tmp_path, gpt2_dir, corpus_file, cli_run):
    proj = tmp_path / "p"
    code, out, err = cli_run("init", proj, "--model", gpt2_dir, "--corpus", corpus_file)
    assert code == 0, err
    assert "24 training sequences" in out
    queries = tmp_path / "q.jsonl"
    queries.write_text(
        json.dumps({"prompt": "the first president of astrobia was", "completion": "zorald pfaff"}) + "\n"
        + json.dumps({"prompt": "the capital city of astrobia is called", "completion": "velmora", "tags": ["geo"]}) + "\n"
    )
    assert cli_run("query", "add", proj, "--file", queries)[0] == 0
    assert cli_run("query", "add", proj, "a red cat", "runs")[0] == 0
    code, out, _ = cli_run("query", "list", proj, "--json")
    assert [q["completion"] for q in json.loads(out)] == ["zorald pfaff", "velmora", "runs"]
    assert [q["tags"] for q in json.loads(out)] == [[], ["geo"], []]  # lists, not JSON inside JSON
    code, out, err = cli_run("run", proj, "--estimator", "ekfac", "--filter", "random:n=10", "--rank", "4", "--top-k", "3")
    assert code == 0, err
    code, out, err = cli_run("top", proj, "--json", "-k", "3")
    data = json.loads(out)
    assert len(data) == 3 and all(len(d["results"]) == 3 for d in data)
    scores = [r["score"] for r in data[0]["results"]]
    assert scores == sorted(scores, reverse=True)
    assert data[1]["query"]["tags"] == ["geo"]
    first = data[0]["results"][0]
    assert isinstance(first["layer_scores"], dict) and isinstance(first["module_scores"], dict)
    assert sum(first["layer_scores"].values()) == pytest.approx(first["score"], rel=1e-4)
    out_file = tmp_path / "scores.npy"
    assert cli_run("export", proj, "--format", "npy", "--output", out_file)[0] == 0
    m = np.load(out_file, allow_pickle=False)
    assert m.dtype == np.float32 and m.shape == (3, 24)
    assert np.isnan(m).sum(axis=1).tolist() == [14, 14, 14]  # 10 of 24 sampled, NaN elsewhere
    # the top rows agree with the exported matrix
    best = data[0]["results"][0]
    assert m[0, best["seq_idx"]] == pytest.approx(best["score"], rel=1e-6)
    # a query added after the run is NaN everywhere
    assert cli_run("query", "add", proj, "the old town", "river")[0] == 0
    assert cli_run("export", proj, "--output", out_file)[0] == 0
    assert np.isnan(np.load(out_file)[3]).all()


def test_plugins_lists_builtins(cli_run):
    code, out, _ = cli_run("plugins", "--json")
    data = json.loads(out)
    assert {"identity", "ekfac", "kfac", "diagonal"} <= set(data["estimator"])
    assert {"all", "random", "metadata", "union"} <= set(data["filter"])
    assert data["executor"]["local"]["plugin"] == "inflq.executors"
    assert all(p["distribution"] == "inflq" for p in data["plugins"] if p["name"].startswith("inflq."))


def test_broken_plugin_is_reported_not_fatal(monkeypatch):
    from importlib import metadata

    from inflq.plugins import Registry

    real = metadata.entry_points

    class BadEP:
        name, value, dist = "broken", "no_such_module_xyz", None

        def load(self):
            import no_such_module_xyz  # noqa: F401

    def fake(group):
        return list(real(group=group)) + [BadEP()]

    monkeypatch.setattr(metadata, "entry_points", fake)
    reg = Registry()
    reg.load_entry_points()
    failed = [lp for lp in reg.loaded if lp.error]
    assert len(failed) == 1 and "no_such_module_xyz" in failed[0].error
    assert "ekfac" in reg.names("estimator")


def test_missing_model_folder(tmp_path, corpus_file, cli_run):
    code, _, err = cli_run("init", tmp_path / "p", "--model", tmp_path / "nope", "--corpus", corpus_file)
    _one_line_error(code, err)
    assert "does not exist" in err and not (tmp_path / "p").exists()


def test_non_causal_model(tmp_path, corpus_file, cli_run):
    from transformers import DistilBertConfig, DistilBertModel

    from helpers import make_tokenizer

    d = tmp_path / "bert"
    DistilBertModel(DistilBertConfig(vocab_size=60, dim=8, hidden_dim=16, n_layers=1, n_heads=2)).save_pretrained(d)
    make_tokenizer(d)
    code, out, err = cli_run("init", tmp_path / "p", "--model", d, "--corpus", corpus_file)
    assert code == 0  # init checks files only; loading the model happens at run time
    cli_run("query", "add", tmp_path / "p", "the old town", "river")
    code, _, err = cli_run("run", tmp_path / "p", "--estimator", "identity")
    _one_line_error(code, err)
    assert "not a causal language model" in err


def test_missing_tokenizer(tmp_path, corpus_file, cli_run):
    d = make_model_dir(tmp_path / "m", "gpt2")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (d / f).unlink(missing_ok=True)
    code, _, err = cli_run("init", tmp_path / "p", "--model", d, "--corpus", corpus_file)
    _one_line_error(code, err)
    assert "tokenizer" in err


@pytest.mark.parametrize("content,needle,names_file", [
    ("", "no text", False),  # nothing to point at: the whole corpus is empty
    ("\n\n", "no text", False),
    ('{"text": "a red cat"}\n{"text": "broken\n', ":2: not valid JSON", True),
    ('{"text": 5}\n', "non-string", True),
    ('["a list"]\n', "expected a JSON object", True),
    (b'{"text": "caf\xe9"}\n', "not valid UTF-8", True),
])
def test_bad_corpus(tmp_path, gpt2_dir, cli_run, content, needle, names_file):
    c = tmp_path / "c.jsonl"
    c.write_bytes(content if isinstance(content, bytes) else content.encode())
    code, _, err = cli_run("init", tmp_path / "p", "--model", gpt2_dir, "--corpus", c)
    _one_line_error(code, err)
    assert needle in err, err
    if names_file:  # an error about a line names the file it is in
        assert str(c) in err, err
    assert not (tmp_path / "p").exists(), "no half-written project"


def test_missing_corpus(tmp_path, gpt2_dir, cli_run):
    code, _, err = cli_run("init", tmp_path / "p", "--model", gpt2_dir, "--corpus", tmp_path / "none.jsonl")
    _one_line_error(code, err)


def test_bad_queries_leave_catalog_unchanged(project, tmp_path, cli_run):
    before = _catalog_dump(project.root)
    code, _, err = cli_run("query", "add", project.root, "the old town", "")
    _one_line_error(code, err)
    assert "completion is empty" in err
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"prompt": "a", "completion": "cat"}) + "\n{oops\n")
    code, _, err = cli_run("query", "add", project.root, "--file", q)
    _one_line_error(code, err)
    assert "q.jsonl:2" in err
    q.write_text(json.dumps({"prompt": "a", "completion": "cat"}) + "\n" + json.dumps({"prompt": "a", "completion": " "}) + "\n")
    code, _, err = cli_run("query", "add", project.root, "--file", q)
    _one_line_error(code, err)
    assert "query 2" in err
    assert _catalog_dump(project.root) == before


def test_newer_project_refused(project, cli_run):
    project.db["_sqlite_migrations"].insert({"migration_set": "inflq", "name": "9999_future", "applied_at": "x"})
    project.close()
    code, _, err = cli_run("query", "list", project.root)
    _one_line_error(code, err)
    assert "newer inflq" in err


def test_locked_catalog(project, cli_run, monkeypatch):
    monkeypatch.setenv("INFLQ_BUSY_TIMEOUT", "200")
    project.close()
    holder = sqlite3.connect(project.root / "catalog.db")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        code, _, err = cli_run("query", "add", project.root, "the old town", "river")
        _one_line_error(code, err)
        assert "locked" in err
    finally:
        holder.rollback()
        holder.close()
    assert sqlite3.connect(project.root / "catalog.db").execute("SELECT count(*) FROM queries").fetchone()[0] == 0


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_catalog(project, cli_run):  # pragma: no cover - CI runs as root
    project.close()
    os.chmod(project.root / "catalog.db", 0o444)
    code, _, err = cli_run("query", "add", project.root, "the old town", "river")
    _one_line_error(code, err)


def test_read_only_catalog_as_any_user(project, cli_run, monkeypatch):
    """What a user without write access gets, also as root (CI): root passes every permission check,
    so the check says no here; the catalog then opens read-only for real and the write fails."""
    from pathlib import Path

    project.close()
    unwritable = {project.root.resolve(), (project.root / "catalog.db").resolve()}
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, *a, **kw: (not mode & os.W_OK or Path(path).resolve() not in unwritable) and real_access(path, mode, *a, **kw))
    before = _catalog_dump(project.root)
    code, _, err = cli_run("query", "add", project.root, "the old town", "river")
    _one_line_error(code, err)
    assert "read-only" in err, err
    assert _catalog_dump(project.root) == before


def test_read_only_catalog_via_uri(project):
    """Root ignores permissions, so open read-only explicitly: writes fail with a clear error."""
    from inflq import catalog

    project.close()
    db = catalog.connect(project.root / "catalog.db", readonly=True)
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        db["queries"].insert({"prompt": "x"})


def test_not_a_project(tmp_path, cli_run):
    code, _, err = cli_run("query", "list", tmp_path)
    _one_line_error(code, err)
    assert "not an inflq project" in err
    code, _, err = cli_run("query", "list", tmp_path / "missing")
    _one_line_error(code, err)


def test_changed_model_is_detected(tmp_path, corpus_file, cli_run):
    m = make_model_dir(tmp_path / "m", "gpt2", seed=1)
    proj = tmp_path / "p"
    assert cli_run("init", proj, "--model", m, "--corpus", corpus_file)[0] == 0
    cli_run("query", "add", proj, "the old town", "river")
    make_model_dir(tmp_path / "m", "gpt2", seed=2)  # different weights in place
    code, _, err = cli_run("run", proj, "--estimator", "identity")
    _one_line_error(code, err)
    assert "differs" in err


def test_changed_corpus_is_detected(project, cli_run):
    add_query(project, "default", "the old town", "river")
    with open(project.corpus_path, "a") as f:
        f.write(json.dumps({"id": "new", "text": "a new red bird"}) + "\n")
    project.close()
    code, _, err = cli_run("run", project.root, "--estimator", "identity")
    _one_line_error(code, err)
    assert "corpus rebuild" in err
    assert cli_run("corpus", "rebuild", project.root)[0] == 0
    assert cli_run("run", project.root, "--estimator", "identity")[0] == 0


def test_model_and_corpus_formats(tmp_path, cli_run):
    for arch in ("llama", "gpt_neox"):
        m = make_model_dir(tmp_path / arch, arch)
        c = tmp_path / f"{arch}.txt"
        c.write_text("the red cat runs .\n\nthe blue bird sings in the old town .\n\nwe walk by the river .")
        proj = tmp_path / f"p-{arch}"
        code, out, err = cli_run("init", proj, "--model", m, "--corpus", c)
        assert code == 0, err
        assert "3 training sequences" in out
        assert cli_run("query", "add", proj, "the red cat", "runs")[0] == 0
        code, out, err = cli_run("run", proj, "--estimator", "ekfac", "--rank", "full")
        assert code == 0, err
    from inflq.project import Project

    p = Project.open(tmp_path / "p-llama")
    assert p.config.add_bos  # Llama's tokenizer adds BOS; sequences start with it
    assert p.runtime.corpus.get(0)[0] == p.runtime.tokenizer.bos_token_id
    q = p.runtime.tokenize_query("the red cat", "runs")
    assert q.tokens[0] == p.runtime.tokenizer.bos_token_id and list(q.tokens).count(p.runtime.tokenizer.bos_token_id) == 1


def test_long_documents_are_chunked(tmp_path, gpt2_dir, cli_run):
    c = tmp_path / "c.jsonl"
    c.write_text(json.dumps({"id": "long", "text": " ".join(["the red cat runs ."] * 20)}) + "\n")
    proj = tmp_path / "p"
    assert cli_run("init", proj, "--model", gpt2_dir, "--corpus", c, "--max-length", "16")[0] == 0
    from inflq.project import Project

    p = Project.open(proj)
    ids = [r["seq_id"] for r in p.db["sequences"].rows_where(order_by="idx")]
    assert ids == [f"long:{i}" for i in range(len(ids))] and len(ids) == 7  # 100 tokens / 16
    assert all(len(p.runtime.corpus.get(i)) <= 16 for i in range(len(ids)))


def test_relink_accepts_a_renamed_copy_of_the_corpus(project, tmp_path, cli_run):
    """The corpus fingerprint is a content fingerprint: the same bytes under another name relink;
    other bytes are refused in one line."""
    import shutil

    root = project.root
    project.close()
    copy = tmp_path / "elsewhere" / "renamed-copy.jsonl"
    copy.parent.mkdir()
    shutil.copy(project.corpus_path, copy)
    code, out, err = cli_run("relink", root, "--corpus", copy)
    assert code == 0 and "relinked" in out, err
    from inflq.project import Project

    p = Project.open(root)
    assert p.corpus_path.resolve() == copy.resolve() and len(p.runtime.corpus) == 24
    p.close()
    changed = tmp_path / "changed.jsonl"
    changed.write_text(copy.read_text() + json.dumps({"id": "x", "text": "a red cat"}) + "\n")
    code, _, err = cli_run("relink", root, "--corpus", changed)
    _one_line_error(code, err)
    assert "not the corpus this project was made with" in err
    _one_line_error(*cli_run("relink", root, "--corpus", tmp_path / "missing.jsonl")[::2])


def test_a_project_with_an_old_name_hashing_corpus_fingerprint_still_opens_and_relinks(project, tmp_path, cli_run):
    """Projects made when a corpus file's fingerprint hashed its name: they open with the corpus
    where it was (even after a copy changed its mtime), relink to a renamed copy, and keep their
    recorded fingerprint (factor sets and runs are keyed by it, so nothing is refit)."""
    import shutil

    from inflq import catalog
    from inflq.corpus import corpus_fingerprint
    from inflq.project import CORPUS_DIR, Project

    root, corpus = project.root, project.corpus_path
    legacy = corpus_fingerprint(corpus, legacy_name=corpus.name)
    assert legacy != corpus_fingerprint(corpus)
    with project.db.atomic():  # what an old project recorded
        catalog.set_meta(project.db, "corpus_fingerprint", legacy)
        project.db.execute("DELETE FROM meta WHERE key IN ('corpus_content_fingerprint', 'corpus_stat')")
    info = json.loads((root / CORPUS_DIR / "store.json").read_text())
    (root / CORPUS_DIR / "store.json").write_text(json.dumps({**info, "fingerprint": legacy}))
    project.close()
    os.utime(corpus)  # a copied folder: the stat cache does not vouch for the file
    p = Project.open(root)
    assert len(p.runtime.corpus) == 24  # no "the corpus changed" error, no rebuild
    assert p.corpus_fingerprint_recorded == legacy and p.runtime.corpus.fingerprint == legacy
    p.close()
    copy = tmp_path / "moved" / "train-renamed.jsonl"
    copy.parent.mkdir()
    shutil.copy(corpus, copy)
    code, out, err = cli_run("relink", root, "--corpus", copy)
    assert code == 0, err
    corpus.unlink()
    p = Project.open(root)
    assert p.corpus_path.resolve() == copy.resolve()
    os.utime(copy)
    assert len(p.runtime.corpus) == 24 and p.corpus_fingerprint_recorded == legacy
    p.close()
    assert cli_run("query", "add", root, "the old town", "river")[0] == 0
    assert cli_run("run", root, "--estimator", "identity", "--rank", "4")[0] == 0


def test_demo_headless_shows_the_result_set_of_the_asked_estimator(project, cli_run, monkeypatch):
    """A filtered or other-estimator result set made later (say in the UI) is not what
    `demo --headless --estimator X` shows: it shows (or makes) X over all sequences, and names it."""
    from inflq.runs import RunSettings, run_investigation

    catalog.create_investigation(project.db, "word-order")
    add_query(project, "word-order", "the first president of astrobia was", "zorald pfaff")
    wanted = run_investigation(project, "word-order", RunSettings(estimator="identity", rank=4)).result_set_id
    run_investigation(project, "word-order", RunSettings(estimator="identity", filter="random:n=10", rank=4))
    run_investigation(project, "word-order", RunSettings(estimator="diagonal", rank=4))
    project.close()
    monkeypatch.setenv("INFLQ_DEMO", str(project.root))
    code, out, err = cli_run("demo", "--headless", "--estimator", "identity")
    assert code == 0, err
    assert f"result set {wanted}: identity / all" in out
    assert out.count("query 1:") == 1 and "rank 4" in out  # the top table is the named set's


def test_unknown_tokens_are_reported(tmp_path, gpt2_dir, cli_run):
    """The share of the corpus the tokenizer does not know is a warning at init and rebuild; a
    completion of unknown tokens only is refused; a lone query's error is not "query 1"."""
    c = tmp_path / "c.jsonl"
    c.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(
        ["the red cat runs .", "the quokka zzyzx sings .", "a blue bird sings ."])))
    proj = tmp_path / "p"
    code, out, err = cli_run("init", proj, "--model", gpt2_dir, "--corpus", c)
    assert code == 0, err
    assert "warning: 13.3% of the corpus's tokens (2 of 15) are unknown to the model's tokenizer (<unk>)" in err, err
    code, out, err = cli_run("corpus", "rebuild", proj)
    assert code == 0 and "13.3% of the corpus's tokens" in err
    for _ in range(3):
        assert cli_run("query", "add", proj, "the red cat", "runs")[0] == 0
    code, _, err = cli_run("query", "add", proj, "the red cat", "zzyzx quokka")
    _one_line_error(code, err)
    assert "every token of the completion 'zzyzx quokka' is unknown to the model's tokenizer (<unk>)" in err
    code, _, err = cli_run("query", "add", proj, "the red cat", " ")
    assert err.startswith("Error: the completion is empty"), err  # the fourth query, not "query 1"
    assert cli_run("query", "add", proj, "the red cat", "zzyzx runs")[0] == 0  # a known token is measured


def test_a_known_corpus_gets_no_warning(tmp_path, gpt2_dir, cli_run):
    c = tmp_path / "c.jsonl"
    c.write_text(json.dumps({"text": "the red cat runs ."}) + "\n")
    code, out, err = cli_run("init", tmp_path / "p", "--model", gpt2_dir, "--corpus", c)
    assert code == 0 and "warning" not in err, err


def test_the_commands_a_new_user_starts_with_say_what_they_do():
    """init, investigation, query and probe: every command and option has help text."""
    import click

    from inflq.cli import cli

    for name in ("init", "investigation", "query", "probe"):
        group = cli.commands[name]
        commands = group.commands.values() if isinstance(group, click.Group) else [group]
        for cmd in commands:
            assert cmd.help, f"{name} {cmd.name} has no help"
            for param in cmd.params:
                if isinstance(param, click.Option):
                    assert param.help, f"{name} {cmd.name} {param.opts[-1]} has no help"


def test_long_ids_are_never_cut_and_scores_share_one_format(tmp_path, gpt2_dir, cli_run, monkeypatch):
    """Ids that differ only at their ends (…-fwd-00, …-fwd-02) are whole in `top`, `self-influence`
    and the Markdown export at 80 columns; a column of scores has one format; `attribute`'s token
    table gives positions; `factors list` cuts nothing."""
    import re

    from inflq.display import format_scores

    monkeypatch.setenv("COLUMNS", "80")
    words = ["the red cat runs .", "the first president of astrobia was zorald pfaff .", "a blue bird sings in the old town ."]
    c = tmp_path / "c.jsonl"
    c.write_text("".join(json.dumps({"id": f"fact-korvania-president-fwd-{i:02d}", "text": words[i % 3]}) + "\n" for i in range(12)))
    proj = tmp_path / "p"
    assert cli_run("init", proj, "--model", gpt2_dir, "--corpus", c)[0] == 0
    assert cli_run("query", "add", proj, "the first president of astrobia was", "zorald pfaff")[0] == 0
    assert cli_run("run", proj, "--estimator", "ekfac", "--rank", "4", "--top-k", "12")[0] == 0
    code, out, err = cli_run("top", proj, "-k", "12")
    assert code == 0, err
    ids = re.findall(r"fact-korvania-president-fwd-\d\d:0", out)
    assert len(set(ids)) == 12, out
    scores = re.findall(r"│\s+\d+\s+│\s+(\S+)\s+│", out)
    assert len(scores) == 12 and len({("e" in s, len(s.split(".")[-1].split("e")[0])) for s in scores}) == 1, scores
    code, out, err = cli_run("self-influence", proj, "--estimator", "identity", "-k", "5")
    assert code == 0 and len(set(re.findall(r"fact-korvania-president-fwd-\d\d:0", out))) == 5, out
    code, out, err = cli_run("export", proj, "--format", "md", "-o", tmp_path / "r.md")
    assert code == 0, err
    assert len(set(re.findall(r"\| fact-korvania-president-fwd-\d\d:0 \|", (tmp_path / "r.md").read_text()))) >= 10
    code, out, err = cli_run("attribute", proj, "--query", "1", "--sequence", "fact-korvania-president-fwd-01:0")
    assert code == 0, err
    assert re.search(r"position\s+┃\s+token", out) and re.search(r"│\s+6\s+│\s+zorald\s+│", out), out
    code, out, err = cli_run("factors", "list", proj)
    assert code == 0 and "…" not in out and 'factor set 1: ekfac {"fisher": "true", "sampled_at": "loss positions"}' in out, out
    assert format_scores([-13070.0, -6947.0, 5.0]) == ["-13070", "-6947", "+5"]
    assert format_scores([105.1, 0.3344]) == ["+105.1", "+0.3"]
    assert format_scores([2e5, 3.0]) == ["+2.000e+05", "+3.000e+00"]


def test_a_broken_corpus_line_names_the_file_as_given(tmp_path, gpt2_dir, cli_run, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "broken.jsonl").write_text('{"text": "a red cat"}\n{"text": "broken\n')
    monkeypatch.chdir(tmp_path)
    code, _, err = cli_run("init", "proj", "--model", gpt2_dir, "--corpus", "data/broken.jsonl")
    _one_line_error(code, err)
    assert err.startswith("Error: data/broken.jsonl:2: not valid JSON (Invalid control character at column 17)"), err


def test_every_command_and_option_has_help():
    """`inflq COMMAND --help` explains every option, built-in commands and plugins' alike."""
    import click

    from inflq.cli import add_plugin_commands, cli

    add_plugin_commands()  # as `inflq` does before parsing: the plugins' commands are walked too
    missing = []

    def walk(group, prefix):
        for name, command in group.commands.items():
            if not command.help:
                missing.append(f"{prefix}{name}")
            if isinstance(command, click.Group):
                walk(command, f"{prefix}{name} ")
                continue
            missing.extend(f"{prefix}{name} {p.opts[0]}" for p in command.params if isinstance(p, click.Option) and not p.help)

    walk(cli, "")
    assert missing == []


def test_plugins_add_their_commands_through_the_hook_once_when_inflq_starts():
    """Importing the CLI adds no plugin command; ``main`` calls ``register_commands`` once."""
    import subprocess
    import sys

    code = (
        "from inflq import hookimpl\n"
        "from inflq.plugins import get_registry\n"
        "calls = []\n"
        "class Counter:\n"
        "    @hookimpl\n"
        "    def register_commands(self, cli):\n"
        "        calls.append(cli)\n"
        "get_registry().register(Counter(), name='counter')\n"
        "import inflq.cli as c\n"
        "assert calls == [] and 'checkpoint' not in c.cli.commands, calls\n"
        "try:\n    c.main(['plugins'])\nexcept SystemExit:\n    pass\n"
        "c.add_plugin_commands()\n"
        "assert calls == [c.cli] and 'checkpoint' in c.cli.commands, calls\n"
        "print('OK')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "INFLQ_LOAD_PLUGINS"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0 and p.stdout.strip().endswith("OK"), p.stdout + p.stderr


def test_the_cli_modules_import_one_way():
    """Command modules import the shared `common` module (and each other only downwards); `common` imports no
    command module; only ``inflq/cli/__init__.py`` gathers them."""
    import ast
    from pathlib import Path

    import inflq.cli

    folder = Path(inflq.cli.__file__).parent
    siblings = {f.stem for f in folder.glob("*.py")} - {"__init__", "__main__"}
    edges = {}
    for name in siblings:
        tree = ast.parse((folder / f"{name}.py").read_text())
        edges[name] = {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 1 and n.module}
        assert edges[name] <= siblings, (name, edges[name])
    assert edges["common"] == set()

    def reaches(start, target, seen=()):
        return any(n == target or (n not in seen and reaches(n, target, (*seen, n))) for n in edges[start])

    assert not [n for n in siblings if reaches(n, n)]
