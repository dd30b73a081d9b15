"""`inflq validate` as a new user meets it (issue 25, item 6): too small a sample refused or
warned about, progress at every PBRF step, an infeasible sample refused before the costly set-up,
and saved validations read back with `inflq validate list` and `inflq validate show`."""

from __future__ import annotations

import json
import math
import re

import pytest

from helpers import make_model_dir, write_corpus
from inflq import catalog
from inflq.project import Project
from inflq.queries import add_query
from inflq.validations import fisher_ci, mean_correlation_ci

QUERIES = [("the first president of astrobia was", "zorald pfaff"), ("the capital city of astrobia is called", "velmora")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("validate")
    model = make_model_dir(root / "model", "gpt2", width=8, layers=1)
    project = Project.init(root / "project", model, write_corpus(root / "corpus.jsonl", n=12))
    for prompt, completion in QUERIES:
        add_query(project, "default", prompt, completion)
    project.close()
    return root / "project"


def _one_line_error(code, err, *needles):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), err
    for needle in needles:
        assert needle in err, err


def test_a_sample_too_small_for_a_correlation_is_refused(tiny, cli_run):
    for n in ("2", "3"):
        code, out, err = cli_run("validate", tiny, "--sample", n, "--estimators", "identity")
        _one_line_error(code, err, f"--sample {n} is too small", "--sample 8")
        assert out == "", "no per-query correlations printed"


@pytest.fixture(scope="module")
def validated(tiny):
    """One small validation through the CLI, its progress as plain lines at every event:
    ``(exit code, stdout, stderr)``."""
    import contextlib
    import io
    import os

    from inflq.cli import main

    out, err, code = io.StringIO(), io.StringIO(), 0
    env = {"INFLQ_PROGRESS": "lines", "INFLQ_PROGRESS_INTERVAL": "0"}  # a line for every progress event
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main(["validate", str(tiny), "--estimators", "identity,ekfac", "--sample", "4", "--queries", "2",
                  "--pbrf-steps", "3", "--epsilon", "1e-3", "--dampings", "1e-3"])
    except SystemExit as exc:
        code = exc.code
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return code, out.getvalue(), err.getvalue()


def test_a_small_sample_is_warned_about_and_every_step_shows_progress(validated):
    code, out, err = validated
    assert code == 0, err
    flat = " ".join(err.split())  # the warning wraps at the terminal's width
    warning = flat[flat.index("warning: --sample 4"):][:400]
    lo, hi = mean_correlation_ci(0.5, 2, 4)
    assert f"[{lo:.2f}, {hi:.2f}]" in warning and "--sample 8" in warning, warning
    # The PBRF phase advances one step at a time: 2 solves × 4 sequences × 3 steps.
    steps = [int(m.group(1)) for m in re.finditer(r"inflq: PBRF (\d+)/24\b", err)]
    assert steps == list(range(24)), err
    assert "PBRF done: 24" in err
    # The table: each correlation with its 95 % interval.
    assert "pearson [95% CI]" in out and "validation 1: 2 queries × 4 sequences vs PBRF" in out
    assert "saved as validation 1" in out


def test_an_infeasible_sample_is_refused_before_the_costly_set_up(tiny, cli_run, monkeypatch):
    monkeypatch.setenv("INFLQ_PROGRESS", "lines")
    monkeypatch.setenv("INFLQ_PROGRESS_INTERVAL", "0")
    code, out, err = cli_run("validate", tiny, "--estimators", "identity", "--pbrf-steps", "100000", "--max-minutes", "0.01")
    lines = [line for line in err.splitlines() if line.startswith("Error: ")]
    assert code == 1 and len(lines) == 1 and "needs about" in lines[0] and "s per solve × 16" in lines[0], err
    assert "PBRF damping" not in err and "PBRF step size" not in err, "refused after one timed step, before the damping pass"


def test_saved_validations_are_listed_and_shown(tiny, validated, cli_run):
    assert validated[0] == 0, validated[2]
    p = Project.open(tiny)
    vid = catalog.validation_rows(p.db)[0]["validation"]
    saved = {r["estimator"]: r for r in catalog.validation_rows(p.db, vid)}
    # An LDS validation saved as `inflq validate --lds` saves one (without retraining, here).
    inv = catalog.investigation(p.db, "default")["id"]
    lds_id = catalog.insert_validation(p.db, [{
        "investigation_id": inv, "method": "lds", "estimator": "identity", "damping": None, "lds": 0.25, "lds_ci": 0.1, "pearson": 0.3,
        "spearman": 0.25, "fit_seconds": 1.0, "ihvp_seconds": 2.0, "num_queries": 2, "num_sequences": 6,
        "settings": json.dumps({"queries": [1, 2], "subsets": 6, "subset_size": 6, "trainer": "adamw", "per_query": [0.2, 0.3]}),
    }])
    p.close()
    code, out, err = cli_run("validate", "list", tiny, "--json")
    assert code == 0, err
    listed = {v["id"]: v for v in json.loads(out)}
    assert listed[vid]["method"] == "pbrf" and listed[vid]["estimators"] == ["identity", "ekfac", "ekfac:damping=0.001"]
    assert (listed[vid]["num_queries"], listed[vid]["num_sequences"]) == (2, 4) and listed[vid]["investigation"] == "default"
    assert listed[lds_id]["method"] == "lds" and listed[lds_id]["estimators"] == ["identity"]
    code, out, err = cli_run("validate", "list", tiny)
    assert code == 0 and "2 queries × 4 sequences" in out and "2 queries × 6 subsets" in out, out
    code, out, err = cli_run("validate", "show", tiny, str(vid))
    assert code == 0, err
    assert f"validation {vid}: 2 queries × 4 sequences vs PBRF" in out and "recommended ekfac damping (best correlation with the PBRF): 0.001" in out
    r = saved["ekfac"]
    lo, hi = mean_correlation_ci(r["pearson"], 2, 4)
    row = next(line for line in out.splitlines() if line.strip("│ ").startswith("ekfac ") or "│ ekfac " in line)
    assert f"{r['pearson']:.3f}" in row and (f"[{lo:.2f}, {hi:.2f}]" in row or not math.isfinite(lo)), row
    per_query = [f"{s:.2f}" for _, s in r["settings"]["per_query"]]
    assert "per query (Spearman with the PBRF)" in out
    assert any(all(v in line for v in per_query) and "ekfac" in line for line in out.splitlines()), out
    code, out, err = cli_run("validate", "show", tiny)  # the latest: the LDS one
    assert code == 0 and f"LDS validation {lds_id}: 2 queries × 6 subsets of 6 sequences" in out and "0.250" in out, out
    code, out, err = cli_run("validate", "show", tiny, "99")
    _one_line_error(code, err, "no validation 99", "inflq validate list")


def test_fisher_interval_matches_a_hand_computation():
    lo, hi = fisher_ci(0.5, 28)
    z, half = math.atanh(0.5), 1.96 / 5.0
    assert (lo, hi) == pytest.approx((math.tanh(z - half), math.tanh(z + half)))
    # A mean over 3 queries of correlations over 8 sequences: 3 × (8 − 3) degrees of freedom.
    assert mean_correlation_ci(0.5, 3, 8) == pytest.approx(fisher_ci(0.5, 18))
    assert all(math.isnan(v) for v in mean_correlation_ci(0.5, 3, 3))
