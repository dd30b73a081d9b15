"""Tracked-module selection, factor caching, and the engine's bad-input errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import assert_equal_to_rounding, make_model_dir
from inflq.engine import select_modules
from inflq.errors import InflqError, NumericalError
from inflq.modeling import load_model
from inflq.progress import Monitor
from inflq.queries import add_query
from inflq.runs import RunSettings, run_investigation


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {a: load_model(make_model_dir(root / a, a), torch.device("cpu"), torch.float32) for a in ("gpt2", "llama", "gpt_neox")}


def names(model, spec):
    return [t.name for t in select_modules(model, spec)]


def test_gpt2_presets_track_conv1d_natively(models):
    m = models["gpt2"]
    assert names(m, "all") == [f"transformer.h.{i}.{n}" for i in range(2) for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert names(m, "mlp") == [f"transformer.h.{i}.mlp.{n}" for i in range(2) for n in ("c_fc", "c_proj")]
    assert names(m, "attention") == [f"transformer.h.{i}.attn.{n}" for i in range(2) for n in ("c_attn", "c_proj")]
    tm = select_modules(m, "transformer.h.0.mlp.c_fc")[0]
    assert (tm.in_features, tm.out_features, tm.bias, tm.layer) == (16, 64, True, 0)  # Conv1D weight is (in, out)


def test_llama_and_neox_presets(models):
    llama = names(models["llama"], "all")
    assert "lm_head" not in llama and not any("embed" in n for n in llama)
    assert names(models["llama"], "mlp") == [f"model.layers.{i}.mlp.{n}" for i in range(2) for n in ("gate_proj", "up_proj", "down_proj")]
    assert len(names(models["llama"], "attention")) == 8
    neox = names(models["gpt_neox"], "all")
    assert "embed_out" not in neox
    assert names(models["gpt_neox"], "mlp") == [f"gpt_neox.layers.{i}.mlp.{n}" for i in range(2) for n in ("dense_h_to_4h", "dense_4h_to_h")]


def test_glob_patterns_and_errors(models):
    m = models["gpt2"]
    assert names(m, "transformer.h.1.*") == ["transformer.h.1.attn.c_attn", "transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"]
    with pytest.raises(InflqError, match="no linear module matches"):
        select_modules(m, "decoder.*")
    with pytest.raises(InflqError, match="tracks linear layers only"):
        select_modules(m, "transformer.wte")
    with pytest.raises(InflqError, match="tracks linear layers only"):
        select_modules(m, "transformer.h.0.ln_1")


def test_unsupported_layer_type_among_selected(models):
    class Odd(torch.nn.Module):  # a weight-bearing layer inflq has no Gauss-Newton block for
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(4, 4))

    model = models["gpt2"]
    model.transformer.h[1].mlp.odd = Odd()
    try:
        with pytest.raises(InflqError, match="cannot track"):
            select_modules(model, "mlp")
        assert len(select_modules(model, "attention")) == 4  # unaffected elsewhere
    finally:
        del model.transformer.h[1].mlp.odd


def test_factors_are_cached_reused_and_verified(project):
    add_query(project, "default", "the first president of astrobia was", "zorald pfaff")
    run_investigation(project, "default", RunSettings(estimator="ekfac", rank=None))
    assert project.db["factor_sets"].count == 1
    fs = next(project.db["factor_sets"].rows)
    mtime = (project.root / fs["path"]).stat().st_mtime_ns
    r2 = run_investigation(project, "default", RunSettings(estimator="ekfac:damping_factor=0.5", rank=None))
    assert project.db["factor_sets"].count == 1  # damping does not change the factors: reused
    assert (project.root / fs["path"]).stat().st_mtime_ns == mtime
    assert r2.phases["factors"] < 1.0
    # a corrupted artifact is an error naming it, never silently recomputed
    path = project.root / fs["path"]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(InflqError, match="fails its checksum"):
        run_investigation(project, "default", RunSettings(estimator="ekfac", rank=None))
    run_investigation(project, "default", RunSettings(estimator="ekfac", rank=None, refit=True))
    assert project.db["factor_sets"].count == 1
    run_investigation(project, "default", RunSettings(estimator="ekfac", rank=None))  # verifies again


def test_different_seed_or_sample_is_a_different_factor_set(project):
    add_query(project, "default", "the first president of astrobia was", "zorald pfaff")
    run_investigation(project, "default", RunSettings(estimator="kfac", seed=1))
    run_investigation(project, "default", RunSettings(estimator="kfac", seed=2))
    run_investigation(project, "default", RunSettings(estimator="kfac", seed=2, fit_sequences=10))
    assert project.db["factor_sets"].count == 3


def test_too_few_fitting_tokens_warns(project):
    add_query(project, "default", "the first president of astrobia was", "zorald pfaff")
    monitor = Monitor()
    run_investigation(project, "default", RunSettings(estimator="ekfac", fit_sequences=1), monitor)
    assert any("fitting tokens" in w for w in monitor.warnings)


def test_query_longer_than_context(project):
    with pytest.raises(InflqError, match="longer than the model's context"):
        add_query(project, "default", " ".join(["the red cat"] * 20), "runs")


def test_non_finite_gradients_are_reported(project):
    add_query(project, "default", "the first president of astrobia was", "zorald pfaff")
    model = project.runtime.model
    block = model.transformer.h[0].mlp.c_fc
    handle = block.register_forward_hook(lambda mod, args, out: out * torch.tensor(float("inf")))
    try:
        with pytest.raises(NumericalError, match="not finite"):
            run_investigation(project, "default", RunSettings(estimator="identity"))
    finally:
        handle.remove()
    status = project.db.execute("SELECT status, error FROM runs ORDER BY id DESC LIMIT 1").fetchone()
    assert status[0] == "failed" and "dtype" in status[1]


def test_self_influence_matches_definition(project):
    """Self-influence through the identity estimator is the squared gradient norm."""
    from inflq.engine import make_batch
    from inflq.reading import self_influence

    idx, vals = self_influence(project, "identity", indices=np.array([0, 3]))
    engine = project.runtime.engine()
    for i, v in zip(idx, vals):
        g = engine.sequence_gradients(make_batch([project.runtime.corpus.get(int(i))], project.runtime.pad_id))
        assert v == pytest.approx(sum(float((t**2).sum()) for t in g.values()), rel=1e-4)


def test_empirical_fisher_is_deterministic_and_a_separate_factor_set(project):
    """fisher=empirical uses the data's labels: no sampling, so any seed gives the same factors."""
    from inflq.runs import make_estimator

    add_query(project, "default", "the first president of astrobia was", "zorald pfaff")
    run_investigation(project, "default", RunSettings(estimator="ekfac:fisher=empirical", seed=1))
    run_investigation(project, "default", RunSettings(estimator="ekfac:fisher=empirical", seed=2))
    run_investigation(project, "default", RunSettings(estimator="ekfac", seed=1))
    rows = list(project.db["factor_sets"].rows_where(order_by="id"))
    assert [json.loads(r["settings"])["fisher"] for r in rows] == ["empirical", "empirical", "true"]
    from inflq.artifacts import load_tensors

    a, b, c = (load_tensors(project.root, r["path"], r["checksum"]) for r in rows)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.allclose(a[k], c[k]) for k in a if k.startswith("lambda/"))
    assert make_estimator("ekfac:fisher=empirical").factor_settings() == {"fisher": "empirical"}


def test_result_sets_say_which_damping_they_used(project):
    from inflq.reading import estimator_summary, result_set

    add_query(project, "default", "the first president of astrobia was", "zorald pfaff")
    run_investigation(project, "default", RunSettings(estimator="ekfac:damping=0.5", rank=4, full_rank_mb=0))
    line = estimator_summary(result_set(project, "default"))
    assert "damping 0.5 (λ mean 0.5)" in line and line.endswith("rank 4")
    # One query: rank-4 factors are cheaper to score with on every module wider than 4.
    run_investigation(project, "default", RunSettings(estimator="ekfac", rank=4))
    rs = result_set(project, "default")
    assert json.loads(rs["settings"])["full_rank_modules"] == []
    # Many queries: the sequence-gradient contraction wins, so the modules stay at full rank.
    for i in range(40):
        add_query(project, "default", f"the red cat number {i}", " runs")  # a known word: a completion of <unk> only is refused
    run_investigation(project, "default", RunSettings(estimator="ekfac", rank=4))
    settings = json.loads(result_set(project, "default")["settings"])
    assert settings["full_rank_modules"], "no module kept at full rank for 41 queries"
    full, modules = settings["full_rank_modules"], settings["modules"]
    line = estimator_summary(result_set(project, "default"))
    assert line.endswith("full rank") if set(full) == set(modules) else f"({len(full)} of {len(modules)} modules full rank" in line
    run_investigation(project, "default", RunSettings(estimator="ekfac", rank=None))
    line = estimator_summary(result_set(project, "default"))
    assert "damping 0.1 × mean eigenvalue" in line and "full rank" in line


def test_non_finite_gradient_with_a_finite_loss_names_the_module(project):
    """An overflow in the backward pass only (the loss is finite) is caught per module."""
    from inflq.engine import make_batch

    engine = project.runtime.engine()
    block = project.runtime.model.transformer.h[1]
    handle = block.register_full_backward_pre_hook(lambda mod, grad_out: tuple(g * float("inf") for g in grad_out))
    try:
        batch = make_batch([project.runtime.corpus.get(0), project.runtime.corpus.get(1)], project.runtime.pad_id)
        with pytest.raises(NumericalError, match=r"non-finite gradients in transformer\.h\.[01]\."):
            engine.capture(batch, "data")
    finally:
        handle.remove()


def test_sampled_labels_follow_the_models_distribution(project):
    """The true Fisher's labels are drawn from the model's predictive distribution: over many
    seeds, label frequencies at a position match softmax(logits) there."""
    from inflq.engine import make_batch

    engine = project.runtime.engine()
    toks = project.runtime.corpus.get(0)[:6]
    logits = engine.model(input_ids=torch.as_tensor(toks)[None]).logits[0, 2].detach().float()
    probs = torch.softmax(logits, -1)
    n = 4000
    batch = make_batch([toks] * n, project.runtime.pad_id, sample_seeds=list(range(n)))
    big = engine.model(input_ids=batch.input_ids).logits
    captured = []
    original = engine.sample_labels

    def spy(logits, batch):
        captured.append(original(logits, batch))
        return captured[-1]

    import unittest.mock

    with unittest.mock.patch.object(engine, "sample_labels", spy):
        engine.losses(big, batch, "sampled")
    labels = captured[0].view(n, -1)[:, 2]
    freq = torch.bincount(labels, minlength=probs.numel()).float() / n
    top = probs.argsort(descending=True)[:5]
    assert torch.allclose(freq[top], probs[top], atol=4 * float((probs[top] * (1 - probs[top]) / n).sqrt().max()) + 1e-3)
    assert float(freq[probs < 1e-6].sum()) == 0.0


def whole_cross_entropy(logits, batch, labels, engine):
    """The loss as inflq computed it before issue 17: one ``cross_entropy`` over all ``[B·T, V]``."""
    B, T, V = logits.shape
    if labels == "data":
        targets = torch.zeros_like(batch.input_ids)
        targets[:, :-1] = batch.input_ids[:, 1:]
    else:
        targets = engine.sample_labels(logits, batch)
    ce = torch.nn.functional.cross_entropy(logits.float().reshape(-1, V), targets.reshape(-1), reduction="none").view(B, T)
    return ce * batch.loss_mask


@pytest.mark.parametrize("rows", [1, 3, 7, 1000])
def test_rowwise_cross_entropy_is_bitwise_the_whole_one(models, monkeypatch, rows):
    """The loss computed a block of rows at a time (issue 17: no [B, T, vocab] log-softmax or
    gradient copies) gives bitwise the values, the logits' gradients and the whole captures of one
    cross-entropy over all rows, with data and with sampled labels, on a right-padded batch, and
    whether or not its backward pass writes over the logits."""
    import inflq.engine as engine_module
    from inflq.engine import GradientEngine, make_batch

    monkeypatch.setattr(engine_module, "_LOSS_ROWS", rows)
    model = models["gpt2"]
    engine = GradientEngine(model, select_modules(model, "all"))
    gen = np.random.default_rng(0)
    V = model.get_input_embeddings().num_embeddings
    seqs = [gen.integers(0, V, size=n).tolist() for n in (9, 6, 8)]
    batch = make_batch(seqs, 0, sample_seeds=[5, 6, 7])
    for labels in ("data", "sampled"):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.detach()
        want_x = logits.clone().requires_grad_(True)
        want = whole_cross_entropy(want_x, batch, labels, engine)
        (want_grad,) = torch.autograd.grad(want.sum(), want_x)
        for consume in (False, True):
            x = logits.clone().requires_grad_(True)
            got = engine.losses(x, batch, labels, consume=consume)
            assert torch.equal(got, want)
            (grad,) = torch.autograd.grad(got.sum(), x)
            assert torch.equal(grad, want_grad)
            assert consume or torch.equal(x.detach(), logits)  # not consumed: the logits are intact
        caps, loss = engine.capture(batch, labels)
        with monkeypatch.context() as m:
            m.setattr(engine, "losses", lambda lg, b, lab, consume=False: whole_cross_entropy(lg, b, lab, engine))
            want_caps, want_loss = engine.capture(batch, labels)
        assert torch.equal(loss, want_loss)
        for name, cap in caps.items():
            assert torch.equal(cap.gradients, want_caps[name].gradients), name
            assert torch.equal(cap.activations, want_caps[name].activations), name
            assert float(cap.gradients.abs().max()) > 0


def test_rowwise_cross_entropy_is_bitwise_at_a_real_vocabulary():
    """The same at GPT-2's vocabulary width (50,257: the vectorised kernels' row tails differ from
    a tiny vocabulary's), in blocks that do not divide the rows, with masked-out rows."""
    from inflq.engine import _RowwiseCrossEntropy

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(37, 50257, generator=gen) * 3
    targets = torch.randint(0, 50257, (37,), generator=gen)
    weights = (torch.rand(37, generator=gen) > 0.2).float()
    x = logits.clone().requires_grad_(True)
    want = torch.nn.functional.cross_entropy(x, targets, reduction="none")
    (want_grad,) = torch.autograd.grad((want * weights).sum(), x)
    for rows in (5, 16, 64):
        for consume in (False, True):
            y = logits.clone().requires_grad_(True)
            got = _RowwiseCrossEntropy.apply(y, targets, rows, consume)
            assert torch.equal(got, want.detach())
            (grad,) = torch.autograd.grad((got * weights).sum(), y)
            assert torch.equal(grad, want_grad)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_batch_split_into_passes_captures_bitwise_what_one_pass_does(models, arch):
    """Where a batch holds more padded tokens than ``pass_tokens``, capture runs one forward and
    backward pass per group of sequences (issue 17: memory holds one group's autograd graph) and
    gets the captures and losses of one pass over the batch, with data and sampled labels, right
    padding included (groups of 1, 2 and 4 sequences, the last one shorter): losses bitwise, captures
    to the last bit of float32 (the groups' matrix products have other shapes, which BLAS may block
    differently)."""
    import inflq.engine as engine_module
    from inflq.engine import GradientEngine, make_batch

    model = models[arch]
    whole = GradientEngine(model, select_modules(model, "all"), pass_tokens=0)
    auto = GradientEngine(model, whole.tracked)  # the CPU's default: split only batches with large captures
    per_token = 4 * sum(t.in_dim + t.out_features for t in whole.tracked)
    assert auto.pass_tokens is None and auto._pass_tokens(4096) == 0  # a tiny model's batch: one pass
    with pytest.MonkeyPatch.context() as m:
        m.setattr(engine_module, "_SPLIT_ABOVE", 10 * per_token)
        m.setattr(engine_module, "_PASS_TOKENS", 2)
        assert auto._pass_tokens(10) == 0 and auto._pass_tokens(11) == engine_module._PASS_BYTES // per_token
        m.setattr(engine_module, "_PASS_BYTES", 18 * per_token)
        assert auto._pass_tokens(11) == 18  # 2 sequences of 9 tokens per pass below
        batch = make_batch([[5] * 9] * 4, 0)
        assert torch.equal(auto.capture(batch)[1], whole.capture(batch)[1])
        calls = []
        m.setattr(auto, "_capture", lambda b, labels, reuse=False: calls.append(b.size) or whole._capture(b, labels, reuse))
        auto.capture(batch)
        assert calls == [2, 2]
    V = model.get_input_embeddings().num_embeddings
    gen = np.random.default_rng(1)
    seqs = [gen.integers(3, V, size=n).tolist() for n in (9, 6, 8, 9, 3)]
    batch = make_batch(seqs, 0, sample_seeds=[21, 22, 23, 24, 25], loss_from=[0, 2, 0, 4, 0])
    for labels in ("data", "sampled"):
        want, want_loss = whole.capture(batch, labels)
        for rows in (1, 2, 4):
            split = GradientEngine(model, whole.tracked, pass_tokens=rows * 9 + 1)
            got, loss = split.capture(batch, labels)
            assert torch.equal(loss, want_loss)
            assert list(got) == list(want)
            for name in want:
                assert_equal_to_rounding(got[name].activations, want[name].activations, what=(labels, rows, name))
                assert_equal_to_rounding(got[name].gradients, want[name].gradients, what=(labels, rows, name))
        assert float(want_loss.min()) > 0


def test_a_shard_holds_one_batchs_captures_at_a_time(models):
    """run_shard drops a batch's captures before it captures the next (issue 17: on GPT-2 small a
    batch's captures are 1.2 GB), for sum and concat passes alike; where the engine splits a batch
    into groups of sequences, the pass consumes each group's captures before the next group is
    captured, and sums and rows are those of unsplit batches."""
    import weakref

    from inflq import Pass, SumPass
    from inflq.engine import GradientEngine
    from inflq.passes import Shard, run_shard

    model = models["gpt2"]
    V = model.get_input_embeddings().num_embeddings
    gen = np.random.default_rng(2)
    seqs = [gen.integers(3, V, size=6).tolist() for _ in range(6)]
    alive: list[weakref.ref] = []
    sizes: list[int] = []  # the batches captured
    seen: list[int] = []  # the batches the sum pass was given

    class Checking(GradientEngine):
        def _capture(self, batch, labels, reuse=False):
            assert all(r() is None for r in alive), "the previous captures are still held"
            sizes.append(batch.size)
            caps, loss = super()._capture(batch, labels, reuse)
            alive.extend(weakref.ref(c.gradients) for c in caps.values())
            return caps, loss

    class Sums(SumPass):
        labels = "data"

        def _parts(self, batch, captures):
            seen.append(next(iter(captures.values())).gradients.shape[0])
            yield "n", torch.tensor([float(batch.size)], dtype=torch.float64)
            yield "g", sum(c.gradients.double().sum() for c in captures.values()).reshape(1)

    class Rows(Pass):
        combine = "concat"

        def process(self, engine, batch, captures):
            return {"n": torch.full((batch.size,), float(len(captures))), "g": captures["transformer.h.0.mlp.c_fc"].gradients.sum((1, 2))}

    def shard(engine, pass_):
        return run_shard(engine, lambda idx: [seqs[i] for i in idx], pass_, Shard(0, np.arange(6)), 0, 3)

    whole = Checking(model, select_modules(model, "all"), pass_tokens=0)
    want_sums = shard(whole, Sums())
    assert float(want_sums["n"]) == 6.0 and sizes == [3, 3]
    assert len(alive) == 2 * len(whole.tracked)
    want_rows = shard(whole, Rows())
    assert want_rows["n"].tolist() == [float(len(whole.tracked))] * 6

    sizes.clear()
    seen.clear()
    split = Checking(model, select_modules(model, "all"), pass_tokens=6)  # groups of one sequence
    got = shard(split, Sums())
    assert sizes == [1] * 6 and seen == [1] * 6  # captured and consumed a group at a time
    assert float(got["n"]) == 6.0 and torch.allclose(got["g"], want_sums["g"], rtol=1e-5, atol=1e-7)
    rows = shard(split, Rows())
    assert rows["n"].tolist() == want_rows["n"].tolist()
    assert_equal_to_rounding(rows["g"], want_rows["g"])  # each sequence's rows are those of the unsplit batch


def test_the_allocator_policy_follows_the_batch_unless_the_user_chose(monkeypatch):
    """On glibc Linux the engine chooses malloc's policy once per process from a batch's captures
    (issue 27): up to 512 MiB the heap keeps freed memory (mmap threshold 32 MiB, trim threshold
    1 GiB: no page faults per batch), beyond it blocks of 1 MiB and more are mapped and returned
    (issue 17: memory bounded at real widths). Where the user set MALLOC_MMAP_THRESHOLD_ or
    MALLOC_TRIM_THRESHOLD_ their choice stands and mallopt is not called."""
    import ctypes
    import platform
    import sys

    import inflq.engine as engine_module

    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    calls: list[tuple[int, int]] = []

    class FakeC:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(ctypes, "CDLL", lambda *_a, **_k: FakeC())
    for var in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.setattr(engine_module, "_allocator_policy", None)
        monkeypatch.setenv(var, "131072")
        assert engine_module.tune_allocator(1) == "default" and calls == []
        monkeypatch.delenv(var)
    monkeypatch.setattr(engine_module, "_allocator_policy", None)
    assert engine_module.tune_allocator(512 << 20) == ("keep" if glibc else "default")
    assert calls == ([(-3, 32 << 20), (-1, 1 << 30)] if glibc else [])
    assert engine_module.tune_allocator(1 << 40) == ("keep" if glibc else "default")  # decided once per process
    assert len(calls) == (2 if glibc else 0)
    monkeypatch.setattr(engine_module, "_allocator_policy", None)
    calls.clear()
    assert engine_module.tune_allocator((512 << 20) + 1) == ("bounded" if glibc else "default")
    assert calls == ([(-3, 1 << 20)] if glibc else [])
