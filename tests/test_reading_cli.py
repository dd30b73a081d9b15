"""Reading results in a terminal, through the real CLI (issue 25): a query of another investigation
named as such, `show`, `top --wide/--full`, `top --by FIELD`, plurals, the header of a run."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from helpers import cli_ok, make_model_dir, write_corpus


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A tiny project with two investigations: 'other' holds query 1 (scored by run 1), 'default'
    holds query 2 (scored by run 2) and query 3 (added after run 2). Tests copy it."""
    base = tmp_path_factory.mktemp("reading")
    model = make_model_dir(base / "model", "gpt2")
    corpus = write_corpus(base / "corpus.jsonl")
    root = base / "proj"

    cli = cli_ok
    cli("init", root, "--model", model, "--corpus", corpus)
    cli("investigation", "add", root, "other")
    cli("query", "add", root, "-i", "other", "the first president of astrobia was", "zorald pfaff")
    cli("run", root, "-i", "other", "--estimator", "identity", "--top-k", "5")
    cli("query", "add", root, "the red cat runs", "with the dog")
    cli("run", root, "--estimator", "identity", "--top-k", "5")
    cli("query", "add", root, "we walk by the river", "in summer")
    return root


@pytest.fixture
def proj(scored, tmp_path):
    dst = tmp_path / "proj"
    shutil.copytree(scored, dst)
    for name in ("model", "corpus.jsonl"):  # the copy's inflq.toml names them beside it
        (tmp_path / name).symlink_to(scored.parent / name)
    return dst


def _one_line_error(code, err, *needles):
    assert code == 1, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def test_a_query_of_another_investigation_is_named_with_its_investigation(proj, cli_run):
    code, out, err = cli_run("attribute", proj, "--query", "1", "--sequence", "d0:0")
    _one_line_error(code, err, "query 1 is in investigation 'other'", "-i other")
    code, out, err = cli_run("top", proj, "--query", "1")
    _one_line_error(code, err, "query 1 is in investigation 'other'", "-i other")
    assert out == "", "no table titled with a run that never scored the query"
    code, out, err = cli_run("show", proj, "d0:0", "-i", "default", "--query", "1")
    _one_line_error(code, err, "query 1 is in investigation 'other'")
    # Picked as the error says, both work.
    code, out, err = cli_run("attribute", proj, "-i", "other", "--query", "1", "--sequence", "d0:0")
    assert code == 0, err
    assert "total" in out
    code, out, err = cli_run("top", proj, "-i", "other", "--query", "1", "--json")
    assert code == 0 and json.loads(out)[0]["query"]["id"] == 1


def test_a_query_added_after_the_run_is_said_to_be_unscored(proj, cli_run):
    code, out, err = cli_run("top", proj, "--query", "3")
    _one_line_error(code, err, "query 3 was added after run 2", "inflq run")
    code, out, err = cli_run("attribute", proj, "--query", "3", "--sequence", "d0:0")
    _one_line_error(code, err, "query 3 was added after run 2")
    code, out, err = cli_run("top", proj, "--json")  # every query: the scored one, and a line for the other
    assert code == 0
    assert [d["query"]["id"] for d in json.loads(out)] == [2]
    assert "query 3 was added after run 2" in err
    code, out, err = cli_run("top", proj, "--result-set", "1")
    _one_line_error(code, err, "result set 1 belongs to investigation 'other'", "-i other")


def test_an_investigation_without_results_points_to_the_ones_with_results(proj, cli_run):
    code, out, err = cli_run("investigation", "add", proj, "empty")
    assert code == 0
    code, out, err = cli_run("top", proj, "-i", "empty")
    _one_line_error(code, err, "'empty' has no results yet", "'default' and 'other'", "-i NAME")


def test_show_prints_the_whole_text_metadata_scores_and_heat_map(proj, cli_run):
    from inflq.project import Project

    p = Project.open(proj)
    row = p.db["sequences"].get(4)
    text = p.runtime.decode(p.runtime.corpus.get(4))
    p.close()
    code, out, err = cli_run("show", proj, row["doc_id"])  # a one-chunk document's id is enough
    assert code == 0, err
    assert row["seq_id"] in out and "source: " + row["source"] in out
    assert " ".join(text.split()) in " ".join(out.split()), "the whole text, wrapped but never cut"
    # Its score and rank in the latest result set of the investigation with the latest results.
    m = _matrix(cli_run, proj, "default")
    score, rank = m[0, 4], int((m[0] > m[0, 4]).sum()) + 1
    line = next(line for line in out.splitlines() if line.strip().startswith("│ 2 ") or line.strip().startswith("2 "))
    assert f"{rank} of 24" in line, out
    assert f"{score:+.2f}"[:4] in line.replace(" ", ""), (score, line)
    code, out, err = cli_run("show", proj, row["seq_id"], "--query", "2")
    assert code == 0, err
    assert "position" in out and "total" in out
    total = float(out.strip().splitlines()[-1].split()[-1])
    assert total == pytest.approx(float(score), rel=1e-4, abs=1e-6), "the heat map sums to the stored score"
    code, out, err = cli_run("show", proj, "no-such-doc")
    _one_line_error(code, err, "no training sequence 'no-such-doc'")


def _matrix(cli_run, proj, inv):
    out_file = proj.parent / f"{inv}.npy"
    code, _, err = cli_run("export", proj, "-i", inv, "-o", out_file)
    assert code == 0, err
    return np.load(out_file)


def test_top_at_80_columns_cuts_the_text_but_wide_and_full_show_it_whole(proj, cli_run, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    code, out, err = cli_run("top", proj, "--json", "-k", "3")
    texts = [" ".join(r["text"].split()) for r in json.loads(out)[0]["results"]]
    longest = max(texts, key=len)
    assert len(longest) > 40
    code, out, err = cli_run("top", proj, "-k", "3")
    assert code == 0 and max(len(line) for line in out.splitlines()) <= 80
    assert longest not in out, "the default table fits 80 columns"
    code, out, err = cli_run("top", proj, "-k", "3", "--wide")
    assert code == 0
    assert all(t in out for t in texts), "--wide: one row per sequence, as long as its text"
    code, out, err = cli_run("top", proj, "-k", "3", "--full")
    assert code == 0 and max(len(line) for line in out.splitlines()) <= 80
    flat = " ".join(out.split())
    assert all(t in flat for t in texts), "--full: the whole text, wrapped to the terminal"
    code, out, err = cli_run("top", proj, "--wide", "--full")
    _one_line_error(code, err, "--wide and --full")


def test_top_by_a_metadata_field_splits_positive_influence(proj, cli_run):
    m = _matrix(cli_run, proj, "default")[0].astype(np.float64)
    source = np.array(["facts" if i % 3 == 0 else "prose" for i in range(24)])  # helpers.write_corpus
    pos = np.where(m > 0, m, 0.0)
    want = {s: pos[source == s].sum() / pos.sum() for s in ("facts", "prose")}
    code, out, err = cli_run("top", proj, "--by", "source", "--json")
    assert code == 0, err
    (data,) = json.loads(out)
    got = {g["value"]: g for g in data["groups"]}
    assert set(got) == {"facts", "prose"}
    for s in want:
        assert got[s]["share"] == pytest.approx(want[s], rel=1e-5)
        assert got[s]["sequences"] == int((source == s).sum())
    assert sum(g["share"] for g in data["groups"]) == pytest.approx(1.0)
    code, out, err = cli_run("top", proj, "--by", "source")
    assert code == 0 and "share of positive influence" in out and f"{100 * want['prose']:.1f} %" in out
    code, out, err = cli_run("top", proj, "--by", "kind")
    _one_line_error(code, err, "no sequence has a metadata field 'kind'", "source")


def test_one_of_a_thing_is_singular(proj, cli_run):
    code, out, err = cli_run("export", proj, "-o", proj.parent / "m.npy")
    assert code == 0 and "2 queries x 24 sequences" in out
    code, out, err = cli_run("export", proj, "-i", "other", "-o", proj.parent / "m.npy")
    assert code == 0 and "1 query x 24 sequences" in out, out


def test_plugins_at_80_columns_cut_nothing(cli_run, monkeypatch):
    from inflq.plugins import get_registry

    monkeypatch.setenv("COLUMNS", "80")
    code, out, err = cli_run("plugins")
    assert code == 0, err
    assert "…" not in out and max(len(line) for line in out.splitlines()) <= 80
    reg = get_registry()
    words = out.split()
    for kind in reg.KINDS:
        for name, cls in reg.all(kind).items():
            assert name in words
            for o in cls.options:
                assert f"{o.name}={o.default}" in out, (kind, name, o.name)


def test_self_influence_is_kept_in_the_project_keyed_by_what_determines_it(proj, cli_run, monkeypatch):
    import inflq.passes
    from inflq import integrity
    from inflq.project import Project

    passes = []
    real = inflq.passes.SelfInfluencePass

    class Counting(real):
        def __init__(self, *a, **k):
            passes.append(1)
            super().__init__(*a, **k)

    monkeypatch.setattr(inflq.passes, "SelfInfluencePass", Counting)
    code, first, err = cli_run("self-influence", proj, "--estimator", "ekfac", "-k", "5")
    assert code == 0, err
    assert len(passes) == 1 and "read back" not in err
    code, again, err = cli_run("self-influence", proj, "--estimator", "ekfac", "-k", "5")
    assert code == 0 and len(passes) == 1, "asked again: read back, no pass"
    assert "read back from artifacts/self-influence/" in err and again == first
    code, _, err = cli_run("self-influence", proj, "--estimator", "ekfac:damping=0.5", "-k", "5")
    assert code == 0 and len(passes) == 2, "another damping is another key"
    code, _, err = cli_run("self-influence", proj, "--estimator", "ekfac", "-k", "5", "--recompute")
    assert code == 0 and len(passes) == 3
    # The cache is an artifact like the others: checked, packed, and a damaged one recomputed.
    p = Project.open(proj)
    cached = [a for a in integrity.referenced_artifacts(p.db) if a.kind == "self-influence scores"]
    assert len(cached) == 2
    p.close()
    (proj / cached[0].path).write_bytes(b"damaged")
    code, out, err = cli_run("check", proj)
    assert code == 1 and "self-influence" in out and "recomputed by the next" in out, out
    code, out, err = cli_run("check", proj, "--repair")
    assert code == 0, err
    code, again2, err = cli_run("self-influence", proj, "--estimator", "ekfac", "-k", "5")
    assert code == 0 and again2 == first


# -- a read-only project folder (item 8) -------------------------------------------------------------
# The suite runs as root, whom file modes do not stop: the reader then runs without the capabilities
# that let root past them (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER, dropped from its
# bounding set before exec), so a folder made read-only with chmod refuses it as it refuses any user.
DROP_DAC = (1, 2, 3)  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
PR_CAPBSET_DROP = 24


def _as_reader():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in DROP_DAC:
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


READER = """
import contextlib, io, json, sys
from inflq.cli import main
out = []
for args in json.loads(sys.argv[1]):
    o, e, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
        try:
            main(args)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    out.append([code, o.getvalue(), e.getvalue()])
print(json.dumps(out))
"""


def _reader(*commands, code=None):
    """Run ``code``, or each command (a list of CLI arguments) through inflq's entry point, in one
    process without write access; returns the CompletedProcess, or ``[(exit code, stdout, stderr)]``."""
    import subprocess
    import sys

    argv = [sys.executable, "-c", code] if code else [sys.executable, "-c", READER, json.dumps([[str(a) for a in c] for c in commands])]
    got = subprocess.run(argv, capture_output=True, text=True, preexec_fn=_as_reader if os.geteuid() == 0 else None,
                         env={**os.environ, "COLUMNS": "200", "INFLQ_PROGRESS": "0"}, timeout=600)
    if code:
        return got
    assert got.returncode == 0, got.stderr[-3000:]
    return [tuple(r) for r in json.loads(got.stdout)]


def _tree(root):
    return {str(f.relative_to(root)): (f.stat().st_mode, f.read_bytes()) for f in sorted(root.rglob("*")) if f.is_file()}


@pytest.fixture
def readonly(proj, cli_run):
    """The project after a write (so that the catalog is current), then chmod -R a-w."""
    try:
        probe = _reader(code="print(1)")
    except OSError as exc:  # pragma: no cover - a container without CAP_SETPCAP
        pytest.skip(f"cannot run a reader without write access here: {exc}")
    assert probe.returncode == 0, probe.stderr
    for f in [proj, *proj.rglob("*")]:
        f.chmod(f.stat().st_mode & ~0o222)
    yield proj
    for f in [proj, *proj.rglob("*")]:
        f.chmod(f.stat().st_mode | 0o200)


@pytest.mark.slow
def test_a_read_only_project_can_be_read_and_refuses_writes(readonly, tmp_path, cli_run, monkeypatch):
    import shutil

    root = readonly
    check = _reader(code=f"import os; print(os.access({str(root)!r}, os.W_OK)); open({str(root / 'x')!r}, 'w')")
    assert check.stdout.split() == ["False"] and "Permission denied" in check.stderr, "the reader really cannot write"
    writable = tmp_path / "writable"
    shutil.copytree(root, writable)  # the same project, writable, for the expected outputs
    for f in [writable, *writable.rglob("*")]:
        f.chmod(f.stat().st_mode | 0o200)
    before = _tree(root)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    reads = [["top", "{}", "-k", "3"], ["top", "{}", "--by", "source"], ["runs", "{}"], ["query", "list", "{}"], ["factors", "list", "{}"],
             ["show", "{}", "d4:0"], ["investigation", "list", "{}"], ["attribute", "{}", "--query", "2", "--sequence", "d4:0"],
             ["check", "{}"], ["export", "{}", "-o", str(out_dir / "m.npy")], ["pack", "{}", str(out_dir / "p.tar")]]
    writes = [["query", "add", "{}", "the red cat", "runs"], ["run", "{}", "--estimator", "identity"], ["investigation", "add", "{}", "x"]]
    got = _reader(*[[str(root) if a == "{}" else a for a in c] for c in reads + writes])
    monkeypatch.setenv("COLUMNS", "200")
    for args, (code, out, err) in zip(reads, got):
        assert code == 0, (args, err)
        if args[0] in ("export", "pack"):
            continue
        want_code, want, want_err = cli_run(*[str(writable) if a == "{}" else a for a in args])
        assert want_code == 0, want_err
        assert out == want.replace(str(writable), str(root)), (args, out, want)
    np.testing.assert_array_equal(np.load(out_dir / "m.npy"), _matrix(cli_run, writable, "default"))
    assert (out_dir / "p.tar").stat().st_size > 0
    # Writes keep a clear one-line refusal.
    for args, (code, _out, err) in zip(writes, got[len(reads):]):
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 1 and len(lines) == 1 and lines[0].startswith("Error: ") and "read-only" in lines[0], (args, err)
    assert _tree(root) == before, "reading wrote nothing"


def test_a_read_only_copy_with_commits_in_its_wal_or_of_an_older_inflq_is_read(proj, cli_run, tmp_path):
    """A folder copied while its catalog had commits in the WAL (no -shm beside it), and a catalog
    from before a migration: read from a private copy, the folder left as it is."""
    import sqlite3

    conn = sqlite3.connect(proj / "catalog.db")
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    conn.execute("UPDATE queries SET notes = 'only in the WAL' WHERE id = 2")
    conn.commit()
    conn.execute("DELETE FROM _sqlite_migrations WHERE name = '0007_self_influence'")  # as an older inflq left it
    conn.execute("DROP TABLE self_influence")
    conn.commit()
    copy = tmp_path / "copied"
    copy.mkdir()
    for name in ("inflq.toml", "catalog.db", "catalog.db-wal"):  # no -shm: as a copy after a crash
        (copy / name).write_bytes((proj / name).read_bytes())
    conn.close()
    assert (copy / "catalog.db-wal").stat().st_size > 0
    import shutil

    shutil.copytree(proj / "corpus", copy / "corpus")
    shutil.copytree(proj / "artifacts", copy / "artifacts")
    (copy / "inflq.toml").write_text((proj / "inflq.toml").read_text().replace('"../', f'"{proj.parent}/'))
    for f in [copy, *copy.rglob("*")]:
        f.chmod(f.stat().st_mode & ~0o222)
    try:
        before = _tree(copy)
        (code, out, err), (code2, out2, err2) = _reader(["query", "list", copy, "--json"], ["top", copy, "-k", "2", "--json"])
        assert code == 0, err
        assert [q["notes"] for q in json.loads(out) if q["id"] == 2] == ["only in the WAL"]
        assert code2 == 0 and json.loads(out2)[0]["query"]["id"] == 2, err2
        assert _tree(copy) == before
    finally:
        for f in [copy, *copy.rglob("*")]:
            f.chmod(f.stat().st_mode | 0o200)
