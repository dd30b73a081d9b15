"""Runs survive: a real ``inflq run`` killed (SIGKILL) during scoring or during factor fitting, or
cancelled with Ctrl-C (SIGINT), resumes with ``inflq run --resume`` to the scores of an
uninterrupted run, recomputing only the shards that were not committed."""

from __future__ import annotations

import math
import signal

import pytest
from runner import (
    assert_same_scores,
    copy_project,
    count,
    export_npy,
    kill,
    make_project,
    start_cli,
    wait_until,
)

import inflq.runs.workers as runs  # where LocalWorker finds run_shard
from inflq.project import Project
from inflq.reading import score_matrix

N = 36
SHARD = 4
ARGS = ["--shard-size", str(SHARD), "--batch-size", "2", "--rank", "8"]
SHARDS = math.ceil(N / SHARD)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """An uninterrupted run (run 1) and its score matrix; tests copy its project folder."""
    from inflq.cli import main

    base = tmp_path_factory.mktemp("resume")
    p = make_project(base, n=N)
    root = p.root
    p.close()
    try:
        main(["run", str(root), *ARGS])
    except SystemExit as exc:
        assert not exc.code
    p = Project.open(root)
    expected = score_matrix(p, "default")
    p.close()
    return root, expected


@pytest.fixture
def shard_calls(monkeypatch):
    """(phase, sequences) of every shard this process computes."""
    calls: list[tuple[str, int]] = []
    real = runs.run_shard

    def counting(engine, sequences, pass_, shard, *a, **k):
        if not getattr(pass_, "per_module", False):  # not the top-K layer breakdown
            calls.append((pass_.phase, len(shard)))
        return real(engine, sequences, pass_, shard, *a, **k)

    monkeypatch.setattr(runs, "run_shard", counting)
    return calls


def _status(proj, run_id: int) -> str:
    p = Project.open(proj)
    try:
        return p.db["runs"].get(run_id)["status"]
    finally:
        p.close()


@pytest.mark.slow
def test_kill_during_scoring_then_resume(baseline, cli_run, shard_calls, tmp_path):
    src, expected = baseline
    proj = copy_project(src, "kill-scoring")
    proc = start_cli("run", proj, *ARGS)  # run 2 reuses run 1's cached factors
    wait_until(proc, proj, "SELECT count(*) FROM run_shards WHERE run_id = 2")
    rc, _, _ = kill(proc, signal.SIGKILL)
    assert rc == -signal.SIGKILL
    committed = count(proj, "SELECT count(*) FROM run_shards WHERE run_id = 2")
    assert 1 <= committed < SHARDS, "killed mid-way"
    assert _status(proj, 2) == "running"  # a killed process records nothing more

    code, out, err = cli_run("run", proj, "--resume")  # no id: the investigation's interrupted run
    assert code == 0, err
    assert "resuming run 2 (running" in err and "scored sequences" in err, err
    scored = sum(n for phase, n in shard_calls if phase == "scoring")
    assert scored == N - committed * SHARD, "only the shards not committed are recomputed"
    assert _status(proj, 2) == "done"
    assert_same_scores(expected, export_npy(cli_run, proj, tmp_path / "s.npy"))


@pytest.mark.slow
def test_kill_during_fitting_then_resume(baseline, cli_run, shard_calls, tmp_path):
    src, expected = baseline
    proj = copy_project(src, "kill-fitting")
    proc = start_cli("run", proj, *ARGS, "--refit")
    wait_until(proc, proj, "SELECT count(*) FROM fit_shards WHERE run_id = 2")
    kill(proc, signal.SIGKILL)
    committed = count(proj, "SELECT count(*) FROM fit_shards WHERE run_id = 2 AND pass_key = '0:covariance'")
    assert count(proj, "SELECT count(*) FROM run_shards WHERE run_id = 2") == 0, "killed while fitting"
    assert 1 <= committed < SHARDS

    code, out, err = cli_run("run", proj, "--resume", "2")
    assert code == 0, err
    assert f"committed: {committed * SHARD} sequences of the covariance pass in {committed} shard" in err, err
    fitted = sum(n for phase, n in shard_calls if phase == "covariance")
    assert fitted == N - committed * SHARD, "committed covariance shards are reused"
    assert sum(n for phase, n in shard_calls if phase == "eigenvalue correction") == N
    assert count(proj, "SELECT count(*) FROM fit_shards") == 0, "fitting shards are dropped once the factors are saved"
    assert not list((proj / "artifacts" / "runs" / "2").glob("fit-*"))
    assert_same_scores(expected, export_npy(cli_run, proj, tmp_path / "s.npy"))


@pytest.mark.slow
def test_ctrl_c_cancels_then_resume(baseline, cli_run, tmp_path):
    src, expected = baseline
    proj = copy_project(src, "ctrl-c")
    proc = start_cli("run", proj, *ARGS)
    wait_until(proc, proj, "SELECT count(*) FROM run_shards WHERE run_id = 2")
    rc, out, err = kill(proc, signal.SIGINT)
    assert rc != 0
    assert "cancelled" in err and "--resume 2" in err and "committed:" in err, err
    assert _status(proj, 2) == "cancelled"
    assert count(proj, "SELECT count(*) FROM run_shards WHERE run_id = 2") < SHARDS, "stopped within a shard"

    code, out, err = cli_run("run", proj, "--resume", "2")
    assert code == 0, err
    assert _status(proj, 2) == "done"
    assert_same_scores(expected, export_npy(cli_run, proj, tmp_path / "s.npy"))


def test_resume_of_a_finished_run_is_refused(baseline, cli_run):
    src, _ = baseline
    code, out, err = cli_run("run", src, "--resume", "1")
    assert code != 0 and "already complete" in (out + err)
    code, out, err = cli_run("run", src, "--resume")  # nothing interrupted: one line, no guess
    assert code == 1 and err.startswith("Error: investigation 'default' has no interrupted run") and err.count("\n") == 1, err
