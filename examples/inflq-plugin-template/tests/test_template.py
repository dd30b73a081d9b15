"""The template's tests: a tiny project built in the test (inflq.testing), the plugin registered
(installed, or for the duration: using_plugin), runs through the `inflq` command, scores checked
against explicit gradients, bad options refused in one line."""

from __future__ import annotations

import inflq_template
import numpy as np
import pytest

from inflq import get_registry, result_set, score_matrix
from inflq.testing import cli, query_gradients, tiny_project, training_gradients, using_plugin


@pytest.fixture(autouse=True)
def plugin():
    with using_plugin(inflq_template) as registry:
        yield registry


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return tiny_project(tmp_path_factory.mktemp("template"), sequences=12)


def test_the_plugins_register(plugin):
    assert "scaled-dot" in get_registry().names("estimator") and "longest" in get_registry().names("filter")


def test_scores_equal_the_slow_computation(project):
    res = cli("run", project.root, "--estimator", "scaled-dot:scale=2,weighting=fan_in", "--filter", "longest:k=5", "--rank", "full")
    assert res.code == 0, res.err
    got = score_matrix(project, "default")
    # slow way: ⟨scale · q / fan_in, z⟩ summed over modules, for the 5 longest sequences
    q, z = query_gradients(project), training_gradients(project)
    want = sum(2.0 / g.shape[2] * q[name].flatten(1).double() @ g.flatten(1).double().T for name, g in z.items()).numpy()
    lengths = np.array([len(project.runtime.corpus.get(i)) for i in range(len(project.runtime.corpus))])
    chosen = np.sort(np.argsort(-lengths, kind="stable")[:5])
    assert np.array_equal(np.flatnonzero(~np.isnan(got[0])), chosen)
    np.testing.assert_allclose(got[:, chosen], want[:, chosen], rtol=1e-4, atol=1e-5 * np.abs(want).max())
    # describe() is recorded with the result set and shown in `inflq top`'s header
    assert "scale 2, weighting fan_in" in " ".join(cli("top", project.root).out.split())
    assert '"weighting": "fan_in"' in result_set(project, "default")["settings"]


@pytest.mark.parametrize("spec, message", [
    ("scaled-dot:scale=0", "scale must not be 0"),
    ("scaled-dot:weighting=log", "weighting"),
    ("scaled-dot:scale=big", "scale"),
])
def test_bad_options_are_one_line_errors(project, spec, message):
    res = cli("run", project.root, "--estimator", spec)
    assert res.code == 1 and res.err.startswith("Error:") and message in res.err and res.err.count("\n") == 1


def test_torch_is_imported_where_used():
    """`inflq --help` imports every plugin: the module must not import torch itself."""
    import subprocess
    import sys
    from pathlib import Path

    code = f"import sys; sys.path.insert(0, {str(Path(inflq_template.__file__).parents[1])!r}); import inflq_template; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
