"""Fitting by module (`--fit-memory`, `ray:memory`): the tracked modules in groups whose sums fit the
budget, one fitting pass per group, so that no process holds every module's sums; the factors are
bitwise those of the ordinary fit, and an interrupted fit by module resumes from its committed
shards. (On a Ray cluster: tests/test_ray.py.)"""

from __future__ import annotations

import pytest
import torch

from inflq.artifacts import load_tensors
from inflq.base import FitContext
from inflq.errors import Cancelled, InflqError
from inflq.progress import Monitor
from inflq.runs import RunSettings, fit_factors

SUMS = {  # what one module adds to each estimator's fitting sums (estimators.py's arithmetic)
    "covariance": lambda tm: 8 * (tm.in_dim * (tm.in_dim + 1) // 2 + tm.out_features * (tm.out_features + 1) // 2),  # packed
    "correction": lambda tm: 8 * tm.out_features * tm.in_dim + 4 * (tm.in_dim**2 + tm.out_features**2),
    "diagonal": lambda tm: 8 * tm.out_features * tm.in_dim,
}


def _ctx(project, memory):
    engine = project.runtime.engine()
    return FitContext(engine, None, 0, 0, Monitor(), memory=memory), engine


def test_groups_pack_consecutive_modules_under_the_budget(project):
    ctx, engine = _ctx(project, None)
    sizes = {tm.name: SUMS["covariance"](tm) for tm in engine.tracked}
    assert ctx.groups(SUMS["covariance"]) == [None]  # no budget: one pass over every module
    ctx.memory = sum(sizes.values())
    assert ctx.groups(SUMS["covariance"]) == [None]  # everything fits: the same
    for memory in (max(sizes.values()), max(sizes.values()) + min(sizes.values()), sum(sizes.values()) // 2):
        ctx.memory = memory
        groups = ctx.groups(SUMS["covariance"])
        assert len(groups) >= 2
        assert [n for g in groups for n in g] == engine.names  # every module once, in order
        held = [sum(sizes[n] for n in g) for g in groups]
        assert max(held) <= memory
        # Filled as far as the budget allows: the next module would not have fitted.
        assert all(held[i] + sizes[groups[i + 1][0]] > memory for i in range(len(groups) - 1))
    ctx.memory = max(sizes.values()) - 1
    biggest = max(sizes, key=sizes.get)
    with pytest.raises(InflqError, match=rf"module {biggest}'s covariance sums need .* raise --fit-memory"):
        ctx.groups(SUMS["covariance"], "covariance sums")


def _factors(project, fs_id):
    return load_tensors(project.root, project.db["factor_sets"].get(fs_id)["path"], None)


@pytest.fixture
def held_sums(monkeypatch):
    """The bytes of sums each fitting pass held (the local executor's running sums after each map)."""
    from inflq_builtins.executors import LocalExecutor

    seen: list[tuple[str, int, int]] = []
    real = LocalExecutor.map

    def spy(self, job, shards, on_result, monitor):
        real(self, job, shards, on_result, monitor)
        if job.sums is not None:
            seen.append((job.pass_.phase, len(shards), sum(v.numel() * v.element_size() for v in job.sums.values())))

    monkeypatch.setattr(LocalExecutor, "map", spy)
    return seen


@pytest.mark.parametrize("estimator", ["ekfac", "kfac", "diagonal"])
def test_fit_by_module_equals_the_ordinary_fit_bitwise(project, held_sums, monkeypatch, estimator):
    from inflq import catalog

    keys: set[str] = set()
    record = catalog.record_fit_shards
    monkeypatch.setattr(catalog, "record_fit_shards", lambda db, run_id, pass_key, *a, **k: (keys.add(pass_key), record(db, run_id, pass_key, *a, **k)))
    settings = dict(estimator=estimator, shard_size=5, batch_size=3)
    _, fs_id, _ = fit_factors(project, RunSettings(**settings))
    ordinary = _factors(project, fs_id)
    whole = {phase: b for phase, _, b in held_sums}
    assert all(k.count(":") == 1 for k in keys), keys  # passes over every module are named as before
    held_sums.clear()
    keys.clear()
    engine = project.runtime.engine()
    first = "diagonal" if estimator == "diagonal" else "covariance"
    kinds = [first, "correction"] if estimator == "ekfac" else [first]
    memory = max(SUMS[k](tm) for k in kinds for tm in engine.tracked) + 64  # a group of one or two modules
    _, by_module_id, _ = fit_factors(project, RunSettings(**settings, refit=True, fit_memory=memory / 2**30))
    assert by_module_id == fs_id  # the same factor set: how the fit was grouped does not change it
    by_module = _factors(project, by_module_id)
    assert list(by_module) == list(ordinary)
    for key in ordinary:
        assert torch.equal(by_module[key], ordinary[key]), key
    phases = [phase for phase, _, _ in held_sums]
    assert phases.count(first) >= 3, phases
    assert phases.count("eigenvalue correction") == (0 if estimator != "ekfac" else len(ctx_groups(project, memory, "correction")))
    counts = 16 if estimator != "diagonal" else 8  # the tokens and sequences counted with every group
    assert all(b <= memory + counts for _, _, b in held_sums), held_sums
    assert max(b for _, _, b in held_sums) < whole[first] / 2
    assert len(keys) == len(phases) and all(k.count(":") == 2 for k in keys), keys  # each group's pass named by its group


def ctx_groups(project, memory, kind):
    ctx, _ = _ctx(project, memory)
    return ctx.groups(SUMS[kind])


def test_interrupted_fit_by_module_resumes_from_its_committed_shards(project, held_sums):
    """Cancel during the second group's covariance pass; --resume runs only the shards not yet
    committed (the first group's pass not at all) and gives the ordinary fit's factors."""
    engine = project.runtime.engine()
    memory = max(SUMS[k](tm) for k in ("covariance", "correction") for tm in engine.tracked) + 64
    settings = dict(estimator="ekfac", shard_size=5, batch_size=3)
    monitor = Monitor()
    phases = [""]

    def on_progress(ev):
        if ev.phase != phases[-1]:
            phases.append(ev.phase)
        if phases.count("covariance") == 2 and ev.phase == "covariance" and ev.done > 10:  # shards 0 and 1 committed
            monitor.cancel()

    monitor.on_progress = on_progress
    with pytest.raises(Cancelled):
        fit_factors(project, RunSettings(**settings, fit_memory=memory / 2**30), monitor)
    run_id = project.db.execute("SELECT max(id) FROM runs").fetchone()[0]
    n_shards = -(-len(project.runtime.corpus) // 5)
    held_sums.clear()
    _, fs_id, _ = fit_factors(project, RunSettings(), resume=run_id)
    resumed = _factors(project, fs_id)
    ran = [(phase, shards) for phase, shards, _ in held_sums]
    groups = ctx_groups(project, memory, "covariance")
    assert [p for p, _ in ran].count("covariance") == len(groups) >= 3
    assert ran[:2] == [("covariance", 0), ("covariance", n_shards - 2)]  # the first group's pass not rerun; the second after its two committed shards
    assert not list((project.root / "artifacts" / "runs" / str(run_id)).glob("fit-*"))  # cleaned up once stored
    _, again_id, _ = fit_factors(project, RunSettings(**settings, refit=True))  # the ordinary fit
    fresh = _factors(project, again_id)
    assert all(torch.equal(resumed[k], fresh[k]) for k in fresh)


def test_fit_memory_is_checked_and_planned(project, cli_run):
    code, out, err = cli_run("factors", "fit", project.root, "--fit-memory", "0")
    assert code == 1 and "--fit-memory must be a positive number of GB" in err
    code, out, err = cli_run("factors", "fit", project.root, "--fit-memory", "1e-9")
    assert code == 1 and "covariance sums need" in err and "raise --fit-memory" in err


def test_fit_context_runs_tasks_here_in_order_by_default(project):
    """A FitContext built without an executor (tests, benchmarks, plans) runs its tasks in this
    process, one after another, in order, each taken from the generator only when it runs, on the
    engine's device; a cancelled monitor stops them between tasks."""
    ctx, engine = _ctx(project, None)
    assert ctx.task_device == engine.device and not ctx.remote_tasks
    log: list[tuple[str, int]] = []

    def tasks():
        for i in range(4):
            log.append(("taken", i))
            yield i

    def fn(task, monitor):
        assert monitor is ctx.monitor
        log.append(("ran", task))
        return task * 10

    ctx.run_tasks(fn, tasks(), lambda i, out: log.append(("result", out)))
    assert log == [x for i in range(4) for x in (("taken", i), ("ran", i), ("result", 10 * i))]
    log.clear()

    def cancelling(i, out):
        log.append(("result", out))
        if i == 1:
            ctx.monitor.cancel()

    with pytest.raises(Cancelled):
        ctx.run_tasks(fn, tasks(), cancelling)
    assert [x for x in log if x[0] == "ran"] == [("ran", 0), ("ran", 1)]


@pytest.mark.parametrize("fit_memory", [None, "group"])
def test_eigendecompositions_are_the_executors_tasks_on_packed_sums(project, monkeypatch, fit_memory):
    """Locally each eigendecomposition is a task of the executor's run_tasks, in module order (A, then
    S), sent one packed float64 sum at a time (each leaving the driver's sums as it is sent) and
    computed on the engine's device; its result is exactly the driver's former computation (the
    sum's square over the tokens, float64 eigh, float32 eigenvectors)."""
    from inflq.linalg import eigh, unpack_upper
    from inflq_builtins import estimators

    engine = project.runtime.engine()
    sizes = [n * (n + 1) // 2 for tm in engine.tracked for n in (tm.in_dim, tm.out_features)]
    memory = None if fit_memory is None else max(SUMS["covariance"](tm) for tm in engine.tracked) + 64
    real = estimators.eigendecompose_task
    seen: list[tuple[int, torch.dtype, str]] = []

    def spy(task, monitor):
        packed, tokens = task["sum"], task["tokens"]
        seen.append((packed.numel(), packed.dtype, str(task["device"])))
        m = unpack_upper(packed.clone())
        m /= tokens
        values, vectors = eigh(m, engine.device)
        out = real(task, monitor)
        assert "sum" not in task  # the task let go of the sum
        assert torch.equal(out[0], values) and out[0].dtype == torch.float64
        assert torch.equal(out[1], vectors.to(torch.float32)) and out[1].dtype == torch.float32
        return out

    monkeypatch.setattr(estimators, "eigendecompose_task", spy)
    events: list[tuple[int, int]] = []
    monitor = Monitor(on_progress=lambda ev: events.append((ev.done, ev.total)) if ev.phase == "eigendecomposition" else None)
    fit_factors(project, RunSettings(estimator="kfac", shard_size=5, batch_size=3, fit_memory=None if memory is None else memory / 2**30), monitor)
    assert seen == [(n, torch.float64, str(engine.device)) for n in sizes]
    groups = [engine.names] if memory is None else ctx_groups(project, memory, "covariance")
    assert events == [(k, len(g)) for g in groups for k in range(len(g) + 1)]  # a module at a time, group by group
