"""Start-up and the defaults a user gets: light imports, thread pools that sleep, token budgets,
progress lines when output is not a terminal (issue 12)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from inflq.batching import Batching, auto_batching, bytes_per_token
from inflq.progress import LineProgress, ProgressEvent
from inflq.queries import add_query

HEAVY = ("torch", "transformers", "sklearn", "scipy", "textual", "safetensors", "pandas")
PROBE = (
    "import sys\n"
    "from inflq.cli import main\n"
    "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
    f"print('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)\n"
)


def _heavy_modules(*args: str) -> tuple[list[str], str]:
    env = {k: v for k, v in os.environ.items() if k != "INFLQ_LOAD_PLUGINS"}  # every plugin loads, as for users
    p = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=env, timeout=300)
    line = [x for x in p.stderr.splitlines() if x.startswith("HEAVY=")][-1]
    return [m for m in line[len("HEAVY="):].split(",") if m], p.stdout + p.stderr


def test_help_loads_every_plugin_without_heavy_libraries():
    heavy, out = _heavy_modules("--help")
    assert "search-depth" in out and "checkpoint" in out  # the built-ins' commands are there
    assert heavy == [], out


def test_reading_commands_open_a_project_without_heavy_libraries(project, cli_run):
    add_query(project, "default", "the first president of astrobia was", "zorald pfaff")
    for args in (["runs", str(project.root)], ["query", "list", str(project.root)], ["investigation", "list", str(project.root)]):
        heavy, out = _heavy_modules(*args)
        assert "Error" not in out, out
        assert heavy == [], (args, out)


def test_the_tui_paints_before_loading_heavy_libraries():
    code = f"import sys, inflq.tui.app; print(','.join(m for m in {HEAVY!r} if m in sys.modules and m != 'textual'))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "", p.stdout + p.stderr


@pytest.mark.slow  # a fresh interpreter imports torch and transformers
def test_threads_load_the_tokenizer_and_model_at_once_in_a_fresh_interpreter(project):
    """transformers 5.x's lazy imports are not thread-safe ("cannot import name 'AutoTokenizer'");
    a notebook's or the TUI's threads loading tokenizers, configs and models at the same moment,
    before transformers was ever imported, all succeed, and one project's runtime loads one tokenizer."""
    code = (
        "import sys, threading\n"
        "from inflq.modeling import load_tokenizer, load_model, pick_device\n"
        "from inflq.project import Project\n"
        "assert 'transformers' not in sys.modules\n"
        "project = Project.open(sys.argv[1]); path = project.model_path\n"
        "start, errors, tokenizers = threading.Barrier(8), [], []\n"
        "def go(i):\n"
        "    start.wait()\n"
        "    try:\n"
        "        if i % 4 == 0: load_model(path, pick_device('cpu'), None)\n"
        "        elif i % 4 == 1: load_tokenizer(path)\n"
        "        else: tokenizers.append(project.runtime.tokenizer)\n"
        "    except BaseException as exc:\n"
        "        errors.append(repr(exc))\n"
        "threads = [threading.Thread(target=go, args=(i,)) for i in range(8)]\n"
        "[t.start() for t in threads]; [t.join() for t in threads]\n"
        "print('ERRORS', errors, 'TOKENIZERS', len({id(t) for t in tokenizers}))\n"
    )
    p = subprocess.run([sys.executable, "-c", code, str(project.root)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "ERRORS [] TOKENIZERS 1" in p.stdout, p.stdout + p.stderr[-2000:]


def test_pandas_still_imports_after_inflq():
    """sqlite-utils is imported with pandas hidden (inflq/startup.py); pandas itself is untouched."""
    code = "import inflq, sqlite_utils, pandas; print(pandas.DataFrame({'a': [1]}).shape, sqlite_utils.db.pd)"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.stdout.split() == ["(1,", "1)", "None"], p.stdout + p.stderr


def test_importing_inflq_lets_torch_workers_sleep():
    code = "import os, inflq, torch; print(os.environ.get('OMP_WAIT_POLICY'))"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env).stdout.strip() == "PASSIVE"
    mine = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**env, "OMP_WAIT_POLICY": "ACTIVE"})
    assert mine.stdout.strip() == "ACTIVE"  # the user's choice wins
    late = "import os, torch, inflq; print(os.environ.get('OMP_WAIT_POLICY'))"  # too late once torch is loaded
    assert subprocess.run([sys.executable, "-c", late], capture_output=True, text=True, env=env).stdout.strip() == "None"


# -- batches by a token budget ----------------------------------------------------------------------
def test_batching_fills_a_token_budget_in_length_order():
    lengths = np.array([2, 3, 3, 5, 8, 8, 30])
    b = Batching(tokens=16)
    cuts, pos = [], 0
    while pos < len(lengths):
        end = b.end(lengths, pos)
        cuts.append(end)
        # padded size within budget, or a single sequence longer than it
        assert (end - pos) * lengths[end - 1] <= 16 or end - pos == 1
        if end < len(lengths):  # one more would not have fit
            assert (end + 1 - pos) * lengths[end] > 16
        pos = end
    assert cuts == [3, 5, 6, 7]
    assert Batching(tokens=1000, sequences=2).end(lengths, 0) == 2  # a sequence cap holds too
    assert Batching.of(3) == Batching(sequences=3)  # --batch-size N: N sequences, as before
    assert Batching(tokens=64, sequences=40).halved(10) == Batching(tokens=32, sequences=5)
    with pytest.raises(ValueError):
        Batching()


def test_auto_batching_follows_the_model_and_the_memory(project):
    from transformers import GPT2Config, GPT2LMHeadModel

    from inflq import GradientEngine
    from inflq.engine import select_modules

    small = project.runtime.engine()
    roomy = auto_batching(small, 64, memory=8 << 30)
    assert roomy.tokens == 4096  # a tiny model on a CPU: the CPU's token target
    tight = auto_batching(small, 64, memory=bytes_per_token(small, 64) * 2 * 100)
    assert tight.tokens == 100
    assert auto_batching(small, 64, memory=1).tokens == 64  # never below one whole sequence
    wide = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=50257, n_positions=256))
    engine = GradientEngine(wide, select_modules(wide, "all"))
    # a 50k vocabulary costs ~0.8 MB a token: 1 GB holds about 600 tokens, not 4096
    assert 256 <= auto_batching(engine, 256, memory=1 << 30).tokens < 1000


def test_a_run_records_the_batching_it_chose_and_an_override_is_kept(project):
    from inflq.runs import RunSettings, run_investigation

    add_query(project, "default", "the first president of astrobia was", "zorald pfaff")
    monitor_notes = []
    from inflq.progress import Monitor

    r = run_investigation(project, "default", RunSettings(estimator="identity"), Monitor(on_note=monitor_notes.append))
    row = project.db["runs"].get(r.run_id)
    recorded = json.loads(row["settings"])
    assert recorded["batch_tokens"] == 4096 and recorded["batch_size"] >= 1
    assert any("4096 tokens" in n for n in monitor_notes)
    r2 = run_investigation(project, "default", RunSettings(estimator="identity", batch_size=3))
    recorded2 = json.loads(project.db["runs"].get(r2.run_id)["settings"])
    assert recorded2["batch_size"] == 3 and recorded2["batch_tokens"] is None
    from inflq.reading import score_matrix

    np.testing.assert_allclose(score_matrix(project, "default", r.result_set_id), score_matrix(project, "default", r2.result_set_id), rtol=2e-5, atol=1e-6)


# -- progress lines without a terminal ----------------------------------------------------------------
def test_line_progress_writes_every_interval_and_closes_long_phases():
    now = [0.0]
    out: list[str] = []
    lp = LineProgress(out.append, interval=5, clock=lambda: now[0])
    lp.note("batches: at most 4096 tokens per batch")

    def ev(done, t, phase="covariance", total=100, started=0.0):
        now[0] = t
        lp(ProgressEvent(phase, done, total, t - started))

    ev(0, 0.0)
    ev(10, 2.0)
    assert out == []  # nothing in the first seconds
    ev(30, 6.0)
    assert out == ["inflq: batches: at most 4096 tokens per batch", "inflq: covariance 30/100 (30%), 5.0/s, 6.0 s elapsed, eta 14 s"]
    ev(40, 8.0)
    assert len(out) == 2
    ev(100, 20.0)
    assert out[-1] == "inflq: covariance done: 100 in 20 s (5.0/s)"
    ev(0, 20.0, "scoring", started=20.0)
    ev(5, 21.0, "scoring", total=5, started=20.0)
    assert len(out) == 3  # a quick phase leaves no line


def test_run_without_a_terminal_prints_progress_lines(project, cli_run, monkeypatch):
    add_query(project, "default", "the first president of astrobia was", "zorald pfaff")
    monkeypatch.setenv("INFLQ_PROGRESS_INTERVAL", "0")
    code, out, err = cli_run("run", project.root, "--estimator", "kfac")
    assert code == 0, err
    lines = err.splitlines()
    assert any(line.startswith("inflq: batches: at most") for line in lines), err
    assert any(line.startswith("inflq: covariance done: 24 in") for line in lines), err
    assert any(line.startswith("inflq: scoring") for line in lines), err
