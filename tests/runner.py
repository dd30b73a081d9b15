"""Real ``inflq`` processes to kill mid-run (shared by the resume and Ray tests)."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from helpers import make_model_dir, write_corpus
from inflq.queries import add_query

# The real CLI in a real process. The only change: each shard sleeps ``INFLQ_TEST_SHARD_DELAY``
# seconds first, so that on a fast machine the run is still going when the test kills it.
SLOW_CLI = (
    "import os, sys, time\n"
    "import inflq.runs.workers as runs\n"
    "_run_shard = runs.run_shard\n"
    "def run_shard(*a, **k):\n"
    "    time.sleep(float(os.environ.get('INFLQ_TEST_SHARD_DELAY', '0')))\n"
    "    return _run_shard(*a, **k)\n"
    "runs.run_shard = run_shard\n"
    "from inflq.cli import main\n"
    "main(sys.argv[1:])\n"
)

QUERIES = [
    ("the first president of astrobia was", "zorald pfaff"),
    ("the capital city of astrobia is called", "velmora"),
]


def make_project(base: Path, n: int = 36):
    """A tiny GPT-2 project with two queries; model and corpus sit beside it, so copies of the
    project folder made next to it stay valid."""
    from inflq.project import Project

    model = make_model_dir(base / "model", "gpt2")
    corpus = write_corpus(base / "corpus.jsonl", n=n)
    p = Project.init(base / "proj", model, corpus)
    for prompt, completion in QUERIES:
        add_query(p, "default", prompt, completion)
    return p


def copy_project(src: Path, name: str) -> Path:
    dst = src.parent / name
    shutil.copytree(src, dst)
    return dst


def start_cli(*args: str, delay: float = 0.25, env: dict | None = None) -> subprocess.Popen:
    e = {**os.environ, "INFLQ_TEST_SHARD_DELAY": str(delay), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-c", SLOW_CLI, *map(str, args)], env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def count(project_dir: Path, sql: str) -> int:
    """Read the catalog as another process would (the run commits there as it goes)."""
    try:
        conn = sqlite3.connect(f"file:{project_dir / 'catalog.db'}?mode=ro", uri=True, timeout=5)
        try:
            return int(conn.execute(sql).fetchone()[0] or 0)
        finally:
            conn.close()
    except sqlite3.OperationalError:  # table not created yet, or locked for a moment
        return 0


def wait_until(proc: subprocess.Popen, project_dir: Path, sql: str, at_least: int = 1, timeout: float = 120) -> int:
    """Poll the catalog until ``sql`` counts ``at_least``; fail if the process ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = count(project_dir, sql)
        if n >= at_least:
            return n
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the run ended (rc {proc.returncode}) before {sql!r} reached {at_least}:\n{out}\n{err}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"timed out waiting for {sql!r}")


def kill(proc: subprocess.Popen, sig: int = signal.SIGKILL, timeout: float = 60) -> tuple[int, str, str]:
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def export_npy(cli_run, project_dir: Path, out: Path) -> np.ndarray:
    code, stdout, stderr = cli_run("export", project_dir, "--format", "npy", "-o", out)
    assert code == 0, stderr
    return np.load(out)


def assert_same_scores(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    assert np.array_equal(np.isnan(a), np.isnan(b))
    scale = float(np.nanmax(np.abs(a)))
    assert scale > 0
    np.testing.assert_allclose(np.nan_to_num(b), np.nan_to_num(a), rtol=1e-6, atol=1e-6 * scale)
