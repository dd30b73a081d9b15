"""A plugin written against the contract alone (tests/trak_lite.py, a TRAK-style projection
estimator), run through `inflq run` as a user would: its queries stay at full rank whatever --rank
says and the run records it so; its own pass over the candidates goes through the run's executor,
shard by shard, and a stopped run resumes it; its rows are its own artifact; `inflq top` shows its
describe(). Every number is checked against explicit matrices."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch
import trak_lite

from inflq import hookimpl, result_set, score_matrix
from inflq.cli.common import EXIT_STOPPED
from inflq.testing import cli, query_gradients, tiny_project, training_gradients, using_plugin


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny project (24 sequences, two queries), copied for each test that runs on it."""
    base = tmp_path_factory.mktemp("contract")
    p = tiny_project(base)
    root = p.root
    p.close()
    return root


@pytest.fixture
def project(built, tmp_path):
    import shutil

    from inflq import open_project

    # The model and corpus sit beside the project, which records them by path: copy all three.
    shutil.copytree(built.parent, tmp_path / "copy")
    p = open_project(tmp_path / "copy" / built.name)
    yield p
    p.close()


def slow_scores(project, k: int = 16, damping: float = 0.01, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(scores [queries, sequences], Φ [sequences, k])`` from explicit matrices: each sequence's
    full gradient projected by ``P``, ``F = ΦᵀΦ / n`` over all sequences, ``φ(q)ᵀ (F + λI)⁻¹ φ(z)``."""
    train = training_gradients(project)
    queries = query_gradients(project)
    P = {n: trak_lite.projection(n, g.shape[1], g.shape[2], k, seed).double() for n, g in train.items()}
    phi = sum(g.flatten(1).double() @ P[n].T for n, g in train.items())
    phi_q = sum(queries[n].flatten(1).double() @ P[n].T for n in train)
    F = phi.T @ phi / phi.shape[0]
    pre = torch.linalg.solve(F + damping * torch.eye(k, dtype=torch.float64), phi_q.T).T
    return (pre @ phi.T).numpy(), phi.numpy()


def compressible_plugin():
    """The same estimator without the declaration: its queries are compressed like EK-FAC's."""

    class Compressible(trak_lite.TrakLite):
        name = "trak-lite-compressible"
        full_rank_queries = False

    mod = types.ModuleType("compressible")
    mod.register_estimators = hookimpl(lambda register: register(Compressible))
    return mod


def test_queries_stay_full_rank_and_the_run_says_so(project):
    want, _ = slow_scores(project)
    with using_plugin(trak_lite, compressible_plugin()):
        # Scored by the run's own passes from the preconditioned queries: --rank 2 is not applied.
        res = cli("run", project.root, "--estimator", "trak-lite:rows=false", "--rank", "2", "--shard-size", "5")
        assert res.code == 0, res.err
        assert "warning:" in res.err and "rank 2 not applied" in res.err
        np.testing.assert_allclose(score_matrix(project, "default"), want, rtol=1e-4, atol=2e-5 * np.abs(want).max())
        rs = result_set(project, "default")
        settings = json.loads(rs["settings"])
        assert settings["rank"] is None and sorted(settings["full_rank_modules"]) == sorted(settings["modules"])
        assert project.db["runs"].get(rs["run_id"])["settings"].count('"rank": null') == 1
        top = cli("top", project.root)
        assert top.code == 0 and "trak-lite:rows=false" in top.out
        assert "k 16, damping 0.01, fitted_on 24, full rank" in " ".join(top.out.split()), top.out

        # The control: without the declaration, rank 2 truncates every module and the scores move.
        res = cli("run", project.root, "--estimator", "trak-lite-compressible:rows=false", "--rank", "2", "--full-rank-memory", "0")
        assert res.code == 0, res.err
        got = score_matrix(project, "default")
        assert not np.allclose(got, want, rtol=1e-2, atol=1e-3 * np.abs(want).max())
        assert json.loads(result_set(project, "default")["settings"])["rank"] == 2

        # Full rank beyond the cap is refused before any work, in one line, naming the fix.
        res = cli("run", project.root, "--estimator", "trak-lite", "--full-rank-memory", "0")
        assert res.code == 1 and res.err.count("\n") == 1
        assert "keeps its query gradients at full rank" in res.err and "raise --full-rank-memory to 1" in res.err


@pytest.mark.slow  # three runs, one stopped and resumed
def test_its_own_rows_come_from_a_pass_through_the_executor(project, monkeypatch):
    """The rows pass runs on the run's executor, 5 shards of 5 sequences; stopped after two, the run
    resumes with the other three; the stored rows are the slow Φ, the scores the slow ones, the top
    rows' per-module scores (from the saved full-rank queries) add up to them, and the run's
    committed shards of the pass are gone once it is done."""
    from inflq_builtins.executors import LocalExecutor

    want, phi = slow_scores(project)
    seen: list[tuple[int, list[int]]] = []  # (attempt, shards of the rows pass)
    real_map = LocalExecutor.map
    attempt = [0]

    def spy(self, job, shards, on_result, monitor):
        if job.pass_.phase != trak_lite.PHASE:
            return real_map(self, job, shards, on_result, monitor)
        seen.append((attempt[0], [s.index for s in shards]))
        done = [0]

        def counted(shard, out):
            on_result(shard, out)
            done[0] += 1
            if attempt[0] == 0 and done[0] == 2:
                monitor.cancel()  # as Ctrl-C would: the run stops within the next batch

        return real_map(self, job, shards, counted, monitor)

    monkeypatch.setattr(LocalExecutor, "map", spy)
    with using_plugin(trak_lite):
        res = cli("run", project.root, "--estimator", "trak-lite", "--shard-size", "5")
        assert res.code == EXIT_STOPPED and res.err.startswith("stopped: run 1;"), res.err  # stopped on request, not an error
        assert "10 candidates of the estimator's projected gradients pass in 2 shards" in res.err, res.err
        attempt[0] = 1
        res = cli("run", project.root, "--resume")
        assert res.code == 0, res.err
        assert seen == [(0, [0, 1, 2, 3, 4]), (1, [2, 3, 4])]
        np.testing.assert_allclose(score_matrix(project, "default"), want, rtol=1e-4, atol=2e-5 * np.abs(want).max())
        # The plugin's own table and artifact hold the rows, in candidate order.
        row = next(iter(project.db["trak_lite_rows"].rows))
        from inflq import load_tensors

        stored = load_tensors(project.root, row["path"], row["checksum"])
        assert stored["indices"].tolist() == list(range(24))
        np.testing.assert_allclose(stored["rows"].double().numpy(), phi, rtol=1e-4, atol=1e-6 * np.abs(phi).max())
        # The result's stored rows: per-module scores from the saved (full-rank) queries sum to the score.
        top = json.loads(cli("top", project.root, "--json", "-k", "3").out)
        for q in top:
            for r in q["results"]:
                parts = r["module_scores"]  # an object: `top --json` decodes the stored JSON
                assert sum(parts.values()) == pytest.approx(r["score"], rel=1e-4, abs=1e-6 * np.abs(want).max())
        # A new run over the same candidates reads the stored rows back: no pass at all.
        seen.clear()
        assert cli("run", project.root, "--estimator", "trak-lite", "--shard-size", "5").code == 0
        assert seen == []
    assert project.db["fit_shards"].count_where("pass_key LIKE 'candidates:%'") == 0
    run_dir = project.root / "artifacts" / "runs"
    assert not list(run_dir.glob("*/candidates-*")), "the run's committed rows shards were kept"


def test_bad_options_are_one_line_errors(project):
    with using_plugin(trak_lite):
        res = cli("run", project.root, "--estimator", "trak-lite:k=0")
        assert res.code == 1 and res.err.startswith("Error: trak-lite: k must be at least 1") and res.err.count("\n") == 1
        res = cli("run", project.root, "--estimator", "trak-lite:width=3")
        assert res.code == 1 and "width" in res.err and res.err.count("\n") == 1
