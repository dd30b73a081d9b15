"""The local executor: a batch that does not fit in device memory is halved and retried."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inflq import catalog
from inflq.errors import InflqError
from inflq.passes import Shard, run_shard
from inflq.queries import add_query
from inflq_builtins.estimators import CovariancePass


def _fake_oom(monkeypatch, engine, fits: int):
    """Make the engine's forward and backward pass (``_capture``, under ``capture`` and
    ``capture_parts``) fail like CUDA does for batches larger than ``fits``."""
    real = engine._capture
    sizes: list[int] = []

    def capture(batch, labels, reuse=False):
        sizes.append(batch.size)
        if batch.size > fits:
            raise torch.OutOfMemoryError("CUDA out of memory (fake)")
        return real(batch, labels, reuse)

    monkeypatch.setattr(engine, "_capture", capture)
    return sizes


def test_batch_that_does_not_fit_is_halved(project, monkeypatch):
    engine = project.runtime.engine()
    shard = Shard(0, np.arange(11))
    expected = run_shard(engine, project.runtime.corpus.many, CovariancePass(), shard, project.runtime.pad_id, 2)
    sizes = _fake_oom(monkeypatch, engine, fits=2)
    got = run_shard(engine, project.runtime.corpus.many, CovariancePass(), shard, project.runtime.pad_id, 8)
    assert sizes[:3] == [8, 4, 2], "halved until it fits"
    assert max(sizes[3:]) <= 2, "and kept at the size that fits"
    assert float(got["sequences"].sum()) == 11
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=0)


def test_one_sequence_that_does_not_fit_is_a_clear_error(project, monkeypatch):
    engine = project.runtime.engine()
    _fake_oom(monkeypatch, engine, fits=0)
    with pytest.raises(InflqError, match="does not fit"):
        run_shard(engine, project.runtime.corpus.many, CovariancePass(), Shard(0, np.arange(4)), project.runtime.pad_id, 4)


def test_scoring_that_runs_out_of_memory_mid_group_loses_no_sequence(project, monkeypatch):
    """Deferred dot products: a batch that fails after the pass computed (but had not yet returned)
    earlier batches' scores is retried smaller, and every sequence's score comes out once, in order."""
    from inflq import QueryGradients
    from inflq.passes import ScorePass
    from inflq.runs import query_gradients

    engine = project.runtime.engine()
    add_query(project, "default", "the first president of astrobia was", "zorald pfaff")
    add_query(project, "default", "a river flows through the old", "town")
    grads = query_gradients(project, engine, catalog.queries(project.db, "default"), 8)
    qg = QueryGradients.from_preconditioned(dict(grads), None)  # full rank: every module defers
    shard = Shard(0, np.arange(len(project.runtime.corpus)))
    want = run_shard(engine, project.runtime.corpus.many, ScorePass(qg, per_module=True, group_bytes=0), shard, project.runtime.pad_id, 3)

    calls = {"n": 0}
    original = ScorePass._buffer

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 12:  # fail inside the second batch, after the group before it was dotted
            raise torch.OutOfMemoryError("fake")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ScorePass, "_buffer", flaky)
    got = run_shard(engine, project.runtime.corpus.many, ScorePass(qg, per_module=True), shard, project.runtime.pad_id, 6)
    assert calls["n"] > 20
    for key in ("scores", "module_scores"):
        assert got[key].shape == want[key].shape
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6 * float(want[key].abs().max()))


def test_run_tasks_runs_in_order_in_this_process_with_the_driver_monitor():
    """The default ``Executor.run_tasks`` (every executor has it; the local one uses it): tasks one
    after another, in order, each given the driver's monitor; a cancelled monitor stops before the
    next task."""
    from inflq import Cancelled, Monitor
    from inflq_builtins.executors import LocalExecutor

    monitor = Monitor()
    seen, got = [], []

    def fn(task, m):
        seen.append((task, m is monitor))
        if task == 3:
            monitor.cancel()
        return task * 10

    with pytest.raises(Cancelled):
        LocalExecutor().run_tasks(fn, [1, 2, 3, 4], lambda i, r: got.append((i, r)), monitor)
    assert seen == [(1, True), (2, True), (3, True)]  # task 4 never started
    assert got == [(0, 10), (1, 20), (2, 30)]  # the task in flight when cancelled still reports


def test_out_of_memory_part_way_through_a_split_batch_is_a_clear_error(project, monkeypatch):
    """Where the engine splits a batch into groups of sequences, the pass has already taken the
    first groups when a later one runs out of memory: retrying the batch smaller would count them
    twice, so it stops with a one-line error naming the fix (nothing of the failed shard is kept)."""
    engine = project.runtime.engine()
    monkeypatch.setattr(engine, "pass_tokens", 1)  # groups of one sequence
    real = engine._capture
    calls: list[int] = []

    def capture(batch, labels, reuse=False):
        calls.append(batch.size)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (fake)")
        return real(batch, labels, reuse)

    monkeypatch.setattr(engine, "_capture", capture)
    with pytest.raises(InflqError, match="part-way through a batch; use a smaller --batch-tokens"):
        run_shard(engine, project.runtime.corpus.many, CovariancePass(), Shard(0, np.arange(4)), project.runtime.pad_id, 4)
    assert calls == [1, 1]
