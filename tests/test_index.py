"""The gradient index's numeric core (inflq.index): exactness, projection, resumability, blocking.

Tiny GPT-2 and Llama models with random weights, built here; token sequences of varied length (so
batches carry padding). The exact answers come from inflq's own EK-FAC/K-FAC estimators and from
autograd's weight gradients, never from the index's code.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from helpers import assert_equal_to_rounding
from inflq import Cancelled, Monitor, make_batch
from inflq.artifacts import save_tensors
from inflq.engine import Conv1D, GradientEngine, select_modules
from inflq.index import (
    IndexModel,
    IndexSettings,
    IndexStore,
    build_index,
    default_sizes,
    fit_index,
    local_fit_context,
    local_map,
    prepare,
    query_rows,
    scores,
    top_k,
)

VOCAB = 64
PAD = 0
HERE = Path(__file__).resolve().parent


def tiny_model(arch: str, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=2, n_head=2,
                                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                           bos_token_id=0, eos_token_id=0))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32))
    return model.eval()


def corpus(n: int = 48, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, VOCAB, size=int(rng.integers(6, 20))).astype(np.int64) for _ in range(n)]


def queries(seed: int = 2) -> tuple[list[np.ndarray], list[int]]:
    rng = np.random.default_rng(seed)
    toks = [rng.integers(1, VOCAB, size=L).astype(np.int64) for L in (7, 9, 12, 5)]
    return toks, [4, 5, 9, 2]


class Setup(SimpleNamespace):
    def many(self, idx):
        return [self.seqs[int(i)] for i in idx]

    def ctx(self, seed: int = 3):
        return local_fit_context(self.engine, self.many, self.indices, PAD, seed=seed, batch_size=8, shard_size=16)

    def mapper(self, batch_size: int = 8):
        return local_map(self.engine, self.many, PAD, batch_size)


def setup(arch: str) -> Setup:
    model = tiny_model(arch)
    engine = GradientEngine(model, select_modules(model, "all"))
    seqs = corpus()
    return Setup(model=model, engine=engine, seqs=seqs, indices=np.arange(len(seqs), dtype=np.int64))


@pytest.fixture(scope="module")
def gpt2():
    return setup("gpt2")


@pytest.mark.parametrize("estimator", ["ekfac", "kfac"])
def test_orthogonal_full_width_index_scores_equal_exact_estimator(tmp_path, gpt2, estimator):
    """(a) With orthogonal full-width projections the index is EK-FAC (K-FAC) itself: same
    eigenvalues, damping and scores, up to the rows' float16 storage."""
    from inflq_builtins.estimators import EKFAC, KFAC

    est = (EKFAC if estimator == "ekfac" else KFAC)()
    est.fit(gpt2.ctx())
    model = fit_index(gpt2.ctx(), IndexSettings(kind="orthogonal", k_s=10**6, k_a=10**6, estimator=estimator))
    for t in gpt2.engine.tracked:
        assert model.sizes[t.name] == (t.out_features, t.in_dim)
        assert model.dampings[t.name] == pytest.approx(est.dampings[t.name], rel=1e-4)
    store = build_index(tmp_path, "exact", model, gpt2.indices, gpt2.mapper(), shard_size=16)

    toks, starts = queries()
    qgrads = gpt2.engine.sequence_gradients(make_batch(toks, PAD, loss_from=starts), "data")
    pre = est.precondition(qgrads)
    train = gpt2.engine.sequence_gradients(make_batch(gpt2.seqs, PAD), "data")
    exact = sum(torch.einsum("qoi,boi->qb", pre[n], train[n]) for n in pre).numpy()

    got = scores(store, prepare(model, query_rows(model, gpt2.engine, toks, starts, PAD)))
    scale = np.abs(exact).max(axis=1, keepdims=True)
    assert np.abs(got - exact).max() / scale.min() < 1e-3, np.abs(got - exact).max(axis=1) / scale[:, 0]
    # Before float16 storage the projected computation is EK-FAC's to float32 precision.
    q = prepare(model, query_rows(model, gpt2.engine, toks, starts, PAD))
    unstored = (q.vectors @ model.rows_from_dense(train).T).numpy()
    assert np.abs(unstored - exact).max() / scale.min() < 2e-5
    for q in range(len(toks)):
        assert spearmanr(got[q], exact[q]).statistic > 0.999
    # Self-influence stored with each row: ∇Lᵀ (G + λI)⁻¹ ∇L, the estimator's.
    exact_self = sum((est.precondition({n: train[n]})[n] * train[n]).sum(dim=(1, 2)) for n in pre).numpy()
    from inflq.index import self_influences

    stored_self = self_influences(store, block_rows=7)
    np.testing.assert_allclose(stored_self, exact_self, rtol=1e-3)


def explicit_gradient(model, tracked, tokens: np.ndarray) -> dict[str, torch.Tensor]:
    """One sequence's training-loss gradient per module, ``[out, in + bias]``, from autograd's
    weight gradients (the model's parameters unfrozen: nothing of the engine involved)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    ids = torch.as_tensor(tokens)[None]
    logits = model(input_ids=ids, use_cache=False).logits[0].float()
    torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum").backward()
    out = {}
    for t in tracked:
        w = t.module.weight.grad
        w = w.T if isinstance(t.module, Conv1D) else w
        out[t.name] = torch.cat([w, t.module.bias.grad[:, None]], dim=1) if t.bias else w.clone()
    model.zero_grad(set_to_none=True)
    for p, f in flags:
        p.requires_grad_(f)
    return out


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("kind", ["gaussian", "orthogonal"])
def test_row_is_the_projection_of_the_explicit_sequence_gradient(tmp_path, arch, kind, gpt2):
    """(b) A stored row is ``P_S DW P_Aᵀ`` per module, with ``DW`` autograd's weight gradient."""
    s = gpt2 if arch == "gpt2" else setup(arch)
    model = fit_index(s.ctx(), IndexSettings(kind=kind, k_s=3, k_a=5, seed=7))
    store = build_index(tmp_path, "rows", model, s.indices, s.mapper(), shard_size=16)
    stored = np.concatenate([b.rows.astype(np.float32) * b.scale[:, None] for b in store.blocks()])
    f = model.factors
    for i in (0, 5, len(s.seqs) - 1):
        dw = explicit_gradient(s.model, s.engine.tracked, s.seqs[i])
        want = torch.cat([(f[f"ps/{n}"] @ dw[n] @ f[f"pa/{n}"].T).flatten() for n in model.names]).numpy()
        assert stored.shape[1] == model.width == sum(3 * 5 for _ in model.names)
        np.testing.assert_allclose(stored[i], want, atol=1e-3 * np.abs(want).max())
        # The float32 row before storage, to float32 precision; dense and token routes agree.
        caps, _ = s.engine.capture(make_batch([s.seqs[i]], PAD), "data")
        np.testing.assert_allclose(model.rows_from_captures(caps)[0].numpy(), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
        np.testing.assert_allclose(model.rows_from_dense({n: dw[n][None] for n in model.names})[0].numpy(), want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_projections_are_seeded_and_sized_for_the_storage_target(gpt2):
    small = 4096  # the seeding does not depend on the budget; the default's larger fit only costs time
    a = fit_index(gpt2.ctx(), IndexSettings(kind="gaussian", seed=1, budget_bytes=small))
    b = fit_index(gpt2.ctx(), IndexSettings(kind="gaussian", seed=1, budget_bytes=small))
    c = fit_index(gpt2.ctx(), IndexSettings(kind="gaussian", seed=2, budget_bytes=small))
    n = a.names[0]
    assert torch.equal(a.factors[f"pa/{n}"], b.factors[f"pa/{n}"]) and torch.equal(a.factors[f"lambda/{n}"], b.factors[f"lambda/{n}"])
    assert not torch.equal(a.factors[f"pa/{n}"], c.factors[f"pa/{n}"])
    # A 4 × 256 GPT-2 (16 modules) and GPT-2 small (48): at most 64 KB per sequence by default
    # (45 × 45 and 26 × 26 per module), and a 4 KB budget as asked (11 × 11 and 6 × 7).
    for layers, width, budget, kinds in ((4, 256, None, {(45, 45)}), (12, 768, None, {(26, 26)}), (4, 256, 4096, {(11, 11)}), (12, 768, 4096, {(6, 7)})):
        tracked = [SimpleNamespace(name=f"h.{i}.{m}", out_features=o, in_dim=d + 1)
                   for i in range(layers) for m, o, d in (("attn", 3 * width, width), ("proj", width, width),
                                                          ("fc", 4 * width, width), ("mproj", width, 4 * width))]
        sizes = default_sizes(tracked) if budget is None else default_sizes(tracked, budget)
        values = sum(ks * ka for ks, ka in sizes.values())
        limit = budget or 65536
        assert 2 * values + 16 <= limit and 2 * values + 16 > 0.9 * limit and set(sizes.values()) == kinds, (layers, sizes)
    # The rows pass travels to other processes (executors) whole.
    import pickle

    from inflq.index import RowPass

    caps, _ = gpt2.engine.capture(make_batch(gpt2.seqs[:3], PAD), "data")
    a.rows_from_captures(caps)  # fills the per-device cache, which is not shipped
    again = pickle.loads(pickle.dumps(RowPass(a)))
    assert not again.model._device_cache
    assert torch.equal(again.process(gpt2.engine, None, caps)["rows"], a.rows_from_captures(caps))
    # Eigen projections: the top eigenvectors, orthonormal rows.
    e = fit_index(gpt2.ctx(), IndexSettings(kind="eigen", k_s=4, k_a=4))
    pa = e.factors[f"pa/{n}"]
    np.testing.assert_allclose((pa @ pa.T).numpy(), np.eye(4), atol=1e-5)


def _child_build(folder: str, kill_after: int) -> None:
    """Run in a subprocess: build the index whose model the parent saved, SIGKILLed mid-build."""
    torch.set_num_threads(1)
    from safetensors import safe_open

    from inflq.artifacts import load_tensors

    s = setup("gpt2")
    with safe_open(f"{folder}/model.safetensors", framework="pt") as fh:
        meta = fh.metadata()
    model = IndexModel.from_tensors(load_tensors(Path(folder), "model.safetensors", None), meta)

    def on_progress(ev):
        if ev.phase == "index" and ev.done >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    build_index(Path(folder) / "out", "resume", model, s.indices, s.mapper(4), Monitor(on_progress), shard_size=8)


def _read_all(store: IndexStore) -> tuple[np.ndarray, np.ndarray]:
    blocks = list(store.blocks())
    return np.concatenate([b.rows for b in blocks]), np.concatenate([np.stack([b.scale, b.self_influence], 1) for b in blocks])


@pytest.mark.slow
def test_a_killed_build_resumes_to_identical_rows(tmp_path, gpt2):
    """(c) SIGKILL in the middle of a shard: committed shards survive, the build resumes from them
    and its rows equal an uninterrupted build's: the committed shards bit for bit, all rows to the
    rounding of float32 (BLAS may block another process's products differently)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = fit_index(gpt2.ctx(), IndexSettings(kind="gaussian", k_s=4, k_a=4))
        save_tensors(tmp_path, "model.safetensors", model.tensors(), model.metadata())
        code = f"import sys; sys.path[:0] = [{str(HERE)!r}]; from test_index import _child_build; _child_build({str(tmp_path)!r}, 20)"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        folder = tmp_path / "out" / "index-resume"
        interrupted = IndexStore(folder)
        assert interrupted.committed() == {0, 1} and not interrupted.complete  # the third shard was in flight
        kept = {f.name: np.load(f) for i in (0, 1) for f in (folder / f"rows-{i:06d}.npy", folder / f"side-{i:06d}.npy")}
        events = []
        resumed = build_index(tmp_path / "out", "resume", model, gpt2.indices, gpt2.mapper(4),
                              Monitor(lambda ev: events.append(ev)), shard_size=8)
        assert events[1].done == 16  # the committed shards count as done
        for name, x in kept.items():  # the committed shards are kept as written
            assert np.array_equal(np.load(folder / name), x), name
        whole = build_index(tmp_path / "whole", "resume", model, gpt2.indices, gpt2.mapper(4), shard_size=8)
        for x, y in zip(_read_all(resumed), _read_all(whole), strict=True):
            assert_equal_to_rounding(x, y)  # the killed process's shards came from another process
        assert resumed.verify() == []
    finally:
        torch.set_num_threads(threads)


def test_a_cancelled_build_keeps_its_shards_and_resumes(tmp_path, gpt2):
    model = fit_index(gpt2.ctx(), IndexSettings(kind="gaussian", k_s=2, k_a=2))
    monitor = Monitor()
    monitor.on_progress = lambda ev: monitor.cancel() if ev.done >= 30 else None
    with pytest.raises(Cancelled):
        build_index(tmp_path, "c", model, gpt2.indices, gpt2.mapper(4), monitor, shard_size=8)
    store = IndexStore(tmp_path / "index-c")
    assert store.committed() == {0, 1, 2}
    assert build_index(tmp_path, "c", model, gpt2.indices, gpt2.mapper(4), shard_size=8).complete


def test_blocked_scoring_equals_unblocked(tmp_path, gpt2):
    """(d) Scores and top-k over memory-mapped blocks equal one product over all rows."""
    model = fit_index(gpt2.ctx(), IndexSettings(kind="orthogonal", k_s=4, k_a=6))
    store = build_index(tmp_path, "b", model, gpt2.indices, gpt2.mapper(), shard_size=10)
    toks, starts = queries()
    q = prepare(model, query_rows(model, gpt2.engine, toks, starts, PAD))
    rows = np.concatenate([np.load(store.path / f"rows-{i:06d}.npy") for i in range(store.num_shards)]).astype(np.float32)
    side = np.concatenate([np.load(store.path / f"side-{i:06d}.npy") for i in range(store.num_shards)])
    whole = (q.vectors.numpy().astype(np.float64) @ (rows * side[:, :1]).T.astype(np.float64))
    cosine = whole / np.sqrt(np.outer(q.self_influence.numpy(), side[:, 1]))
    for metric, exact in (("inner", whole), ("cosine", cosine)):
        tol = np.abs(exact).max()
        unblocked = scores(store, q, metric, block_rows=10**6)  # float16 product (the default)
        np.testing.assert_allclose(unblocked, exact, atol=1e-3 * tol)
        for precise, want in ((True, exact), (False, unblocked)):
            for block_rows in (1, 3, 7, 10**6):
                got = scores(store, q, metric, block_rows=block_rows, precise=precise)
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * tol)
                v, i = top_k(store, q, 5, metric, block_rows=block_rows, precise=precise)
                order = np.argsort(-want, axis=1, kind="stable")[:, :5]
                assert np.array_equal(i, store.indices[order])
                np.testing.assert_allclose(v, np.take_along_axis(want, order, 1), rtol=1e-5, atol=1e-6 * tol)
                lv, li = top_k(store, q, 3, metric, block_rows=block_rows, largest=False, precise=precise)
                assert np.array_equal(li, np.argsort(want, axis=1, kind="stable")[:, :3])
            pick = np.array([2, 3, 17, 40, 47])
            got = scores(store, q, metric, indices=pick, block_rows=4, precise=precise)
            np.testing.assert_allclose(got, want[:, pick], rtol=1e-5, atol=1e-6 * tol)
    from inflq.index import candidates

    picked = candidates(store, q, 4, "cosine", block_rows=6)
    assert [list(p) for p in picked] == [sorted(r) for r in np.argsort(-scores(store, q, "cosine"), axis=1, kind="stable")[:, :4].tolist()]
    summary = store.summary()
    assert summary["complete"] and summary["rows_done"] == len(gpt2.seqs) and summary["bytes_per_sequence"] == 2 * model.width + 16
    manifest = json.loads((store.path / "manifest.json").read_text())
    assert manifest["width"] == model.width and os.path.getsize(store.path / "rows-000000.npy") < 10 * 2 * model.width + 200


def test_the_key_names_what_determines_the_rows():
    from inflq.index import index_key, key_source

    idx = np.arange(10)

    def key(**kw):
        args = {"settings": IndexSettings(), "modules": ["a", "b"], "model_fingerprint": "m", "corpus_fingerprint": "c",
                "fit_indices": idx, "indices": idx, "seed": 0, "dtype": "torch.float32", **kw}
        return index_key(key_source(**args))

    assert key() == key() and key(settings=IndexSettings(damping=1.0)) == key()  # the damping changes no stored tensor
    for change in ({"settings": IndexSettings(kind="gaussian")}, {"settings": IndexSettings(k_s=4)}, {"seed": 1},
                   {"fit_indices": idx[:5]}, {"indices": idx[1:]}, {"model_fingerprint": "m2"}, {"modules": ["a"]}):
        assert key(**change) != key(), change


def _random_store(tmp_path, model, n: int, seed: int = 0) -> IndexStore:
    """An index of ``n`` random rows at ``model``'s width (the real format), in clusters as real
    gradients are, with varied row scales."""
    store = IndexStore.create(tmp_path, f"random-{n}", model, np.arange(0, 2 * n, 2, dtype=np.int64), shard_size=700)
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn((20, model.width), generator=gen)
    for i in range(store.num_shards):
        m = len(store.shard_rows(i))
        rows = centres[torch.randint(0, 20, (m,), generator=gen)] + 0.5 * torch.randn((m, model.width), generator=gen)
        rows *= torch.rand((m, 1), generator=gen) + 0.25
        store.commit(i, rows, torch.rand((m,), generator=gen) + 0.5)
    return store


def test_faiss_search_probing_every_list_finds_the_exact_top_k(tmp_path, gpt2):
    """search="faiss": FAISS's candidates re-scored exactly; probing every list (recall 1 but
    for its 8-bit codes, which the re-scoring of refine × k candidates absorbs) it returns the
    exact scan's top-k and scores. The FAISS index is cached beside the shards and reused."""
    pytest.importorskip("faiss")
    from inflq.index import approx

    model = fit_index(gpt2.ctx(), IndexSettings(kind="orthogonal", k_s=4, k_a=6))
    store = _random_store(tmp_path, model, 3000)
    toks, starts = queries()
    q = prepare(model, query_rows(model, gpt2.engine, toks, starts, PAD))
    nlist = approx.default_nlist(store.num_rows)
    assert nlist == 54
    for metric in ("inner", "cosine"):
        for largest in (True, False):
            want_v, want_i = top_k(store, q, 5, metric, largest=largest, precise=True)
            got_v, got_i = top_k(store, q, 5, metric, largest=largest, search="faiss", nprobe=nlist, refine=20)
            assert np.array_equal(got_i, want_i), (metric, largest)
            np.testing.assert_allclose(got_v, want_v, rtol=1e-5, atol=1e-6 * np.abs(want_v).max())
        assert approx.faiss_path(store, metric, nlist).is_file()
    # Few lists probed: an approximation, still mostly right on clustered rows, scores exact where found.
    v, i = top_k(store, q, 10, "inner", search="faiss", nprobe=4)
    exact = scores(store, q, "inner", precise=True)
    found = i >= 0
    assert found.any()
    pos = np.searchsorted(store.indices, np.where(found, i, 0))
    np.testing.assert_allclose(v[found], np.take_along_axis(exact, pos, 1)[found], rtol=1e-5, atol=1e-6 * np.abs(exact).max())
    # Cached on disk: a fresh process's search reads the file instead of building again.
    path = approx.faiss_path(store, "inner", nlist)
    stamp = path.stat().st_mtime_ns
    approx._cache.clear()
    again = top_k(store, q, 5, "inner", search="faiss", nprobe=nlist, refine=20)
    assert path.stat().st_mtime_ns == stamp and np.array_equal(again[1], top_k(store, q, 5, "inner", precise=True)[1])
    from inflq.index import candidates

    assert [list(c) for c in candidates(store, q, 5, search="faiss", nprobe=nlist)] == [sorted(r) for r in again[1].tolist()]
    # A damaged cache file is built again.
    path.write_bytes(b"not a faiss index")
    approx._cache.clear()
    rebuilt = top_k(store, q, 5, "inner", search="faiss", nprobe=nlist, refine=20)
    assert np.array_equal(rebuilt[1], again[1]) and path.stat().st_size > 1000


def test_faiss_missing_or_misused_is_a_one_line_error(tmp_path, gpt2, monkeypatch):
    from inflq.errors import InflqError
    from inflq.index import approx

    model = fit_index(gpt2.ctx(), IndexSettings(kind="orthogonal", k_s=4, k_a=6))
    store = _random_store(tmp_path, model, 100)
    toks, starts = queries()
    q = prepare(model, query_rows(model, gpt2.engine, toks, starts, PAD))
    with pytest.raises(InflqError, match="unknown index search 'annoy'; choose exact, faiss"):
        top_k(store, q, 5, search="annoy")
    monkeypatch.setattr(approx, "_cache", {})
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss raises ImportError
    with pytest.raises(InflqError, match=r"pip install 'inflq\[faiss\]'"):
        top_k(store, q, 5, search="faiss")
