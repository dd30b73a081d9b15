"""`inflq plan`: a run's phases predicted from a measured calibration; nothing written to the project."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest

from inflq import catalog
from inflq.plan import PeakMeter, Phase, Plan, advise, make_plan
from inflq.queries import add_query
from inflq.runs import RunSettings, prepare_estimator
from inflq.settings import RunSettings as Settings


def _dump(root):
    conn = sqlite3.connect(root / "catalog.db")
    out = {t: conn.execute(f"SELECT * FROM [{t}]").fetchall() for (t,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    conn.close()
    return out


def test_plan_predicts_every_phase_and_writes_nothing(project):
    add_query(project, "default", "the old town", " river")
    add_query(project, "default", "a red cat", " runs")
    before, files = _dump(project.root), sorted(p.name for p in project.root.rglob("*") if p.is_file())
    plan = make_plan(project, RunSettings(estimator="ekfac", batch_size=4), calibration=6)
    assert [p.name for p in plan.phases] == [
        "fit: covariance", "fit: eigendecompositions", "fit: eigenvalue correction", "query gradients", "scoring"]
    assert all(p.seconds is not None and p.seconds >= 0 and p.peak_bytes > 0 for p in plan.phases)
    n = len(project.runtime.corpus)
    assert plan.facts["sequences"] == n and plan.facts["queries"] == 2 and plan.facts["calibration_sequences"] == 6
    assert plan.artifacts["scores"] == 4 * 2 * n
    # The factors' size is exact: the shapes of what a real fit stores do not depend on the data.
    assert _dump(project.root) == before
    assert sorted(p.name for p in project.root.rglob("*") if p.is_file()) == files
    fitted = prepare_estimator(project, Settings(estimator="ekfac", batch_size=4))
    row = catalog.factor_set(project.db, fitted.factor_set_id)
    from safetensors import safe_open

    with safe_open(project.path(row["path"]), "pt") as f:
        stored = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())  # noqa: SIM118
    assert plan.artifacts["factors"] == stored


def test_a_pass_time_is_its_rate_times_the_runs_tokens(project, monkeypatch):
    """The extrapolation, on a clock that advances one second per call: each timed stretch takes
    exactly one second, so a pass's prediction is the fitted tokens over the calibration's."""
    import inflq.plan as plan_mod

    ticks = iter(range(10**6))
    monkeypatch.setattr(plan_mod, "_clock", lambda: float(next(ticks)))
    add_query(project, "default", "the old town", " river")
    plan = make_plan(project, RunSettings(estimator="kfac", batch_size=4), calibration=5)
    lengths = project.runtime.corpus.lengths()
    calib = plan.facts["calibration_tokens"]
    by = {p.name: p.seconds for p in plan.phases}
    assert by["fit: covariance"] == pytest.approx(int(lengths.sum()) / calib)
    assert by["scoring"] == pytest.approx(int(lengths.sum()) / calib)


def test_a_fit_by_module_is_planned_as_one_pass_per_group(project, monkeypatch):
    """With --fit-memory the calibration runs the covariance pass once per group (each one timed
    stretch on the one-second clock), so the prediction is the groups times one pass's."""
    import inflq.plan as plan_mod
    from inflq.base import FitContext
    from inflq_builtins.estimators import covariance_bytes

    ticks = iter(range(10**6))
    monkeypatch.setattr(plan_mod, "_clock", lambda: float(next(ticks)))
    add_query(project, "default", "the old town", " river")
    engine = project.runtime.engine()
    memory = max(covariance_bytes(tm) for tm in engine.tracked) + 64
    groups = FitContext(engine, None, 0, 0, None, memory=memory).groups(covariance_bytes)
    assert len(groups) >= 3
    plan = make_plan(project, RunSettings(estimator="kfac", batch_size=4, fit_memory=memory / 2**30), calibration=5)
    lengths = project.runtime.corpus.lengths()
    by = {p.name: p.seconds for p in plan.phases}
    assert by["fit: covariance"] == pytest.approx(len(groups) * int(lengths.sum()) / plan.facts["calibration_tokens"])


def test_advice_names_the_fix():
    phases = [Phase("fit: covariance", 10.0, 50 << 30), Phase("scoring", 4000.0, 2 << 30)]
    plan = Plan(phases, {}, memory=8 << 30)
    assert not plan.fits
    text = " ".join(advise(plan, cov_sums=40 << 30, batch_bytes=1 << 20, score_bytes=1 << 20, factor_bytes=1 << 20))
    assert "--modules" in text and "--fit-memory 2" in text and "fitting" not in text
    plan = Plan([Phase("fit: covariance", 5000.0, 1 << 30), Phase("scoring", 100.0, 1 << 30)], {}, memory=8 << 30)
    assert plan.fits and any("--fit-sequences" in a for a in advise(plan, 1, 1, 1, 1))


def test_peak_meter_sees_an_allocation_and_forgets_it_after_a_reset():
    import torch

    meter = PeakMeter(torch.device("cpu"))
    if not meter.resettable:
        pytest.skip("this system cannot reset the resident high-water mark")
    meter.reset()
    quiet = meter.peak()
    block = np.ones(64 << 20, dtype=np.float64)  # 512 MiB, touched
    loud = meter.peak()
    del block
    meter.reset()
    assert loud - quiet >= 400 << 20
    assert meter.peak() < loud - (300 << 20)


def test_plan_cli(project, cli_run):
    add_query(project, "default", "the old town", " river")
    project.close()
    code, out, err = cli_run("plan", project.root, "--calibration", "4", "--batch-size", "4", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["fits"] is True and data["phases"][0]["name"] == "fit: covariance"
    code, out, err = cli_run("plan", project.root, "--calibration", "4", "--batch-size", "4", "--memory", "0.001")
    assert code == 0, err
    assert "does NOT fit in 0.00 GB" in out and "lower --batch-tokens" in out
    code, _, err = cli_run("plan", project.root, "--memory", "-1")
    assert code != 0 and err.startswith("Error: --memory must be a positive number")
