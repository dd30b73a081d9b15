"""The example plugin, tested the way a plugin author would: a tiny random model (inflq.testing),
the plugin found through its entry point, runs through the `inflq` command, numbers checked
against a slow computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inflq import InflqError, get_registry, score_matrix
from inflq.testing import cli, query_gradients, tiny_project, training_gradients


def test_the_entry_point_registers_the_estimator():
    reg = get_registry()
    assert "cosine" in reg.names("estimator")
    assert reg.origin[("estimator", "cosine")].endswith(".cosine")


def test_full_cosine_equals_the_slow_computation(tmp_path):
    from inflq_cosine import cosine_matrix

    project = tiny_project(tmp_path, sequences=10)
    assert cli("run", project.root, "--estimator", "identity", "--rank", "full").code == 0
    dot = score_matrix(project, "default")
    assert cli("run", project.root, "--estimator", "cosine", "--rank", "full").code == 0
    qn = score_matrix(project, "default")
    # slow way: every gradient materialised
    q = query_gradients(project)
    qnorm = torch.sqrt(sum((g.double() ** 2).flatten(1).sum(1) for g in q.values())).numpy()
    tnorm = torch.sqrt(sum((g.double() ** 2).flatten(1).sum(1) for g in training_gradients(project).values())).numpy()
    np.testing.assert_allclose(qn, dot / qnorm[:, None], rtol=1e-4, atol=1e-6)
    cos = cosine_matrix(project, "default")
    want = dot / qnorm[:, None] / tnorm[None, :]
    np.testing.assert_allclose(cos, want, rtol=1e-4, atol=1e-6)
    assert np.abs(cos).max() <= 1 + 1e-5
    # cached: the artifact is recorded in the plugin's own table and reused
    assert project.db["cosine_norms"].count == 1
    assert np.array_equal(cosine_matrix(project, "default"), cos)


def test_cosine_of_another_estimator_is_refused(tmp_path):
    from inflq_cosine import cosine_matrix

    project = tiny_project(tmp_path, sequences=10)
    assert cli("run", project.root, "--estimator", "identity").code == 0
    with pytest.raises(InflqError, match="--estimator cosine"):
        cosine_matrix(project, "default")


def test_the_command_is_added(tmp_path):
    project = tiny_project(tmp_path, sequences=10)
    assert cli("run", project.root, "--estimator", "cosine", "--rank", "full").code == 0
    result = cli("cosine", project.root, "-k", "2")
    assert result.code == 0, result.err
    assert result.out.count("query ") == 2 and result.out.count("  +") + result.out.count("  -") == 4
