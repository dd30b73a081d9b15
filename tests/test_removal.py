"""Removing things: an investigation after runs, validations and LDS leaves no row and no file of
it behind; a run, a query; the order of rows and files (a crash between them leaves only orphans,
which `inflq check` reports and `inflq gc` reclaims); editing a query makes its old results stale."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import make_model_dir, write_corpus  # noqa: E402
from inflq import Monitor, catalog, layout  # noqa: E402
from inflq.display import size_text  # noqa: E402
from inflq.errors import Cancelled, InflqError  # noqa: E402
from inflq.project import Project  # noqa: E402
from inflq.queries import add_query  # noqa: E402

QUERIES = [
    ("the first president of astrobia was", "zorald pfaff"),
    ("people eat bread and", "cheese"),
    ("the red cat runs with the", "big dog"),
]


@pytest.fixture
def proj(tmp_path) -> Path:
    """A tiny project (16 sequences, one GPT-2 block of width 8) whose `default` investigation has a
    finished run: what removing another investigation must leave alone."""
    model = make_model_dir(tmp_path / "model", "gpt2", width=8, layers=1, seed=0)
    p = Project.init(tmp_path / "project", model, write_corpus(tmp_path / "corpus.jsonl", n=16))
    from inflq.runs import RunSettings, run_investigation

    add_query(p, "default", *QUERIES[0])
    run_investigation(p, "default", RunSettings(estimator="identity", filter="all"))
    p.close()
    return tmp_path / "project"


def _files(root: Path) -> set[str]:
    return {f.relative_to(root).as_posix() for f in (root / layout.ARTIFACTS).rglob("*") if f.is_file()}


def _rows(p: Project) -> dict[str, list[dict]]:
    """Every row of every core table, by table."""
    tables = [t for t in p.db.table_names() if t not in ("_sqlite_migrations", "sequences", "file_hashes", "meta")]
    return {t: list(p.db[t].rows) for t in tables}


def _cancel_during(phase: str, after: int = 8) -> Monitor:
    """A monitor that cancels once ``after`` sequences of ``phase`` are done (two shards of 4)."""
    monitor = Monitor()

    def on_progress(ev):
        if ev.phase == phase and ev.done >= after:
            monitor.cancel()

    monitor.on_progress = on_progress
    return monitor


@pytest.mark.slow  # two runs, a PBRF validation and four retrainings
def test_investigation_rm_after_run_validate_and_lds_leaves_nothing_behind(proj, cli_run):
    """The issue's bug, through the CLI: after `run`, `validate` and `validate --lds` (and a run
    cancelled while fitting, which keeps fitting shards), `investigation rm` succeeds and leaves no
    row and no file of the investigation; the other investigation's run is untouched, and
    `inflq check` finds nothing wrong and no orphan."""
    from inflq.runs import RunSettings, run_investigation

    p = Project.open(proj)
    before_rows, before_files = _rows(p), _files(proj)
    p.close()
    assert cli_run("investigation", "add", proj, "x")[0] == 0
    for prompt, completion in QUERIES:
        assert cli_run("query", "add", proj, prompt, completion, "-i", "x")[0] == 0
    code, out, err = cli_run("run", proj, "-i", "x", "--estimator", "ekfac", "--filter", "all", "--shard-size", "4")
    assert code == 0, err
    # A run cancelled while fitting keeps its committed fitting shards (rows and files).
    p = Project.open(proj)
    with pytest.raises(Cancelled):
        run_investigation(p, "x", RunSettings(estimator="kfac", filter="all", shard_size=4, seed=5), monitor=_cancel_during("covariance"))
    cancelled = catalog.latest_run_id(p.db)
    assert catalog.fit_shards(p.db, cancelled) and layout.fit_files(proj, cancelled)
    p.close()
    code, out, err = cli_run("validate", proj, "-i", "x", "--estimators", "identity", "--sample", "4", "--fit-sequences", "8",
                             "--pbrf-steps", "5", "--queries", "1", "--max-minutes", "5")
    assert code == 0, err
    code, out, err = cli_run("validate", proj, "-i", "x", "--lds", "--subsets", "4", "--estimators", "identity",
                             "--trainer", "adamw:epochs=1,batch_size=4,threads=1")
    assert code == 0, err
    p = Project.open(proj)
    x = catalog.investigation(p.db, "x")["id"]
    assert {r["method"] for r in p.db["validations"].rows_where("investigation_id = ?", [x])} == {"pbrf", "lds"}
    assert p.db["lds_subsets"].count == 4 and p.db["fit_shards"].count > 0
    runs = [r["id"] for r in catalog.runs_of(p.db, x)]
    assert all((proj / layout.run_folder(r)).is_dir() for r in runs)
    p.close()

    code, out, err = cli_run("investigation", "rm", proj, "x", "--yes")
    assert code == 0, err
    assert "deleted 'x' (2 runs" in out
    p = Project.open(proj)
    after = _rows(p)
    p.close()
    # Factor sets are the project's cache, keyed by model, data and settings, not by investigation:
    # the one x's run fitted stays for the next run that needs it (`inflq factors rm` removes it).
    kept = [r for r in after["factor_sets"] if r not in before_rows["factor_sets"]]
    assert [r["estimator"] for r in kept] == ["ekfac"]
    assert {**after, "factor_sets": before_rows["factor_sets"]} == before_rows  # no other row of x, its queries or runs
    assert _files(proj) == before_files | {kept[0]["path"]}  # every file of the investigation is gone, the rest stays
    assert not any((proj / layout.run_folder(r)).exists() for r in runs)
    code, out, err = cli_run("check", proj)
    assert code == 0, err
    assert "no orphaned files" in out


def test_rows_go_first_so_a_crash_leaves_only_orphans_that_gc_reclaims(proj, cli_run, monkeypatch):
    """Removal commits the rows and then removes the files: killed in between, the project opens as
    usual with no row naming a missing file; `check` lists the orphans and says whose they were,
    `gc` reclaims them and says how much, and a new run gets a new id and a clean folder."""
    from inflq import removal

    p = Project.open(proj)
    run = catalog.latest_run_id(p.db)
    gone = sorted(f for f in _files(proj) if layout.run_of(f) == run)
    size = sum((proj / f).stat().st_size for f in gone)
    assert layout.score_matrix(run) in gone and layout.query_gradients(run) in gone and layout.candidates(run) in gone

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies after the rows' transaction committed

    monkeypatch.setattr(removal, "remove_files", crash)
    with pytest.raises(KeyboardInterrupt):
        removal.remove_run(p, run)
    monkeypatch.undo()
    p.close()
    assert sorted(f for f in _files(proj) if layout.run_of(f) == run) == gone
    # Just written (as a file a process is about to record would be): reported, not removed.
    code, out, err = cli_run("check", proj)
    assert code == 0 and f"orphaned file {layout.candidates(run)}" in out and "kept, a process may be about to record it" in out
    code, out, err = cli_run("gc", proj)
    assert code == 0, err
    assert "freed 0 B" in out and f"kept {len(gone)} orphaned files" in out
    old = 3600
    for f in gone:
        st = (proj / f).stat()
        os.utime(proj / f, (st.st_atime - old, st.st_mtime - old))
    code, out, err = cli_run("check", proj)
    assert code == 1
    assert f"orphaned file {layout.candidates(run)}" in out and f"a file of run {run}, which was removed" in out
    assert f"{len(gone)} orphaned files" in err and "inflq gc" in err
    # An archive does not pass them on.
    import tarfile

    code, out, err = cli_run("pack", proj, proj.parent / "shared.tar")
    assert code == 0, err
    with tarfile.open(proj.parent / "shared.tar") as tf:
        names = tf.getnames()
    assert layout.CATALOG in names and not any(layout.run_of(n) == run for n in names)
    code, out, err = cli_run("gc", proj, "--dry-run")
    assert code == 0 and f"would free {size_text(size)} in {len(gone)} files" in out
    code, out, err = cli_run("gc", proj)
    assert code == 0, err
    assert f"freed {size_text(size)}: removed {len(gone)} orphaned files (of run {run}) and 1 empty folder" in out
    assert not (proj / layout.run_folder(run)).exists()
    code, out, err = cli_run("check", proj)
    assert code == 0 and "no orphaned files" in out
    assert cli_run("gc", proj)[1].startswith("no orphaned files: nothing to free")
    # The removed run's id is never given again.
    from inflq.runs import RunSettings, run_investigation

    p = Project.open(proj)
    assert run_investigation(p, "default", RunSettings(estimator="identity", filter="all")).run_id == run + 1
    p.close()


def test_a_new_run_never_reads_a_removed_runs_leftover_folder(proj):
    """A run removed by an older inflq could leave its folder under an id SQLite gives again: the
    new run starts from an empty folder, not from the old candidates."""
    import numpy as np
    import torch

    from inflq.artifacts import save_tensors
    from inflq.runs import RunSettings, run_investigation

    p = Project.open(proj)
    nxt = catalog.latest_run_id(p.db) + 1
    save_tensors(proj, layout.candidates(nxt), {"indices": torch.tensor([0]), "mask": torch.ones((1, 1), dtype=torch.uint8)})
    res = run_investigation(p, "default", RunSettings(estimator="identity", filter="all"))
    assert res.run_id == nxt
    m = np.isfinite(__import__("inflq.reading", fromlist=["score_matrix"]).score_matrix(p, "default", res.result_set_id))
    assert m.sum() == 16  # every sequence scored, not the one the stale candidate list held
    p.close()


def test_orphans_follow_the_runs_that_own_their_folders(proj):
    """In a finished run's folder a file no row names is an orphan (its candidate list is not); an
    unfinished run owns its whole folder; a factor set's file whose row is gone is an orphan."""
    from inflq.removal import orphans

    p = Project.open(proj)
    done = catalog.latest_run_id(p.db)
    stray = layout.fit_shard(done, "0", 0)
    (proj / stray).write_bytes(b"left by a kill between commit and cleanup")
    assert [(o.path, o.why) for o in orphans(p)] == [(stray, f"left behind by run {done}, which no longer needs it")]
    catalog.update_run(p.db, done, phase="scoring")
    with p.db.atomic():
        p.db.execute("UPDATE runs SET status = 'cancelled' WHERE id = ?", [done])
    assert orphans(p) == []  # a resume rewrites or clears what the unfinished run left
    (proj / stray).unlink()
    fs_path = layout.factor_set("ekfac", "0" * 24)
    (proj / fs_path).parent.mkdir(parents=True, exist_ok=True)
    (proj / fs_path).write_bytes(b"x" * 10)
    (proj / (fs_path + ".tmp")).write_bytes(b"y")
    assert [(o.path, o.size) for o in orphans(p)] == [(fs_path, 10), (fs_path + ".tmp", 1)]
    assert [o.why for o in orphans(p)] == ["named by no catalog row (its row was removed)", "a leftover of an interrupted write"]
    p.close()


def test_runs_rm(proj, cli_run):
    p = Project.open(proj)
    run = catalog.latest_run_id(p.db)
    rs = catalog.result_set_of_run(p.db, run)["id"]
    p.close()
    code, out, err = cli_run("runs", proj)  # listing is still the bare command
    assert code == 0 and "identity" in out
    code, out, err = cli_run("runs", "rm", proj, "99", "--yes")
    assert code == 1 and "no run 99" in err
    p = Project.open(proj)
    catalog.restart_run(p.db, run)  # marked running, as a killed process leaves it
    p.close()
    code, out, err = cli_run("runs", "rm", proj, str(run), "--yes")
    assert code == 1 and "is running" in err and "--force" in err
    code, out, err = cli_run("runs", "rm", proj, str(run), "--yes", "--force")
    assert code == 0, err
    assert f"removed run {run}: 4 files" in out
    p = Project.open(proj)
    assert catalog.get_run(p.db, run) is None and catalog.get_result_set(p.db, rs) is None
    assert p.db["results"].count == 0 and p.db["run_shards"].count == 0
    assert not (proj / layout.run_folder(run)).exists()
    p.close()
    code, out, err = cli_run("check", proj)
    assert code == 0 and "no orphaned files" in out


def test_query_edit_makes_old_results_stale_and_rm_removes_its_rows(proj, cli_run):
    from inflq.runs import RunSettings, run_investigation

    p = Project.open(proj)
    qid = catalog.queries(p.db, "default")[0]["id"]
    old_rs = catalog.result_sets_of(p.db)[-1]["id"]
    p.close()
    # Tags and notes change nothing measured.
    code, out, err = cli_run("query", "edit", proj, str(qid), "--tag", "facts", "--notes", "checked")
    assert code == 0 and "stale" not in out
    code, out, err = cli_run("top", proj, "--json")
    assert json.loads(out)[0]["stale"] is False and "facts" in json.dumps(json.loads(out)[0]["query"]["tags"])
    code, out, err = cli_run("query", "edit", proj, str(qid), "--notes", "checked")
    assert code == 1 and "already reads so" in err
    code, out, err = cli_run("query", "edit", proj, str(qid), "--completion", "")
    assert code == 1 and "completion is empty" in err
    # A new completion: the old result set is stale for it, in `top` and its JSON.
    code, out, err = cli_run("query", "edit", proj, str(qid), "--completion", "velmora")
    assert code == 0, err
    assert f"result set {old_rs} scored it before the edit" in out
    code, out, err = cli_run("top", proj)
    assert code == 0 and "STALE: query edited after this result set scored it" in out
    assert json.loads(cli_run("top", proj, "--json")[1])[0]["stale"] is True
    p = Project.open(proj)
    assert catalog.query(p.db, qid)["completion"] == "velmora" and catalog.query(p.db, qid)["edited_at"]
    new = run_investigation(p, "default", RunSettings(estimator="identity", filter="all"))
    assert catalog.stale_queries(p.db, new.result_set_id) == set() and catalog.stale_queries(p.db, old_rs) == {qid}
    # An unfinished run would mix the old and the new query on resume: edits and removal wait for it.
    with pytest.raises(Cancelled):
        run_investigation(p, "default", RunSettings(estimator="identity", filter="all", shard_size=4), monitor=_cancel_during("scoring"))
    cancelled = catalog.latest_run_id(p.db)
    p.close()
    assert json.loads(cli_run("top", proj, "--json")[1])[0]["stale"] is False  # the latest result set is fresh
    code, out, err = cli_run("query", "edit", proj, str(qid), "--prompt", "the capital of astrobia is")
    assert code == 1 and f"run {cancelled} of its investigation is unfinished" in err
    code, out, err = cli_run("query", "rm", proj, str(qid), "--yes")
    assert code == 1 and "unfinished" in err
    assert cli_run("runs", "rm", proj, str(cancelled), "--yes")[0] == 0
    code, out, err = cli_run("query", "rm", proj, str(qid), "--yes")
    assert code == 0, err
    p = Project.open(proj)
    assert catalog.queries(p.db, "default") == [] and p.db["results"].count == 0 and p.db["stale_results"].count == 0
    p.close()
    code, out, err = cli_run("query", "rm", proj, str(qid), "--yes")
    assert code == 1 and f"no query with id {qid}" in err


def test_removing_an_investigation_keeps_lds_subsets_another_one_uses(proj):
    """Identical queries share an LDS study: removing one investigation keeps the retrained subsets
    the other's validation names."""
    p = Project.open(proj)
    for name in ("a", "b"):
        catalog.create_investigation(p.db, name)
    ids = {n: catalog.investigation(p.db, n)["id"] for n in ("a", "b")}
    catalog.insert_lds_subset(p.db, "shared", 0, 8, "sha", [0.0], 1.0, ids["a"])
    catalog.insert_lds_subset(p.db, "only-a", 0, 8, "sha", [0.0], 1.0, ids["a"])
    catalog.insert_lds_subset(p.db, "legacy", 0, 8, "sha", [0.0], 1.0, None)  # from before subsets said whose they were
    catalog.insert_validation(p.db, [{"investigation_id": ids["b"], "estimator": "identity", "method": "lds", "settings": json.dumps({"study": "shared"})}])
    catalog.insert_validation(p.db, [{"investigation_id": ids["a"], "estimator": "identity", "method": "lds", "settings": json.dumps({"study": "legacy"})}])
    p.delete_investigation("a")
    assert sorted(r["study"] for r in p.db["lds_subsets"].rows) == ["shared"]
    p.delete_investigation("b")
    assert p.db["lds_subsets"].count == 0 and p.db["validations"].count == 0
    with pytest.raises(InflqError, match="no investigation"):
        p.delete_investigation("b")
    p.close()
