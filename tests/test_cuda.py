"""The GPU check (issue 27): every CUDA path on a small model, against the same work on the CPU.

Marked ``cuda`` and skipped without a CUDA device, so that CI (no GPU) passes by skipping; run them
with ``pytest -m cuda`` on a machine with one, or all at once with ``benchmarks/bench_gpu.sh``
(docs/benchmarks.md, "The GPU check"). ``INFLQ_DEVICE_TESTS=cpu pytest -m cuda`` runs the same
tests with the CPU standing in for the device (a smoke run of the tests' own code: every
comparison is then the CPU against itself).

What runs on the device: the engine's captures in float32, bfloat16 and float16 (sampled and data
labels, right padding); the float64 eigendecomposition; the token budget from the device's free
memory; a whole ``inflq run --device cuda`` against ``--device cpu`` (the empirical Fisher to
float32 rounding, the true Fisher to the rounding of the sampled labels' softmax); the gradient
index's build; a Ray executor with one GPU actor.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import make_model_dir, write_corpus

pytestmark = pytest.mark.cuda

ON_CPU = os.environ.get("INFLQ_DEVICE_TESTS") == "cpu"


@pytest.fixture(scope="module")
def device() -> str:
    if ON_CPU:
        return "cpu"
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (INFLQ_DEVICE_TESTS=cpu runs these tests on the CPU)")
    return "cuda"


def rel_err(got, want) -> float:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def corr(a, b) -> float:
    return float(np.corrcoef(np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel())[0, 1])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("cuda") / "model", "gpt2", width=32, layers=2)


def _batch(model, seeds=(11, 12, 13, 14)):
    from inflq.engine import make_batch

    V = model.get_input_embeddings().num_embeddings
    gen = np.random.default_rng(0)
    seqs = [gen.integers(3, V, size=n).tolist() for n in (9, 6, 8, 3)]
    return make_batch(seqs, 0, sample_seeds=list(seeds))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("labels", ["data", "sampled"])
def test_engine_captures_on_the_device_match_the_cpu(device, model_dir, dtype, labels):
    """Captures and losses on the device equal the CPU's float32 ones: to float32 rounding in
    float32, to the format's precision in bfloat16 and float16; padding stays exactly zero; the
    captures come back float32 on the device, through the reused buffers as a fit takes them."""
    from inflq.engine import GradientEngine, select_modules
    from inflq.modeling import load_model

    cpu_model = load_model(model_dir, torch.device("cpu"), torch.float32)
    want_engine = GradientEngine(cpu_model, select_modules(cpu_model, "all"))
    batch = _batch(cpu_model)
    want, want_loss = want_engine.capture(batch, labels)

    dev_model = load_model(model_dir, torch.device(device), getattr(torch, dtype))
    engine = GradientEngine(dev_model, select_modules(dev_model, "all"))
    on_dev = type(batch)(batch.input_ids.to(device), batch.attention_mask.to(device), batch.loss_mask.to(device), batch.sample_seeds)
    tol = {"float32": 1e-4, "bfloat16": 6e-2, "float16": 1e-2}[dtype]
    for reuse in (False, True):
        (_, got, loss), = list(engine.capture_parts(on_dev, labels, reuse=reuse))
        assert rel_err(loss.float().cpu(), want_loss) < tol
        for name, cap in got.items():
            assert cap.activations.device.type == torch.device(device).type and cap.activations.dtype == torch.float32
            a, g = cap.activations.cpu(), cap.gradients.cpu()
            assert torch.isfinite(a).all() and torch.isfinite(g).all(), name
            assert rel_err(a, want[name].activations) < tol, (name, reuse)
            assert rel_err(g, want[name].gradients) < (tol if labels == "data" or dtype == "float32" else 10 * tol), (name, reuse)
            assert float(a[3, 3:].abs().max()) == 0.0 and float(g[3, 2:].abs().max()) == 0.0  # padding and the last token


def test_sampled_labels_do_not_depend_on_the_device(device, model_dir):
    """The sampler's uniforms come from CPU generators on every device: the same labels on the
    device as on the CPU wherever the two softmaxes do not straddle a uniform (all of them here)."""
    from inflq.engine import GradientEngine
    from inflq.modeling import load_model

    cpu_model = load_model(model_dir, torch.device("cpu"), torch.float32)
    batch = _batch(cpu_model)
    logits = cpu_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.detach()
    want = GradientEngine.sample_labels(logits, batch)
    on_dev = type(batch)(batch.input_ids.to(device), batch.attention_mask.to(device), batch.loss_mask.to(device), batch.sample_seeds)
    got = GradientEngine.sample_labels(logits.to(device), on_dev)
    assert got.device.type == torch.device(device).type
    assert torch.equal(got.cpu(), want)


def test_eigendecomposition_on_the_device_matches_the_cpu(device):
    """inflq.eigh on the device (float64, cuSOLVER) against LAPACK on the CPU: eigenvalues and
    the matrix they rebuild, from a packed covariance sum as a fit hands it over."""
    from inflq import eigh, pack_upper
    from inflq_builtins.estimators import eigendecompose_sum

    x = torch.randn(700, 300, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    cov = x.T @ x
    want_values, want_vectors = eigh(torch.triu(cov), "cpu")
    values, vectors = eigh(torch.triu(cov), device)
    assert values.dtype == vectors.dtype == torch.float64 and values.device.type == "cpu"
    torch.testing.assert_close(values, want_values, rtol=1e-10, atol=1e-10 * float(want_values.max()))
    torch.testing.assert_close(vectors @ torch.diag(values) @ vectors.T, cov, rtol=1e-9, atol=1e-9 * float(cov.abs().max()))
    v2, q2 = eigendecompose_sum(pack_upper(cov), 700.0, device)
    assert q2.dtype == torch.float32 and q2.device.type == "cpu"
    torch.testing.assert_close(v2, want_values / 700.0, rtol=1e-10, atol=1e-12)


def test_token_budget_follows_the_devices_free_memory(device, model_dir, monkeypatch):
    """On an accelerator the batch's token budget is 60 % of the free memory (halved between the
    tokens and the per-sequence gradients), at most 16,384 tokens: read from the device as it is
    now, lowered when less is free, and a batch of that budget captures without running out."""
    from inflq import batching
    from inflq.engine import GradientEngine, make_batch, select_modules
    from inflq.modeling import load_model

    model = load_model(model_dir, torch.device(device), torch.float32)
    engine = GradientEngine(model, select_modules(model, "all"))
    got = batching.auto_batching(engine, 32)
    per_token = batching.bytes_per_token(engine, 32)
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        want = max(32, min(batching.ACCELERATOR_TOKENS, int(0.6 * free) // 2 // per_token))
        assert abs(got.tokens - want) <= max(1, want // 20)  # free memory moves a little between the two reads
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *_a: (200 * per_token, 1 << 40))
        small = batching.auto_batching(engine, 32)
        assert small.tokens == max(32, int(0.6 * 200 * per_token) // 2 // per_token) < got.tokens
    else:
        assert got.tokens <= batching.CPU_TOKENS
    monkeypatch.undo()
    n = max(1, min(got.tokens, 4096) // 32)
    gen = np.random.default_rng(1)
    seqs = [gen.integers(3, model.get_input_embeddings().num_embeddings, size=32).tolist() for _ in range(n)]
    batch = make_batch(seqs, 0, device, sample_seeds=list(range(n)))
    for _ in engine.capture_parts(batch, "sampled", reuse=True):
        pass


@pytest.fixture(scope="module")
def project_dir(tmp_path_factory, model_dir) -> Path:
    from inflq.project import Project
    from inflq.queries import add_query

    base = tmp_path_factory.mktemp("cuda-project")
    corpus = write_corpus(base / "corpus.jsonl", n=40)
    p = Project.init(base / "proj", model_dir, corpus)
    add_query(p, "default", "the first president of astrobia was", "zorald pfaff")
    add_query(p, "default", "the capital city of astrobia is called", "velmora")
    p.close()
    return base / "proj"


def _scores(cli_run, proj: Path, *args: str) -> np.ndarray:
    from inflq import open_project
    from inflq.reading import result_set, scores

    code, _, err = cli_run("run", proj, "--refit", "--batch-size", "4", "--shard-size", "16", *args)
    assert code == 0, err
    p = open_project(proj)
    try:
        return scores(p, result_set(p, "default"))[1]
    finally:
        p.close()


@pytest.mark.parametrize("fisher", ["empirical", "true"])
def test_a_whole_run_on_the_device_equals_the_cpu_run(device, project_dir, cli_run, fisher):
    """`inflq run --device cuda` against `--device cpu`: the same factors and scores, to float32
    rounding with the data's labels (empirical Fisher) and with sampled labels (the true Fisher,
    drawn from the same CPU uniforms on both devices)."""
    est = f"ekfac:fisher={fisher}"
    want = _scores(cli_run, project_dir, "--estimator", est, "--device", "cpu")
    got = _scores(cli_run, project_dir, "--estimator", est, "--device", device)
    assert np.isfinite(got).all()
    assert rel_err(got, want) < 1e-3, rel_err(got, want)


def test_a_bfloat16_run_on_the_device_agrees_with_float32(device, project_dir, cli_run):
    want = _scores(cli_run, project_dir, "--device", "cpu")
    got = _scores(cli_run, project_dir, "--device", device, "--dtype", "bfloat16")
    assert np.isfinite(got).all() and corr(got, want) > 0.9


def test_the_index_builds_on_the_device_as_on_the_cpu(device, model_dir, cli_run, tmp_path):
    """The gradient index's build (fit in the projected space, one rows pass) on the device: the
    same rows as on the CPU, to float32 rounding."""
    import inflq_builtins.gradient_index as index_plugin
    from inflq import get_registry, open_project
    from inflq.cli import cli

    get_registry().register(index_plugin, name="inflq.index", distribution="inflq")
    if "index" not in cli.commands:
        index_plugin.register_commands(cli=cli)
    corpus = write_corpus(tmp_path / "corpus.jsonl", n=40)
    rows = {}
    for n, where in enumerate(("cpu", device)):
        proj = tmp_path / f"proj-{n}"
        assert cli_run("init", proj, "--model", model_dir, "--corpus", corpus)[0] == 0
        toml = proj / "inflq.toml"
        toml.write_text(toml.read_text().replace('device = "auto"', f'device = "{where}"'))
        code, out, err = cli_run("index", "build", proj, "--k-s", "3", "--k-a", "4", "--shard-size", "16")
        assert code == 0, err
        p = open_project(proj)
        try:
            row, store = index_plugin.find_index(p)
            assert row["status"] == "complete"
            values, scale, self_influence = store.rows_at(np.arange(store.num_rows))
            rows[n] = (values.astype(np.float64) * scale[:, None], self_influence)
        finally:
            p.close()
    assert rel_err(rows[1][0], rows[0][0]) < 1e-2  # rows stored in float16
    assert rel_err(rows[1][1], rows[0][1]) < 1e-3


def test_ray_with_one_gpu_actor_equals_the_local_run(device, project_dir, cli_run):
    """`--executor ray:num_gpus=1,num_workers=1`: the shards run on one Ray actor that holds the
    GPU (on the CPU stand-in, one CPU actor), with the same scores as the local executor."""
    ray = pytest.importorskip("ray")
    want = _scores(cli_run, project_dir, "--device", device)
    gpus = 1 if device == "cuda" else 0
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, num_gpus=gpus, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    try:
        got = _scores(cli_run, project_dir, "--device", device, "--executor", f"ray:num_gpus={gpus},num_workers=1,address=auto")
    finally:
        ray.shutdown()
    assert rel_err(got, want) < 1e-4


def test_a_shards_sums_on_the_device_equal_the_cpus(device, model_dir):
    """On a CUDA device a shard's batches are summed there (DeviceSums) and added into the CPU's
    running sums once, at the shard's end: the covariance sums come back on the CPU, equal to the
    CPU's to float32 rounding, extending the sums of the shards before."""
    from inflq.engine import GradientEngine, select_modules
    from inflq.modeling import load_model
    from inflq.passes import Shard, run_shard
    from inflq_builtins.estimators import CovariancePass

    V = 40
    gen = np.random.default_rng(3)
    seqs = [gen.integers(3, V, size=int(n)).tolist() for n in gen.integers(3, 12, size=10)]
    sums = {}
    for where in ("cpu", device):
        model = load_model(model_dir, torch.device(where), torch.float32)
        engine = GradientEngine(model, select_modules(model, "all"))
        first = run_shard(engine, lambda idx: [seqs[i] for i in idx], CovariancePass(), Shard(0, np.arange(5)), 0, 3)
        both = run_shard(engine, lambda idx: [seqs[i] for i in idx], CovariancePass(), Shard(1, np.arange(5, 10)), 0, 3, into=first)
        assert both is first and all(v.device.type == "cpu" and v.dtype == torch.float64 for v in both.values())
        sums[where] = both
    for key, want in sums["cpu"].items():
        assert rel_err(sums[device][key], want) < 1e-5, key
