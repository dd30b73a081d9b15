"""The gradient index as users get it (plugins/inflq_builtins/gradient_index.py): `inflq index build/list/rm`,
`--estimator index` and `--filter index:k=N`, on a tiny random GPT-2 project. The exact answers are
inflq's own EK-FAC runs (`--estimator ekfac`), never the index's code."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

import inflq_builtins.gradient_index as index_plugin
from inflq import catalog, get_registry, open_project
from inflq.reading import result_set, scores


@pytest.fixture(autouse=True)
def _index_plugin():
    """The entry point (pyproject's `index`) registers the plugin in an installed inflq; here the
    module is registered directly, as `docs/plugins.md` tells plugin tests to."""
    from inflq.cli import cli

    get_registry().register(index_plugin, name="inflq.index", distribution="inflq")
    if "index" not in cli.commands:
        index_plugin.register_commands(cli=cli)


@pytest.fixture
def proj(tmp_path, gpt2_dir, corpus_file, cli_run):
    p = tmp_path / "proj"
    assert cli_run("init", p, "--model", gpt2_dir, "--corpus", corpus_file)[0] == 0
    assert cli_run("query", "add", p, "the old town", "river")[0] == 0
    assert cli_run("query", "add", p, "a red cat", "runs")[0] == 0
    return p


def _full_width(cli_run, proj):
    code, out, err = cli_run("index", "build", proj, "--k-s", "100000", "--k-a", "100000", "--kind", "orthogonal")
    assert code == 0, err
    return out.split()[1].rstrip(":")


def _latest(proj):
    p = open_project(proj)
    try:
        rs = result_set(p, "default")
        idx, matrix = scores(p, rs)
        return rs, idx, matrix
    finally:
        p.close()


def test_index_build_list_rm_and_resume(proj, cli_run):
    code, out, err = cli_run("index", "build", proj, "--k-s", "3", "--k-a", "4")
    assert code == 0, err
    key = out.split()[1].rstrip(":")
    p = open_project(proj)
    row = index_plugin.recorded_indexes(p)[0]
    assert row["key"] == key and row["status"] == "complete" and row["num_rows"] == len(p.runtime.corpus)
    folder = p.path(row["path"])
    assert folder.is_dir() and folder.parent == p.root / "artifacts" / "index"
    n_modules = len(json.loads(row["modules"]))
    assert row["width"] == 12 * n_modules
    code, out, _ = cli_run("index", "list", proj, "--verify")
    assert code == 0 and key in out and "complete" in out and "checksums ok" in out and f"{2 * 12 * n_modules + 16}" in out
    # Building the same key again reuses the fit (a factor set) and the committed shards.
    rows_file = folder / "rows-000000.npy"
    before = rows_file.stat().st_mtime_ns
    assert cli_run("index", "build", proj, "--k-s", "3", "--k-a", "4")[0] == 0
    assert rows_file.stat().st_mtime_ns == before
    # A damaged shard is reported by --verify.
    data = bytearray(rows_file.read_bytes())
    data[-1] ^= 0xFF
    rows_file.write_bytes(bytes(data))
    assert "fail their checksums" in cli_run("index", "list", proj, "--verify")[1]
    # ... and by `inflq check` (the check_artifacts hook), which cannot repair it and says how.
    lines = [x for part in get_registry().pm.hook.check_artifacts(project=p) for x in part]
    assert len(lines) == 1 and key in lines[0] and "shard(s) 0 fail their checksums" in lines[0] and "inflq index rm" in lines[0]
    code, out, err = cli_run("check", proj)
    assert code == 1 and lines[0] in out and err.startswith("Error: 1 damaged or missing")
    code, out, err = cli_run("check", proj, "--repair")
    assert code == 1 and f"cannot repair {lines[0]}" in out and "could not be recomputed" in err
    assert cli_run("index", "rm", proj, key[:8])[0] == 0
    assert not folder.exists() and index_plugin.recorded_indexes(p) == []
    code, _, err = cli_run("index", "rm", proj, "nope")
    assert code == 1 and "inflq index list" in err
    code, _, err = cli_run("run", proj, "--estimator", "index")
    assert code == 1 and "inflq index build" in err
    p.close()


def test_estimator_index_equals_exact_ekfac_at_full_width(proj, cli_run, tmp_path):
    _full_width(cli_run, proj)
    code, _, err = cli_run("run", proj, "--estimator", "ekfac", "--top-k", "5")
    assert code == 0, err
    rs_exact, idx_e, exact = _latest(proj)
    code, _, err = cli_run("run", proj, "--estimator", "index", "--top-k", "5")
    assert code == 0, err
    rs_index, idx_i, approx = _latest(proj)
    assert rs_index["id"] != rs_exact["id"] and np.array_equal(idx_e, idx_i)
    p = open_project(proj)
    # The index run scored from the stored rows (Estimator.score_candidates): no score shards.
    assert catalog.score_shards(p.db, rs_index["run_id"]) == {} and catalog.score_shards(p.db, rs_exact["run_id"]) != {}
    assert json.loads(rs_index["settings"])["estimator_settings"]["width"] > 0
    scale = np.abs(exact).max()
    assert np.abs(approx - exact).max() <= 2e-3 * scale  # float16 storage of the rows
    for qi in range(exact.shape[0]):
        assert set(np.argsort(-exact[qi])[:3]) == set(np.argsort(-approx[qi])[:3])
    # The stored top rows: their layer scores come from the lifted preconditioned queries and sum to
    # the index's score up to the rows' float16 storage.
    q = catalog.queries(p.db, "default")[0]
    code, out, err = cli_run("top", proj, "--json", "-k", "3", "--query", str(q["id"]))
    assert code == 0, err
    rows = json.loads(out)[0]["results"]
    assert len(rows) == 3
    qi = next(i for i, qq in enumerate(catalog.queries(p.db, "default")) if qq["id"] == q["id"])
    assert [r["seq_idx"] for r in rows] == [int(idx_i[c]) for c in np.argsort(-approx[qi], kind="stable")[:3]]
    for r in rows:
        assert abs(sum(r["module_scores"].values()) - r["score"]) <= 2e-3 * scale  # top --json decodes them (reading.decoded)
    # Attribution of a chosen sequence (CLI and API): its tokens sum to the index's score.
    code, out, err = cli_run("attribute", proj, "--query", str(q["id"]), "--sequence", rows[0]["seq_id"])
    assert code == 0, err
    total = float(out.strip().splitlines()[-1].split()[1])
    assert abs(total - rows[0]["score"]) <= 2e-3 * scale
    from inflq.reading import ScoringSession

    att = ScoringSession.for_result_set(p, rs_index).attribute(p.runtime.corpus.get(rows[0]["seq_idx"]), q["id"], "layer")
    assert abs(att.total - rows[0]["score"]) <= 2e-3 * scale and abs(float(np.sum(att.values)) - att.total) <= 1e-4 * scale
    out_file = tmp_path / "scores.npy"
    code, _, err = cli_run("export", proj, "--format", "npy", "--output", out_file)
    assert code == 0, err
    # The header says what the run did: scores from the index (its key and width), the query rank
    # only for attributions; the exact run's header names its rank as before.
    width = json.loads(rs_index["settings"])["estimator_settings"]["width"]
    code, out, err = cli_run("top", proj, "-k", "1", "--query", str(q["id"]), "--result-set", str(rs_index["id"]), "--wide")
    head = " ".join(out.split("┏")[0].split())
    assert "scores from the stored gradient index" in head and f"width {width}" in head and "attribution at" in head, head
    assert "damping" not in head, head
    code, out, err = cli_run("top", proj, "-k", "1", "--query", str(q["id"]), "--result-set", str(rs_exact["id"]), "--wide")
    assert "scores from" not in out.split("┏")[0] and "damping" in out.split("┏")[0]
    p.close()


def test_index_filter_full_depth_equals_unfiltered_and_small_k_keeps_k(proj, cli_run):
    _full_width(cli_run, proj)
    p = open_project(proj)
    n = len(p.runtime.corpus)
    p.close()
    assert cli_run("run", proj, "--estimator", "ekfac", "--top-k", "3")[0] == 0
    _, idx_all, exact = _latest(proj)
    code, _, err = cli_run("run", proj, "--estimator", "ekfac", "--filter", f"index:k={n}", "--top-k", "3")
    assert code == 0, err
    _, idx_f, filtered = _latest(proj)
    assert np.array_equal(idx_all, idx_f)
    np.testing.assert_allclose(filtered, exact, rtol=1e-5, atol=1e-6 * np.abs(exact).max())
    code, _, err = cli_run("run", proj, "--estimator", "ekfac", "--filter", "index:k=4", "--top-k", "3")
    assert code == 0, err
    _, idx_k, small = _latest(proj)
    counts = np.isfinite(small).sum(axis=1)
    assert np.all(counts == 4)
    # The candidates are the index's own top 4 of each query, which at full width are EK-FAC's.
    for qi in range(exact.shape[0]):
        chosen = set(idx_k[np.isfinite(small[qi])])
        assert chosen == set(idx_all[np.argsort(-exact[qi])[:4]])
    # side=bottom: the index's lowest 4, at full width EK-FAC's bottom 4.
    code, _, err = cli_run("run", proj, "--estimator", "ekfac", "--filter", "index:k=4,side=bottom", "--top-k", "3")
    assert code == 0, err
    _, idx_b, low = _latest(proj)
    for qi in range(exact.shape[0]):
        assert set(idx_b[np.isfinite(low[qi])]) == set(idx_all[np.argsort(exact[qi])[:4]])
    if importlib.util.find_spec("faiss") is not None:  # FAISS probing every list: the same candidates
        code, _, err = cli_run("run", proj, "--estimator", "ekfac", "--filter", "index:k=4,search=faiss,nprobe=100000", "--top-k", "3")
        assert code == 0, err
        _, idx_a, approx = _latest(proj)
        assert np.array_equal(idx_a, idx_k) and np.array_equal(np.isfinite(approx), np.isfinite(small))
    code, _, err = cli_run("run", proj, "--estimator", "ekfac", "--filter", "index:k=0")
    assert code == 1 and "k must be at least 1" in err


def test_index_estimator_refuses_other_modules(proj, cli_run):
    _full_width(cli_run, proj)
    p = open_project(proj)
    first = p.runtime.engine().names[0]
    p.close()
    code, _, err = cli_run("run", proj, "--estimator", "index", "--modules", first)
    assert code == 1 and "--modules" in err


def test_pack_carries_the_index_unless_excluded(proj, cli_run, tmp_path):
    import tarfile

    code, out, err = cli_run("index", "build", proj, "--k-s", "2", "--k-a", "2")
    assert code == 0, err
    key = out.split()[1].rstrip(":")
    with_index, without = tmp_path / "with.tar", tmp_path / "without.tar"
    assert cli_run("pack", proj, with_index)[0] == 0
    code, _, err = cli_run("pack", proj, without, "--exclude", "artifacts/index")
    assert code == 0, err

    def names(f):
        with tarfile.open(f) as tf:
            return tf.getnames()

    assert any(n.startswith(f"artifacts/index/index-{key}/rows-") for n in names(with_index))
    assert not any(n.startswith("artifacts/index/") for n in names(without))
    assert any(n.startswith("artifacts/factors/") for n in names(without))  # the rest travels
    code, _, err = cli_run("pack", proj, tmp_path / "bad.tar", "--exclude", "artifacts/factors")
    assert code == 1 and "the catalog references it" in err
    code, _, err = cli_run("pack", proj, tmp_path / "bad.tar", "--exclude", "corpus")
    assert code == 1 and "inside artifacts/" in err
    # Unpacked, the index is usable there (the catalog row travels in the plugin's table).
    assert cli_run("unpack", with_index, tmp_path / "copy")[0] == 0
    code, out, _ = cli_run("index", "list", tmp_path / "copy", "--verify")
    assert code == 0 and key in out and "checksums ok" in out


def test_the_index_plugin_is_shaped_like_a_third_party_one():
    """Registered through pyproject's `inflq` entry points, importing only `inflq.__all__` and
    `inflq._builtins_api` (what built-ins need beyond the contract), cheap to
    import (no torch at module level), and touching no core table (tests/test_architecture.py
    runs the same guards over every built-in)."""
    import ast
    import subprocess
    import sys
    from pathlib import Path

    import tomllib
    from test_architecture import builtin_names, private_inflq_imports

    import inflq

    root = Path(__file__).resolve().parents[1]
    eps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["entry-points"]["inflq"]
    assert eps["index"] == "inflq_builtins.gradient_index"
    path = root / "plugins" / "inflq_builtins" / "gradient_index.py"
    assert private_inflq_imports(ast.parse(path.read_text()), set(inflq.__all__), builtin_names()) == []
    code = "import sys, inflq_builtins.gradient_index; print(int('torch' in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "0"
    assert {"index"} <= set(get_registry().names("estimator")) and "index" in get_registry().names("filter")


def test_a_cancelled_build_resumes_from_its_committed_shards(proj, cli_run):
    """Ctrl-C (a cancelled Monitor) keeps the committed shards; the same build then completes them."""
    from inflq import Cancelled, Monitor, index
    from inflq.settings import RunSettings

    p = open_project(proj)
    settings = index.IndexSettings(k_s=3, k_a=3)
    monitor = Monitor()

    def on_progress(ev):
        if ev.phase == "index" and ev.done > 8:  # in the second shard: the first is committed
            monitor.cancel()

    monitor.on_progress = on_progress
    with pytest.raises(Cancelled):
        index_plugin.build(p, settings, RunSettings(), monitor, shard_size=8)
    row = index_plugin.recorded_indexes(p)[0]
    assert row["status"] == "building"
    folder = p.path(row["path"])
    first = (folder / "rows-000000.npy").stat().st_mtime_ns
    code, out, _ = cli_run("index", "list", proj)
    assert "incomplete" in out
    code, _, err = cli_run("run", proj, "--estimator", "index")
    assert code == 1 and "no complete gradient index" in err
    row, store = index_plugin.build(p, settings, RunSettings(), Monitor(), shard_size=8)
    assert row["status"] == "complete" and store.complete and (folder / "rows-000000.npy").stat().st_mtime_ns == first
    assert index_plugin.recorded_indexes(p)[0]["status"] == "complete"
    p.close()
