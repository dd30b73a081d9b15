"""The local executor: a batch that does not fit in device memory is halved and retried."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inflq.errors import InflqError
from inflq.passes import Shard, run_shard
from inflq_builtins.estimators import CovariancePass


def _fake_oom(monkeypatch, engine, fits: int):
    """Make ``engine.capture`` fail like CUDA does for batches larger than ``fits``."""
    real = engine.capture
    sizes: list[int] = []

    def capture(batch, labels):
        sizes.append(batch.size)
        if batch.size > fits:
            raise torch.OutOfMemoryError("CUDA out of memory (fake)")
        return real(batch, labels)

    monkeypatch.setattr(engine, "capture", capture)
    return sizes


def test_batch_that_does_not_fit_is_halved(project, monkeypatch):
    engine = project.engine()
    shard = Shard(0, np.arange(11))
    expected = run_shard(engine, project.corpus.many, CovariancePass(), shard, project.pad_id, 2)
    sizes = _fake_oom(monkeypatch, engine, fits=2)
    got = run_shard(engine, project.corpus.many, CovariancePass(), shard, project.pad_id, 8)
    assert sizes[:3] == [8, 4, 2], "halved until it fits"
    assert max(sizes[3:]) <= 2, "and kept at the size that fits"
    assert float(got["sequences"].sum()) == 11
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=0)


def test_one_sequence_that_does_not_fit_is_a_clear_error(project, monkeypatch):
    engine = project.engine()
    _fake_oom(monkeypatch, engine, fits=0)
    with pytest.raises(InflqError, match="does not fit"):
        run_shard(engine, project.corpus.many, CovariancePass(), Shard(0, np.arange(4)), project.pad_id, 4)
