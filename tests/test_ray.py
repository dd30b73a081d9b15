"""The Ray executor on a real local Ray cluster (loopback, 2 CPU workers, token authentication on):
same scores as the local executor, a fit by module on workers with a memory limit, a worker killed
mid-run is survived, a run killed under the
local executor resumes on Ray, and a client without the cluster's token is refused."""

from __future__ import annotations

import math
import os
import secrets
import signal
import subprocess
import sys
import textwrap

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

from inflq.errors import InflqError
from inflq.plugins import get_registry
from inflq.progress import Monitor
from inflq.project import Project
from inflq.reading import score_matrix

N = 36
SHARD = 4
ARGS = ["--shard-size", str(SHARD), "--batch-size", "2", "--rank", "8"]
RAY2 = "ray:num_workers=2"

pytestmark = pytest.mark.slow  # a real Ray cluster: minutes, not seconds (pytest -m "not slow" leaves it out)


def test_missing_ray_is_a_clear_error(project, monkeypatch):
    from inflq.passes import make_shards
    from inflq_builtins.ray_executor import RayExecutor

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(InflqError, match=r'pip install "inflq\[ray\]"'):
        RayExecutor().map(None, make_shards(__import__("numpy").arange(4), 2), lambda s, o: None, Monitor())
    assert "ray" in get_registry().names("executor"), "the plugin registers without Ray"


@pytest.fixture(scope="module")
def cluster():
    """A private Ray cluster for this module: 2 CPUs, on loopback, with a fresh token."""
    token = secrets.token_hex(32)
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ADDRESS")}
    # Explicit token mode with a fresh token (nothing written to ~/.ray), set before Ray reads it.
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    os.environ.pop("RAY_ADDRESS", None)
    ray = pytest.importorskip("ray")
    try:  # Ray caches its config and token at import; make it read the new ones
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    except ImportError:
        pass
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="WARNING", log_to_driver=False)
    try:
        yield {"address": ray.get_runtime_context().gcs_address, "token": token}
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """An uninterrupted local run and its scores."""
    from inflq.cli import main

    base = tmp_path_factory.mktemp("ray")
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


def test_ray_scores_equal_local_scores(cluster, baseline, cli_run, tmp_path):
    src, expected = baseline
    proj = copy_project(src, "ray-equal")
    code, out, err = cli_run("run", proj, *ARGS, "--refit", "--executor", RAY2)  # fit and score on Ray
    assert code == 0, err
    p = Project.open(proj)
    assert p.db["runs"].get(2)["executor"] == RAY2
    p.close()
    assert_same_scores(expected, export_npy(cli_run, proj, tmp_path / "s.npy"))


def test_fit_by_module_on_workers_with_a_memory_limit(cluster, baseline, cli_run, monkeypatch, tmp_path):
    """Workers of ``memory=GB`` whose half cannot hold every module's covariance sums: the fit runs
    a pass per group of modules, no worker returns (and the driver never reduces) more than one
    group's sums, and the scores are the local run's."""
    from inflq_builtins import ray_executor
    from inflq_builtins.estimators import correction_bytes, covariance_bytes

    src, expected = baseline
    proj = copy_project(src, "ray-by-module")
    p = Project.open(proj)
    tracked = p.runtime.engine().tracked
    p.close()
    budget = max(f(tm) for f in (covariance_bytes, correction_bytes) for tm in tracked) + 64  # one or two modules' sums
    assert budget < sum(covariance_bytes(tm) for tm in tracked) / 3
    returned: list[tuple[str, tuple | None, int]] = []
    real_map = ray_executor.RayExecutor.map

    def spy_map(self, job, shards, on_result, monitor):
        def on(shard, out):
            returned.append((job.pass_.phase, job.pass_.modules, sum(v.numel() * v.element_size() for v in out.values())))
            on_result(shard, out)

        return real_map(self, job, shards, on, monitor)

    monkeypatch.setattr(ray_executor.RayExecutor, "map", spy_map)
    spec = f"ray:num_workers=2,memory={2 * budget / 2**30:.12g}"
    code, out, err = cli_run("run", proj, *ARGS, "--refit", "--executor", spec)
    assert code == 0, err
    fitting = [r for r in returned if r[0] != "scoring"]
    assert {phase for phase, _, _ in fitting} == {"covariance", "eigenvalue correction"}
    groups = {modules for phase, modules, _ in fitting if phase == "covariance"}
    assert len(groups) >= 3 and None not in groups
    assert sorted(n for g in groups for n in g) == sorted(tm.name for tm in tracked)
    assert all(b <= budget + 16 for _, _, b in fitting), max(b for _, _, b in fitting)
    assert_same_scores(expected, export_npy(cli_run, proj, tmp_path / "s.npy"))


@pytest.fixture
def eigh_fit(baseline, monkeypatch, request):
    """A copy of the baseline project, its fit-by-module settings (a group of one or two modules)
    and its local factors (at one torch thread, as on the workers: the bits of the sums and of
    eigh can depend on the thread count); then, for the Ray fits that follow, a count of the
    eigendecompositions the driver computes and, per task the Ray executor runs, its process id,
    its sum's size and whether the fit's actors ran it (each seeing no GPU: the workers have none)."""
    import torch

    from inflq.artifacts import load_tensors
    from inflq.runs import RunSettings, fit_factors
    from inflq_builtins import ray_executor
    from inflq_builtins.estimators import correction_bytes, covariance_bytes

    src, _ = baseline
    p = Project.open(copy_project(src, request.node.name))
    tracked = p.runtime.engine().tracked
    budget = max(f(tm) for f in (covariance_bytes, correction_bytes) for tm in tracked) + 64
    settings = dict(estimator="ekfac", shard_size=SHARD, batch_size=2, seed=p.config.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    _, local_id, _ = fit_factors(p, RunSettings(**settings, fit_memory=budget / 2**30))
    out = {"project": p, "tracked": tracked, "settings": settings, "spec": f"ray:num_workers=2,memory={2 * budget / 2**30:.12g}",
           "local": load_tensors(p.root, p.db["factor_sets"].get(local_id)["path"], None), "local_id": local_id,
           "driver_eighs": [], "ran": [], "actor_pids": set()}
    real_eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda *a, **k: (out["driver_eighs"].append(1), real_eigh(*a, **k))[1])
    real_tasks = ray_executor.RayExecutor.run_tasks

    def spy(self, fn, tasks, on_result, monitor):
        import ray

        on_actors = bool(self._actors)
        if on_actors:
            out["actor_pids"].update(ray.get([a["handle"].pid.remote() for a in self._actors.values()]))
        traced = lambda task, m: (os.getpid(), task["sum"].numel(), os.environ.get("CUDA_VISIBLE_DEVICES"), fn(task, m))  # noqa: E731 (a lambda travels by value)

        def on(i, r):
            assert r[2] == "", "a worker without GPUs sees the node's"
            out["ran"].append((r[0], r[1], on_actors))
            on_result(i, r[3])

        return real_tasks(self, traced, tasks, on, monitor)

    monkeypatch.setattr(ray_executor.RayExecutor, "run_tasks", spy)
    try:
        yield out
    finally:
        torch.set_num_threads(threads)
        p.close()


def _same_factors(fit, fs_id) -> None:
    import torch

    from inflq.artifacts import load_tensors

    p, local = fit["project"], fit["local"]
    assert fs_id == fit["local_id"]
    on_ray = load_tensors(p.root, p.db["factor_sets"].get(fs_id)["path"], None)
    assert list(on_ray) == list(local)
    # Compare what the factors do. LAPACK's eigh may round differently in another process (MKL picks
    # its threads by the machine's load), and eigenvectors of close eigenvalues then turn a little.
    from inflq_builtins.estimators import EKFAC

    gen = torch.Generator().manual_seed(0)
    names = [k[len("qa/"):] for k in local if k.startswith("qa/")]
    grads = {n: torch.randn(3, local[f"qs/{n}"].shape[0], local[f"qa/{n}"].shape[0], generator=gen, dtype=torch.float32) for n in names}
    preconditioned = []
    for tensors in (local, on_ray):
        est = EKFAC()
        est.load_factors(tensors)
        preconditioned.append(est.precondition(grads))
    for n in names:
        want, got = preconditioned[0][n], preconditioned[1][n]
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max())), n


def test_eigendecompositions_of_a_fit_by_module_run_on_the_workers(cluster, eigh_fit):
    """`ray:memory=GB` fits by module and each group's eigendecompositions run on the fit's actors
    (their process ids, never the driver's: the driver computes no eigh at all), from packed sums;
    the phase advances per module; and the factors are the local fit's (to float rounding)."""
    from inflq.runs import RunSettings, fit_factors

    fit = eigh_fit
    events: list[tuple[int, int]] = []
    monitor = Monitor(on_progress=lambda ev: events.append((ev.done, ev.total)) if ev.phase == "eigendecomposition" else None)
    _, fs_id, _ = fit_factors(fit["project"], RunSettings(**fit["settings"], refit=True, executor=fit["spec"]), monitor)
    _same_factors(fit, fs_id)
    assert not fit["driver_eighs"], "an eigendecomposition ran in the driver"
    assert len(fit["actor_pids"]) == 2 and os.getpid() not in fit["actor_pids"]
    assert all(on_actors and pid in fit["actor_pids"] for pid, _, on_actors in fit["ran"])
    assert sorted(n for _, n, _ in fit["ran"]) == sorted(n * (n + 1) // 2 for tm in fit["tracked"] for n in (tm.in_dim, tm.out_features))  # packed
    totals = [total for done, total in events if done == 0]  # a phase per group
    assert len(totals) >= 3 and sum(totals) == len(fit["tracked"])
    assert events == [(k, total) for total in totals for k in range(total + 1)]  # advanced a module at a time


def test_eigendecompositions_on_ray_stop_on_cancel_and_resume(cluster, eigh_fit):
    """Cancelled during a group's eigendecompositions on Ray: the fit stops there (the actors
    killed with the tasks in flight, no result taken after the cancel); resumed, the groups whose covariance passes were all
    committed decompose as Ray tasks (no actors running yet), the rest on the actors, none in the
    driver, and the factors are the local fit's."""
    from inflq.errors import Cancelled
    from inflq.runs import RunSettings, fit_factors

    fit = eigh_fit
    p = fit["project"]
    monitor = Monitor()
    at_cancel: list[int] = []

    def on_progress(ev):
        if ev.phase == "eigendecomposition" and ev.done == 1 and not at_cancel:  # the first module decomposed
            at_cancel.append(len(fit["ran"]))
            monitor.cancel()

    monitor.on_progress = on_progress
    with pytest.raises(Cancelled):
        fit_factors(p, RunSettings(**fit["settings"], refit=True, executor=fit["spec"]), monitor)
    assert at_cancel and len(fit["ran"]) == at_cancel[0] < 2 * len(fit["tracked"])  # no result taken after the cancel
    run_id = p.db.execute("SELECT max(id) FROM runs").fetchone()[0]
    assert p.db["runs"].get(run_id)["status"] == "cancelled"
    fit["ran"].clear()
    _, fs_id, _ = fit_factors(p, RunSettings(), resume=run_id)
    _same_factors(fit, fs_id)
    assert not fit["driver_eighs"]
    assert {on_actors for _, _, on_actors in fit["ran"]} == {False, True}
    assert os.getpid() not in {pid for pid, _, _ in fit["ran"]}
    assert len(fit["ran"]) == 2 * len(fit["tracked"])


def test_killed_worker_is_survived(cluster, baseline, monkeypatch, tmp_path, cli_run):
    import ray

    from inflq.runs import RunSettings, run_investigation
    from inflq_builtins import ray_executor

    src, expected = baseline
    proj = copy_project(src, "ray-kill-worker")
    executors = []
    real_map = ray_executor.RayExecutor.map

    def spy_map(self, *a, **k):
        executors.append(self)
        return real_map(self, *a, **k)

    monkeypatch.setattr(ray_executor.RayExecutor, "map", spy_map)
    killed = []

    def on_progress(ev):
        if ev.phase == "scoring" and ev.done > 0 and not killed and executors:
            busy = [a for a in executors[-1]._actors.values() if a["ready"] and a["load"] > 0]
            if busy:
                ray.kill(busy[0]["handle"], no_restart=True)  # the worker dies with shards in flight
                killed.append(busy[0])

    monitor = Monitor(on_progress=on_progress)
    p = Project.open(proj)
    settings = RunSettings(shard_size=SHARD, batch_size=2, rank=8, executor=RAY2, seed=p.config.seed)
    run_investigation(p, "default", settings, monitor)
    p.close()
    assert killed, "a worker was killed mid-run"
    assert executors[-1].lost_workers >= 1
    assert any("worker was lost" in w for w in monitor.warnings)
    assert_same_scores(expected, export_npy(cli_run, proj, tmp_path / "s.npy"))


def test_run_killed_locally_resumes_on_ray(cluster, baseline, cli_run, tmp_path):
    src, expected = baseline
    proj = copy_project(src, "local-then-ray")
    proc = start_cli("run", proj, *ARGS, "--refit")  # local executor, killed while fitting
    wait_until(proc, proj, "SELECT count(*) FROM fit_shards WHERE run_id = 2")
    kill(proc, signal.SIGKILL)
    assert 1 <= count(proj, "SELECT count(*) FROM fit_shards WHERE run_id = 2 AND pass_key = '0:covariance'") < math.ceil(N / SHARD)
    code, out, err = cli_run("run", proj, "--resume", "2", "--executor", RAY2)
    assert code == 0, err
    p = Project.open(proj)
    assert p.db["runs"].get(2)["status"] == "done" and p.db["runs"].get(2)["executor"] == RAY2
    p.close()
    assert_same_scores(expected, export_npy(cli_run, proj, tmp_path / "s.npy"))


CLIENT = textwrap.dedent("""
    import ray, sys
    try:
        ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
        print("CONNECTED", ray.get(ray.remote(lambda: 41 + 1).remote()))
    except Exception as exc:
        print("REFUSED", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
""")


def test_lds_and_loo_retrainings_on_ray_equal_the_sequential_ones(cluster, tmp_path, cli_run, monkeypatch):
    """validate --lds/--loo --executor ray: the retrainings run in Ray's worker processes (none in
    the driver), the driver commits each, and the measurements and LDS equal the sequential path's."""
    import numpy as np

    from inflq import catalog
    from inflq.lds import validate_lds, validate_loo

    a, b = make_project(tmp_path / "a", n=16), make_project(tmp_path / "b", n=16)
    adamw = get_registry().get("trainer", "adamw")
    in_driver: list[int] = []
    real = adamw.train

    def counting(self, ctx):
        in_driver.append(len(ctx.indices))
        return real(self, ctx)

    monkeypatch.setattr(adamw, "train", counting)
    spec = "adamw:epochs=2,batch_size=4,lr=0.01,threads=1"
    seq = validate_lds(a, "default", ["identity"], subsets=4, trainer=spec, save=False)
    assert len(in_driver) == 4
    on_ray = validate_lds(b, "default", ["identity"], subsets=4, trainer=spec, save=False, executor=RAY2)
    assert len(in_driver) == 4, "the Ray path retrained in the driver"
    assert on_ray.trained == [0, 1, 2, 3] and np.array_equal(seq.measured, on_ray.measured)
    assert [r.per_query for r in seq.rows] == [r.per_query for r in on_ray.rows]
    study = on_ray.settings["study"]
    assert sorted(catalog.lds_subsets(b.db, study)) == [0, 1, 2, 3]  # committed by the driver
    # Leave-one-out through the CLI, against the sequential API.
    loo = validate_loo(a, "default", ["identity"], count=3, trainer=spec, save=False)
    b.close()
    code, out, err = cli_run("validate", str(tmp_path / "b" / "proj"), "--loo", "3", "--trainer", spec, "--estimators", "identity", "--executor", RAY2)
    assert code == 0, err
    assert len(in_driver) == 4 + 4 and "leave-one-out validation" in out
    p = Project.open(tmp_path / "b" / "proj")
    row = catalog.validation_rows(p.db, method="loo")[0]
    np.testing.assert_array_equal(np.array(row["settings"]["per_query"], float), loo.rows[0].per_query)
    assert row["settings"]["retrained_now"] == 4
    p.close()
    a.close()


def _client(address: str, tmp_path, **env) -> subprocess.Popen:
    e = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # No token file in $HOME/.ray either; give up retrying a refused connection after 5 s.
    e.update(HOME=str(tmp_path), RAY_gcs_rpc_server_connect_timeout_s="5", **env)
    return subprocess.Popen([sys.executable, "-c", CLIENT, address], env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_client_without_the_token_is_refused(cluster, tmp_path):
    addr = cluster["address"]
    clients = {
        "right": _client(addr, tmp_path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=cluster["token"]),
        "wrong": _client(addr, tmp_path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32)),
        "none": _client(addr, tmp_path),
    }
    out = {name: c.communicate(timeout=120)[0] for name, c in clients.items()}
    assert "CONNECTED 42" in out["right"], out["right"]
    assert "REFUSED" in out["wrong"] and "CONNECTED" not in out["wrong"], out["wrong"]
    assert "CONNECTED" not in out["none"], out["none"]


def test_index_build_on_ray_equals_the_local_build(cluster, baseline, cli_run):
    """`inflq index build --executor ray`: the preconditioner's fitting passes and the rows pass run
    on the Ray workers; the index (its key, its model, every row and side value) is the local
    build's, up to the order in which the workers' fitting sums are added."""
    import numpy as np
    import torch

    import inflq_builtins.gradient_index as index_plugin
    from inflq.cli import cli

    if get_registry().pm.get_plugin("inflq.index") is None:  # an installed inflq registers it by entry point
        get_registry().register(index_plugin, name="inflq.index", distribution="inflq")
    if "index" not in cli.commands:
        index_plugin.register_commands(cli=cli)
    src, _ = baseline
    built = {}
    for name, extra in (("index-local", []), ("index-ray", ["--executor", RAY2])):
        proj = copy_project(src, name)
        code, out, err = cli_run("index", "build", proj, "--k-s", "4", "--k-a", "5", "--shard-size", "10", *extra)
        assert code == 0, err
        p = Project.open(proj)
        row = index_plugin.recorded_indexes(p)[0]
        store = index_plugin._store(p, row)
        assert row["status"] == "complete" and store.complete and store.num_shards == math.ceil(N / 10)
        rows = np.concatenate([np.asarray(b.rows, dtype=np.float32) * b.scale[:, None] for b in store.blocks(7)])
        side = np.concatenate([b.self_influence for b in store.blocks(7)])
        built[name] = (row["key"], store.model(), rows, side)
        p.close()
    (key_l, model_l, rows_l, side_l), (key_r, model_r, rows_r, side_r) = built["index-local"], built["index-ray"]
    assert key_l == key_r
    tensors_l, tensors_r = model_l.tensors(), model_r.tensors()
    assert tensors_l.keys() == tensors_r.keys()
    for k in tensors_l:  # the seeded projections are the same draws
        if k.startswith(("ps/", "pa/")):
            assert torch.equal(tensors_l[k], tensors_r[k]), k
    # The rows use the projections only: the same up to float16 storage.
    np.testing.assert_allclose(rows_r, rows_l, rtol=2e-3, atol=1e-3 * np.abs(rows_l).max())
    # The preconditioner (sums added in another order: eigenvectors of close eigenvalues turn a
    # little, so compare what it does) applied to the rows, and the stored self-influences.
    rows = torch.from_numpy(rows_l)
    pre_l, pre_r = model_l.precondition(rows).numpy(), model_r.precondition(rows).numpy()
    np.testing.assert_allclose(pre_r, pre_l, rtol=1e-3, atol=1e-4 * np.abs(pre_l).max())
    np.testing.assert_allclose(side_r, side_l, rtol=1e-3)
