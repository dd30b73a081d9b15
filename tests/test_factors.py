"""`inflq factors`: cached factor sets listed, fitted ahead of a run (resumably), shown, removed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_cli import _catalog_dump, _one_line_error

from inflq import Executor, catalog
from inflq.artifacts import load_tensors
from inflq.factor_sets import factor_sets, remove_factor_set, spectra, spectrum_plot
from inflq.progress import Monitor
from inflq.queries import add_query
from inflq.runs import RunSettings, fit_factors, run_investigation


def test_fit_ahead_then_every_investigation_reuses_it(project):
    run_id, fs_id, _ = fit_factors(project, RunSettings(estimator="ekfac"))
    row = project.db["runs"].get(run_id)
    assert row["kind"] == "factors" and row["status"] == "done" and row["factor_set_id"] == fs_id
    add_query(project, "default", "the first president of astrobia was", "zorald pfaff")
    catalog.create_investigation(project.db, "other")
    add_query(project, "other", "a river flows through the old", "town")
    for inv in ("default", "other"):
        result = run_investigation(project, inv, RunSettings(estimator="ekfac"))
        assert project.db["runs"].get(result.run_id)["factor_set_id"] == fs_id
    (listed,) = factor_sets(project)
    assert listed["id"] == fs_id and listed["runs"] == 3 and listed["current_model"]
    assert listed["size_bytes"] == (project.root / listed["path"]).stat().st_size
    # An estimator without factors fits nothing.
    assert fit_factors(project, RunSettings(estimator="identity"))[1] is None


def test_spectra_are_the_fitted_eigenvalues_with_the_runs_damping(project):
    _, fs_id, _ = fit_factors(project, RunSettings(estimator="ekfac"))
    row = project.db["factor_sets"].get(fs_id)
    tensors = load_tensors(project.root, row["path"], row["checksum"])
    items = spectra(project, fs_id)
    assert [sp.module for sp in items] == json.loads(row["modules"])
    for sp in items:
        lam = tensors[f"lambda/{sp.module}"].double().flatten().numpy()
        np.testing.assert_allclose(sp.eigenvalues, np.sort(lam)[::-1])
        assert sp.damping == pytest.approx(0.1 * lam.mean())
        clipped = np.clip(lam, 0, None)
        assert sp.effective_dimension == pytest.approx((clipped / (clipped + sp.damping)).sum())
        assert sp.below_damping == pytest.approx((lam < sp.damping).mean())
    # An absolute damping larger than every eigenvalue leaves little to tell apart.
    big = spectra(project, fs_id, damping=1e6)
    assert all(sp.below_damping == 1.0 and sp.effective_dimension < 1 for sp in big)
    only = spectra(project, fs_id, modules="*.mlp.*")
    assert only and all(".mlp." in sp.module for sp in only)
    plot = spectrum_plot(items, width=60, height=12)
    assert "eigenvalue" in plot and len(plot.splitlines()) >= 10


def test_diagonal_factors_have_a_spectrum_too(project):
    _, fs_id, _ = fit_factors(project, RunSettings(estimator="diagonal"))
    assert all(sp.eigenvalues.size == np.prod(tm.shape) for sp, tm in zip(spectra(project, fs_id), project.runtime.engine().tracked, strict=True))


def test_removed_factor_set_is_refit_when_needed(project):
    add_query(project, "default", "the first president of astrobia was", "zorald pfaff")
    first = run_investigation(project, "default", RunSettings(estimator="ekfac"))
    fs_id = project.db["runs"].get(first.run_id)["factor_set_id"]
    path = remove_factor_set(project, fs_id)
    assert not (project.root / path).exists() and factor_sets(project) == []
    assert project.db["runs"].get(first.run_id)["factor_set_id"] is None
    again = run_investigation(project, "default", RunSettings(estimator="ekfac"))
    assert project.db["runs"].get(again.run_id)["factor_set_id"] is not None


def test_interrupted_fit_resumes_from_its_committed_shards(project, monkeypatch):
    """Cancel the fit after its first committed covariance shard; --resume finishes it with the same factors."""
    from inflq.errors import Cancelled

    settings = RunSettings(estimator="ekfac", shard_size=6)
    monitor = Monitor()
    seen = []

    def on_progress(ev):
        seen.append(ev.phase)
        if ev.phase == "eigenvalue correction" and ev.done >= 6:
            monitor.cancel()

    monitor.on_progress = on_progress
    with pytest.raises(Cancelled):
        fit_factors(project, settings, monitor)
    run_id = project.db.execute("SELECT max(id) FROM runs").fetchone()[0]
    assert project.db["runs"].get(run_id)["status"] == "cancelled"
    committed = project.db.execute("SELECT count(*) FROM fit_shards WHERE run_id = ?", [run_id]).fetchone()[0]
    assert committed >= 4  # every covariance shard: the resumed fit starts at the correction pass
    with pytest.raises(Exception, match="factor fit"):
        run_investigation(project, "default", RunSettings(), resume=run_id)
    _, fs_id, _ = fit_factors(project, RunSettings(), resume=run_id)
    resumed = load_tensors(project.root, project.db["factor_sets"].get(fs_id)["path"], None)
    _, again_id, _ = fit_factors(project, RunSettings(estimator="ekfac", shard_size=6, refit=True))
    fresh = load_tensors(project.root, project.db["factor_sets"].get(again_id)["path"], None)
    assert all(torch.equal(resumed[k], fresh[k]) for k in fresh)


def test_factors_cli(project, cli_run):
    root = project.root
    code, out, err = cli_run("factors", "list", root)
    assert code == 0 and "no factor sets yet" in out
    code, out, err = cli_run("factors", "fit", root, "--estimator", "ekfac:fisher=empirical")
    assert code == 0, err
    assert "factor set 1 ready" in out
    code, out, _ = cli_run("factors", "list", root, "--json")
    (row,) = json.loads(out)
    assert row["estimator"] == "ekfac" and json.loads(row["settings"]) == {"fisher": "empirical"}
    code, out, err = cli_run("factors", "show", root, "1", "--modules", "*.mlp.c_fc")
    assert code == 0, err
    assert "eff. dim" in out and "(under transformer.h.)" in out and "0.mlp.c_fc" in out and "under the damping" in out
    code, out, _ = cli_run("factors", "show", root, "1", "--json", "--no-plot")
    assert {d["module"] for d in json.loads(out)} == set(project.runtime.engine().names)
    before = _catalog_dump(root)
    code, _, err = cli_run("factors", "show", root, "7")
    _one_line_error(code, err)
    assert "no factor set 7" in err and _catalog_dump(root) == before
    code, _, err = cli_run("factors", "show", root, "1", "--modules", "nothing.*")
    _one_line_error(code, err)
    assert "no module matches" in err
    code, out, err = cli_run("factors", "rm", root, "1", "--yes")
    assert code == 0 and "removed factor set 1" in out
    assert json.loads(cli_run("factors", "list", root, "--json")[1]) == []


def test_factors_fitted_with_the_old_sampling_rule_are_never_reused(project):
    """True-Fisher factors record where their labels were sampled; a set fitted by an older inflq
    (labels at every real token, no rule recorded) stays listed, with its rule, and a run fits
    anew instead of reusing it."""
    import hashlib

    from inflq.engine import SAMPLED_AT
    from inflq.factor_sets import OLD_SAMPLING_RULE
    from inflq.project import Project
    from inflq.runs import make_estimator

    assert make_estimator("ekfac").factor_settings() == {"fisher": "true", "sampled_at": SAMPLED_AT}
    _, fs_id, _ = fit_factors(project, RunSettings(estimator="ekfac"))
    row = project.db["factor_sets"].get(fs_id)
    assert json.loads(row["settings"]) == {"fisher": "true", "sampled_at": "loss positions"}
    # Rewrite the row as an older inflq stored it: settings without the rule, and the cache key
    # computed from them (the key's sources are in the artifact's metadata).
    from safetensors import safe_open

    with safe_open(str(project.root / row["path"]), "pt") as f:
        key_src = json.loads(f.metadata()["key"])

    def key_of(src: dict) -> str:
        return hashlib.sha256(json.dumps(src, sort_keys=True).encode()).hexdigest()[:24]

    assert key_of(key_src) == row["key"]
    old_settings = json.dumps({"fisher": "true"}, sort_keys=True)
    old_key = key_of({**key_src, "settings": {"fisher": "true"}})
    with project.db.atomic():
        project.db["factor_sets"].update(fs_id, {"settings": old_settings, "key": old_key})
    project.close()
    reopened = Project.open(project.root)  # an old catalog still opens
    try:
        (listed,) = factor_sets(reopened)
        assert json.loads(listed["settings"]) == {"fisher": "true", "sampled_at": OLD_SAMPLING_RULE}
        _, again, _ = fit_factors(reopened, RunSettings(estimator="ekfac"))
        assert again != fs_id
        rules = {r["id"]: json.loads(r["settings"])["sampled_at"] for r in factor_sets(reopened)}
        assert rules == {fs_id: OLD_SAMPLING_RULE, again: SAMPLED_AT}
    finally:
        reopened.close()


class _Sums:
    """An estimator whose factors are the covariance pass's sums themselves."""

    @staticmethod
    def make():
        from inflq import Estimator
        from inflq_builtins.estimators import CovariancePass

        class SumsOnly(Estimator):
            name = "sums-only"
            fits_factors = True

            def fit(self, ctx):
                return {k: v.clone() for k, v in ctx.run_pass(CovariancePass()).items()}

        return SumsOnly()


class _Executor(Executor):
    """An executor that runs shards in the order ``order`` gives them, each reported as its own
    sums (no ``Job.sums``, as a remote executor would), and fails after ``fail_after`` shards."""

    def __init__(self, order=reversed, fail_after=None):
        super().__init__()
        self.order, self.fail_after = order, fail_after

    def map(self, job, shards, on_result, monitor):
        for i, shard in enumerate(self.order(list(shards))):
            if self.fail_after is not None and i == self.fail_after:
                raise RuntimeError("worker lost")
            on_result(shard, job.local.run(job.pass_, shard, job.batch_size, monitor))

    def close(self):
        pass


def _fit_sums(project, executor, run_id, settings):
    from inflq.runs import ensure_factors

    fs_id = ensure_factors(project, _Sums.make(), project.runtime.engine(), executor, settings, Monitor(), run_id=run_id)
    return load_tensors(project.root, project.db["factor_sets"].get(fs_id)["path"], None)


def test_fitting_sums_are_one_running_sum_whatever_the_executor(project):
    """In this process every shard adds into one running sum, committed as one file through the
    last shard (disk and memory hold one set of sums); shards reported out of order, each as its
    own sums, wait on disk and are folded in shard order; after a crash either way a resume
    completes the same sums as one shard over every sequence."""
    from inflq.passes import Shard, run_shard
    from inflq.runs import make_executor, start_run
    from inflq_builtins.estimators import CovariancePass

    settings = RunSettings(shard_size=5, batch_size=3, refit=True)
    n = len(project.runtime.corpus)
    want = run_shard(project.runtime.engine(), project.runtime.corpus.many, CovariancePass(), Shard(0, np.arange(n)), project.runtime.pad_id, 3)
    local = make_executor("local")

    def close(got):
        assert set(got) == set(want)
        for key in want:
            # Batches differ from the reference's (float32 Gram matrices per batch); a shard lost or
            # counted twice would be off by a fifth.
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5 * float(want[key].abs().max()))

    # Shards as their own sums, in order, interrupted after 3 of 5: one file per shard; resumed here.
    run_id = start_run(project, "default", settings, kind="factors")
    with pytest.raises(RuntimeError, match="worker lost"):
        _fit_sums(project, _Executor(order=list, fail_after=3), run_id, settings)
    rows = list(project.db["fit_shards"].rows_where("run_id = ?", [run_id]))
    assert sorted(r["shard"] for r in rows) == [0, 1, 2] and not any("upto" in r["path"] for r in rows)
    close(_fit_sums(project, local, run_id, settings))

    # Local, interrupted after 3 of 5 shards: one running-sum file, which all 3 rows point to.
    run_id = start_run(project, "default", settings, kind="factors")
    calls = []

    class Stopping(Executor):  # the local executor, stopped after 3 shards
        def map(self, job, shards, on_result, monitor):
            def counted(shard, out):
                on_result(shard, out)
                calls.append(shard.index)
                if len(calls) == 3:
                    raise RuntimeError("worker lost")

            local.map(job, shards, counted, monitor)

        def close(self):
            pass

    with pytest.raises(RuntimeError, match="worker lost"):
        _fit_sums(project, Stopping(), run_id, settings)
    rows = list(project.db["fit_shards"].rows_where("run_id = ?", [run_id]))
    assert sorted(r["shard"] for r in rows) == [0, 1, 2] and {r["path"].rsplit("/", 1)[1] for r in rows} == {"fit-0-upto-000002.safetensors"}
    assert [p.name for p in (project.root / "artifacts" / "runs" / str(run_id)).glob("fit-*")] == ["fit-0-upto-000002.safetensors"]
    close(_fit_sums(project, local, run_id, settings))  # resumed: shards 3 and 4 extend the running sum
    assert not list((project.root / "artifacts" / "runs" / str(run_id)).glob("fit-*"))

    # Out of order (4, 3, ... as their own sums), crashed after 2: a resume in this process folds
    # the waiting shards in order once shards 0-2 are done.
    run_id = start_run(project, "default", settings, kind="factors")
    with pytest.raises(RuntimeError, match="worker lost"):
        _fit_sums(project, _Executor(fail_after=2), run_id, settings)
    assert sorted(r["shard"] for r in project.db["fit_shards"].rows_where("run_id = ?", [run_id])) == [3, 4]
    close(_fit_sums(project, local, run_id, settings))
    assert n > 4 * settings.shard_size
    close(_fit_sums(project, _Executor(), start_run(project, "default", settings, kind="factors"), settings))


def test_packed_covariance_sums_give_bitwise_the_factors_of_square_ones(project):
    """Covariance sums kept as packed upper triangles (issue 17: half the memory) hold exactly the
    upper triangles of the square sums inflq kept before, so the float64 eigendecompositions (which
    read the upper triangle only) are bitwise the same; a running sum of squares (a fit resumed
    from before the packing) is packed before the next batch is added."""
    from inflq import SumPass, add_into, eigh, gram, pack_upper, unpack_upper
    from inflq.passes import Shard, run_shard
    from inflq_builtins.estimators import CovariancePass, symmetric

    class SquarePass(CovariancePass):  # the sums as inflq kept them before issue 17
        accumulate = SumPass.accumulate

        def _parts(self, batch, captures):
            for key, v in super()._parts(batch, captures):
                if key[:2] in ("A/", "S/"):
                    c = captures[key[2:]]
                    x = c.activations if key[0] == "A" else c.gradients
                    v = gram(x.reshape(-1, x.shape[-1]), symmetric=False)
                yield key, v

    engine = project.runtime.engine()
    shard = Shard(0, np.arange(len(project.runtime.corpus)))
    packed = run_shard(engine, project.runtime.corpus.many, CovariancePass(), shard, project.runtime.pad_id, 3)
    square = run_shard(engine, project.runtime.corpus.many, SquarePass(), shard, project.runtime.pad_id, 3)
    assert set(packed) == set(square)
    keys = [k for k in square if k[:2] in ("A/", "S/")]
    assert keys
    for key in keys:
        n = square[key].shape[0]
        assert packed[key].shape == (n * (n + 1) // 2,) and packed[key].dtype == torch.float64
        assert torch.equal(packed[key], pack_upper(square[key]))
        assert torch.equal(unpack_upper(packed[key]), torch.triu(square[key]))
        assert torch.equal(symmetric(packed[key]), symmetric(square[key]))
        want_vals, want_vecs = eigh(square[key] / 7.0)
        got_vals, got_vecs = eigh(unpack_upper(packed[key]) / 7.0)
        assert torch.equal(got_vals, want_vals) and torch.equal(got_vecs, want_vecs), key
    # Resumed from a running sum of squares: the next batches add into its packed form.
    half = Shard(0, np.arange(4))
    rest = Shard(1, np.arange(4, len(project.runtime.corpus)))
    sums = run_shard(engine, project.runtime.corpus.many, SquarePass(), half, project.runtime.pad_id, 4)
    from inflq.engine import make_batch

    pass_ = CovariancePass()
    seqs = project.runtime.corpus.many(rest.indices)
    batch = make_batch(seqs, project.runtime.pad_id, sample_seeds=[pass_.seed + 1000 + i for i in range(len(seqs))])
    caps, _ = engine.capture(batch, "sampled")
    pass_.accumulate(engine, batch, caps, sums)
    expect = run_shard(engine, project.runtime.corpus.many, CovariancePass(), half, project.runtime.pad_id, 4)
    for k, v in pass_._parts(batch, caps):
        add_into(expect, {k: v}, torch.float64)
    for key in keys:
        assert torch.equal(sums[key], expect[key]), key
    with pytest.raises(ValueError, match="no packed upper triangle"):
        unpack_upper(torch.zeros(5, dtype=torch.float64))
