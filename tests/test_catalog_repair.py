"""A damaged catalog (issue 25, item 13): a copy is kept after every completed run, and
`inflq check --repair` restores the newest good one, says exactly which runs, result sets and
queries it lacks, and re-links the factor sets whose files are on disk."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from helpers import cli_ok, make_model_dir, write_corpus


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory):
    """Runs 1 (identity, query 1), 2 (ekfac, queries 1-2) and 3 (kfac, queries 1-3) through the
    CLI; each completed run left a copy of the catalog in backups/."""
    base = tmp_path_factory.mktemp("repair")
    model = make_model_dir(base / "model", "gpt2")
    corpus = write_corpus(base / "corpus.jsonl")
    root = base / "proj"

    cli = cli_ok
    cli("init", root, "--model", model, "--corpus", corpus)
    cli("query", "add", root, "the first president of astrobia was", "zorald pfaff")
    cli("run", root, "--estimator", "identity", "--top-k", "3")
    cli("query", "add", root, "the red cat runs", "with the dog")
    cli("run", root, "--estimator", "ekfac", "--top-k", "3")
    cli("query", "add", root, "we walk by the river", "in summer")
    cli("run", root, "--estimator", "kfac", "--top-k", "3")
    import gc
    import sqlite3

    gc.collect()  # the in-process commands' connections; then everything into catalog.db, as after a process exits
    conn = sqlite3.connect(root / "catalog.db")
    assert conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
    conn.close()
    return root


@pytest.fixture
def proj(three_runs, tmp_path):
    dst = tmp_path / "proj"
    shutil.copytree(three_runs, dst)
    for name in ("model", "corpus.jsonl"):
        (tmp_path / name).symlink_to(three_runs.parent / name)
    return dst


def _one_line_error(code, err, *needles):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def test_a_copy_is_kept_after_each_completed_run_and_rotated(proj):
    from inflq.backups import KEEP

    copies = sorted(p.name for p in (proj / "backups").glob("catalog-*.db"))
    assert len(copies) == KEEP == 3
    assert [c.rsplit("-", 2)[-2:] for c in copies] == [["run", "1.db"], ["run", "2.db"], ["run", "3.db"]]


@pytest.mark.parametrize("damage", ["truncated", "random"])
def test_check_repair_restores_the_newest_good_copy_and_says_what_it_lacks(proj, cli_run, damage):
    # The copy after run 3 was never written (the catalog broke before it): run 3 is what is lost.
    (newest,) = [p for p in (proj / "backups").glob("catalog-*-run-3.db")]
    newest.unlink()
    db = proj / "catalog.db"
    size = db.stat().st_size
    if damage == "truncated":
        os.truncate(db, size // 2)
    else:
        db.write_bytes(os.urandom(size))
    for extra in ("catalog.db-wal", "catalog.db-shm"):
        (proj / extra).unlink(missing_ok=True)
    code, out, err = cli_run("top", proj)
    _one_line_error(code, err, "cannot open the catalog", f"inflq check {proj} --repair")
    code, out, err = cli_run("check", proj)
    _one_line_error(code, err, "is damaged", "--repair")

    code, out, err = cli_run("check", proj, "--repair")
    assert code == 0, err
    assert "restored the catalog from catalog-" in out and "-run-2.db" in out
    assert (proj / "catalog.db").exists() and list(proj.glob("catalog.db.damaged-*")), "the damaged file is kept aside"
    lacks = [line for line in out.splitlines() if line.startswith("lacks ")]
    assert lacks[0].startswith("lacks run 3 (kfac / all, investigation 'default') and its result set, which scored queries 1, 2, 3"), out
    assert "artifacts/runs/3/" in lacks[0]  # the run's folder, its score matrix inside
    assert lacks[1].startswith("lacks query 3 ('we walk by the river' → 'in summer', investigation 'default')"), out
    assert len(lacks) == 2
    relinked = [line for line in out.splitlines() if line.startswith("re-linked ")]
    assert len(relinked) == 1 and "artifacts/factors/kfac-" in relinked[0], out
    assert "all artifacts verify" in out

    # What the copy holds is back; the kfac factors are usable again without a fit.
    code, out, err = cli_run("runs", proj)
    assert code == 0 and "│ kfac " not in out and "│ ekfac " in out, out
    code, out, err = cli_run("factors", "list", proj, "--json")
    sets = json.loads(out)
    assert sorted(s["estimator"] for s in sets) == ["ekfac", "kfac"]
    kfac = next(s for s in sets if s["estimator"] == "kfac")
    assert kfac["num_sequences"] == 24 and kfac["current_model"]
    code, out, err = cli_run("query", "add", proj, "we walk by the river", "in summer")
    assert code == 0, err
    code, out, err = cli_run("run", proj, "--estimator", "kfac", "--top-k", "3")
    assert code == 0, err
    code, out, err = cli_run("factors", "list", proj, "--json")
    assert [s for s in json.loads(out) if s["estimator"] == "kfac"] == [{**kfac, "runs": 1}], "the re-linked set was reused, not refitted"


def test_repair_without_a_good_copy_says_so(proj, cli_run):
    shutil.rmtree(proj / "backups")
    for old in proj.glob("catalog.db.bak-*"):
        old.unlink()
    (proj / "catalog.db").write_bytes(b"not a database at all")
    code, out, err = cli_run("check", proj, "--repair")
    _one_line_error(code, err, "no good copy of the catalog")
    assert (proj / "catalog.db").read_bytes() == b"not a database at all", "nothing was moved"
