"""Correctness of the influence engine, against answers computed the slow way.

Every reference here is computed independently of inflq's engine: gradients with ``torch.func``
on a separately loaded float64 copy of the model, covariances with plain forward hooks, inverse-
Hessian-vector products with a dense solve, and exact influence with the full damped Gauss-Newton
matrix over the tracked parameters. Run with ``-s`` to see the measured correlations.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from torch.func import functional_call, jacfwd, jacrev

from helpers import make_model_dir, write_corpus
from inflq import Monitor, QueryGradients, Shard, catalog, make_batch
from inflq.engine import Conv1D
from inflq.passes import ScorePass, run_shard, sequence_seed
from inflq.project import Project
from inflq.queries import add_query
from inflq.reading import ScoringSession, score_matrix
from inflq.runs import (
    LocalWorker,
    RunSettings,
    ensure_factors,
    make_estimator,
    make_executor,
    query_gradients,
    run_investigation,
)
from inflq_builtins import estimators as builtin_estimators

QUERIES = [
    ("the first president of astrobia was", "zorald pfaff"),
    ("the capital city of astrobia is called", "velmora"),
    ("the red cat runs with the", "big dog"),
    ("people eat bread and", "cheese"),
]
ROOT = Path(__file__).resolve().parents[1]


def make_project(
    root: Path, arch: str = "gpt2", width: int = 16, layers: int = 2, n: int = 24, seed: int = 0, repeats: int = 1, **init
) -> Project:
    """A tiny random model, a corpus of ``n`` sequences (each written ``repeats`` times, so that a
    fit draws more sampled labels per sequence), and the four queries."""
    model = make_model_dir(root / "model", arch, width=width, layers=layers, seed=seed)
    corpus = write_corpus(root / "corpus.jsonl", n=n)
    if repeats > 1:
        lines = corpus.read_text().splitlines()
        rows = [{**json.loads(line), "id": f"r{r}-{i}"} for r in range(repeats) for i, line in enumerate(lines)]
        corpus.write_text("".join(json.dumps(row) + "\n" for row in rows))
    project = Project.init(root / "project", model, corpus, **init)
    for prompt, completion in QUERIES:
        add_query(project, "default", prompt, completion)
    return project


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``tiny(arch)``: a 16-wide project of that architecture, built once per module."""
    made: dict[str, Project] = {}

    def get(arch: str) -> Project:
        if arch not in made:
            layers = 2 if arch == "gpt2" else 1
            made[arch] = make_project(tmp_path_factory.mktemp(arch), arch, width=16, layers=layers)
        return made[arch]

    return get


@pytest.fixture(scope="module")
def gpt2(tiny) -> Project:
    return tiny("gpt2")


def corr(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(pearsonr(a, b)[0]), float(spearmanr(a, b)[0])


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


def fitted(project: Project, spec: str, **settings):
    """An estimator with factors fitted (or loaded from the cache) on the project's corpus, its
    engine, and the id of its factor set."""
    est = make_estimator(spec)
    engine = project.runtime.engine(settings.pop("modules", None))
    run = RunSettings(estimator=spec, **settings)
    factor_set = ensure_factors(project, est, engine, make_executor("local"), run, Monitor())
    return est, engine, factor_set


# -- the slow way: torch.func on an independently loaded float64 copy of the model ----------------
def pad(sequences) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask (causal attention: real positions never see padding)."""
    T = max(len(x) for x in sequences)
    ids = torch.zeros(len(sequences), T, dtype=torch.long)
    mask = torch.zeros(len(sequences), T, dtype=torch.long)
    for b, x in enumerate(sequences):
        ids[b, : len(x)] = torch.as_tensor(np.asarray(x, np.int64))
        mask[b, : len(x)] = 1
    return ids, mask


class Reference:
    """Gradients and Jacobians over the tracked modules' weights and biases, with ``torch.func``."""

    def __init__(self, project: Project, modules: str | None = None) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(str(project.model_path), attn_implementation="eager")
        self.model = self.model.double().eval().requires_grad_(False)
        self.tracked = project.runtime.engine(modules).tracked
        own = dict(self.model.named_parameters())
        self.params: dict[str, torch.Tensor] = {}
        for tm in self.tracked:
            self.params[f"{tm.name}.weight"] = own[f"{tm.name}.weight"]
            if tm.bias:
                self.params[f"{tm.name}.bias"] = own[f"{tm.name}.bias"]
        self.size = sum(p.numel() for p in self.params.values())

    def forward(self, params, ids: torch.Tensor, mask: torch.Tensor):
        return functional_call(self.model, params, (ids,), {"attention_mask": mask, "use_cache": False, "output_hidden_states": True})

    def losses(self, params, ids, mask, starts) -> torch.Tensor:
        """Per-sequence summed cross-entropy of the real tokens at positions ``>= starts[b]``."""
        logp = torch.log_softmax(self.forward(params, ids, mask).logits[:, :-1], dim=-1)
        logp = logp.gather(2, ids[:, 1:, None])[..., 0]
        pos = torch.arange(1, ids.shape[1])[None, :]
        keep = mask[:, 1:].bool() & (pos >= starts[:, None])
        return -(logp * keep).sum(dim=1)

    def gradients(self, sequences, starts=None) -> dict[str, torch.Tensor]:
        """Per-example gradients ``{parameter: [N, *shape]}`` of the sequences' losses (a training
        sequence: every next token, ``start = 1``; a query: its completion tokens)."""
        ids, mask = pad(sequences)
        starts = torch.as_tensor([1] * len(sequences) if starts is None else list(starts))
        return jacrev(self.losses)(self.params, ids, mask, starts)

    def flat(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[N, P]`` in the parameters' own layout."""
        return torch.cat([grads[k].reshape(grads[k].shape[0], -1) for k in self.params], dim=1).detach()

    def inflq_layout(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The same gradients per module in inflq's ``[N, out, in(+1)]`` layout."""
        out = {}
        for tm in self.tracked:
            w = grads[f"{tm.name}.weight"]
            w = w.transpose(1, 2) if isinstance(tm.module, Conv1D) else w  # Conv1D stores [in, out]
            out[tm.name] = torch.cat([w, grads[f"{tm.name}.bias"][..., None]], 2) if tm.bias else w
        return out

    def gauss_newton(self, sequences, chunk: int = 8) -> torch.Tensor:
        """``G = mean_seq Σ_t J_tᵀ (diag p_t − p_t p_tᵀ) J_t``, J_t = ∂ logits_t / ∂ θ_tracked, over
        the training loss's positions ``t`` (every real token but a sequence's last).

        The logits are ``W h_t`` with ``h_t`` the final hidden state and ``W`` the (untracked) LM
        head, so ``J_t = W K_t`` with ``K_t = ∂h_t/∂θ`` and ``J_tᵀ H_t J_t = K_tᵀ (Wᵀ H_t W) K_t``:
        the same matrix from a Jacobian hidden-width rather than vocabulary-wide.
        """
        head = self.model.get_output_embeddings()
        assert getattr(head, "bias", None) is None
        W = head.weight.double()  # [V, d]
        G = torch.zeros(self.size, self.size, dtype=torch.float64)
        for s in range(0, len(sequences), chunk):
            ids, mask = pad(sequences[s : s + chunk])
            out = self.forward(self.params, ids, mask)
            h = out.hidden_states[-1]
            torch.testing.assert_close(h @ W.T, out.logits)  # logits are exactly the head of h
            p = torch.softmax(out.logits, dim=-1)
            # Forward mode: one tangent per parameter, cheaper than one cotangent per output here.
            jac = jacfwd(lambda prm, ids=ids, mask=mask: self.forward(prm, ids, mask).hidden_states[-1])(self.params)
            loss = torch.zeros_like(mask, dtype=torch.bool)
            loss[:, :-1] = mask[:, :-1].bool() & mask[:, 1:].bool()
            K = torch.cat([jac[k].reshape(*ids.shape, W.shape[1], -1) for k in self.params], dim=-1)[loss]
            p = p[loss]  # [loss positions, V]
            Wp = p @ W  # pᵀW per token
            C = torch.einsum("nv,vd,ve->nde", p, W, W) - Wp[:, :, None] * Wp[:, None, :]  # Wᵀ(diag p − ppᵀ)W
            G += K.flatten(0, 1).T @ torch.bmm(C, K).flatten(0, 1)
        return G / len(sequences)


def queries_tokens(project: Project):
    return [project.runtime.tokenize_query(q["prompt"], q["completion"]) for q in catalog.queries(project.db, "default")]


# -- 1. the identity estimator is the gradient dot product -----------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox"])
def test_identity_equals_torch_func_gradient_dot_products(tmp_path, arch):
    project = make_project(tmp_path, arch, width=16, layers=1, n=12)
    ref = Reference(project)
    store = project.runtime.corpus
    train = ref.flat(ref.gradients([store.get(i) for i in range(len(store))]))
    # The measurement loss is −log p(completion | prompt): completion tokens only.
    qs = queries_tokens(project)
    query_grads = ref.gradients([q.tokens for q in qs], [q.completion_start for q in qs])
    want = (ref.flat(query_grads) @ train.T).numpy()

    result = run_investigation(project, "default", RunSettings(estimator="identity", rank=None, batch_size=5))
    got = score_matrix(project, "default", result.result_set_id)
    assert np.isfinite(got).all()
    assert rel_err(got, want) < 1e-4, (got, want)

    # The same gradients module by module, in inflq's [out, in(+1 bias)] layout.
    engine = project.runtime.engine()
    ours = query_gradients(project, engine, catalog.queries(project.db, "default"), batch_size=3)
    for name, g in ref.inflq_layout(query_grads).items():
        assert ours[name].shape == g.shape
        assert rel_err(ours[name], g) < 1e-4, name


# -- 2. K-FAC and EK-FAC inverse-Hessian-vector products are dense solves ---------------------------
def kron_dense(qs: torch.Tensor, qa: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """``(Q_S ⊗ Q_A) diag(vec Λ) (Q_S ⊗ Q_A)ᵀ`` for row-major vec of ``[out, in]`` matrices
    (``vec(A X Bᵀ) = (A ⊗ B) vec(X)`` in that ordering)."""
    q = torch.kron(qs.double(), qa.double())
    return q @ torch.diag(lam.double().reshape(-1)) @ q.T


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox"])
@pytest.mark.parametrize("kind", ["ekfac", "kfac"])
def test_preconditioner_equals_dense_solve(tiny, arch, kind):
    project = tiny(arch)
    est, engine, factor_set = fitted(project, kind)
    gen = torch.Generator().manual_seed(1)
    V = {tm.name: torch.randn(3, *tm.shape, generator=gen) for tm in engine.tracked}
    got = est.precondition(V)
    again, _, same_set = fitted(project, kind)  # a fresh estimator loads the cached artifact
    assert same_set == factor_set
    loaded = again.precondition(V)
    if kind == "kfac":
        every = Shard(0, np.arange(len(project.runtime.corpus)))
        cov = run_shard(engine, project.runtime.corpus.many, builtin_estimators.CovariancePass(), every, project.runtime.pad_id, 8)
        per_seq_tokens = float(cov["tokens"].sum() / cov["sequences"].sum())
    for tm in engine.tracked:
        n = tm.name
        lam = est.factors[f"lambda/{n}"]
        damping = est.dampings[n]
        assert damping == pytest.approx(0.1 * float(lam.double().mean()), rel=1e-6)
        if kind == "ekfac":
            H = kron_dense(est.factors[f"qs/{n}"], est.factors[f"qa/{n}"], lam)
        else:
            # K-FAC is the Kronecker product of the covariances themselves, per sequence.
            tokens = float(cov["tokens"].sum())
            H = torch.kron(builtin_estimators.symmetric(cov[f"S/{n}"]) / tokens, builtin_estimators.symmetric(cov[f"A/{n}"]) / tokens) * per_seq_tokens
        want = torch.linalg.solve(H + damping * torch.eye(H.shape[0], dtype=H.dtype), V[n].double().reshape(3, -1).T).T
        assert rel_err(got[n].reshape(3, -1), want) < 1e-4, n
        assert torch.equal(loaded[n], got[n])


def test_eigenvalue_correction_equals_its_definition(gpt2, monkeypatch):
    """Λ = E_seq[(Q_Sᵀ DW_i Q_A)²] with DW_i the sampled-label gradient, whichever contraction runs."""
    est, engine, _ = fitted(gpt2, "ekfac")
    idx = np.arange(len(gpt2.runtime.corpus))
    qa = {n: est.factors[f"qa/{n}"] for n in engine.names}
    qs = {n: est.factors[f"qs/{n}"] for n in engine.names}
    want = {n: torch.zeros(tm.shape, dtype=torch.float64) for n, tm in zip(engine.names, engine.tracked)}
    for i in idx:
        seed = sequence_seed(0, builtin_estimators.EigenCorrectionPass.phase, int(i))
        batch = make_batch([gpt2.runtime.corpus.get(int(i))], gpt2.runtime.pad_id, sample_seeds=[seed])
        for n, dw in engine.sequence_gradients(batch, "sampled").items():
            want[n] += ((qs[n].double().T @ dw[0].double() @ qa[n].double()) ** 2) / len(idx)
    for n in engine.names:
        assert rel_err(est.factors[f"lambda/{n}"], want[n]) < 1e-4, n
    for rotate_first in (True, False):
        monkeypatch.setattr(builtin_estimators, "rotate_first_is_cheaper", lambda *a, r=rotate_first: r)
        out = run_shard(engine, gpt2.runtime.corpus.many, builtin_estimators.EigenCorrectionPass(qa, qs), Shard(0, idx), gpt2.runtime.pad_id, 5)
        for n in engine.names:
            assert rel_err(out[f"L/{n}"] / len(idx), want[n]) < 1e-4, (rotate_first, n)


def test_work_buffers_last_one_phase(gpt2):
    """The engine's work buffers are kept across the shards of a phase (the same memory every
    shard) and dropped when another phase's pass starts, so the covariance pass's Gram matrices
    are not carried through the eigenvalue correction; the sums do not depend on it."""
    est, engine, _ = fitted(gpt2, "ekfac")
    idx = np.arange(len(gpt2.runtime.corpus))
    halves = [Shard(0, idx[: len(idx) // 2]), Shard(1, idx[len(idx) // 2 :])]
    cov = builtin_estimators.CovariancePass()
    sums = run_shard(engine, gpt2.runtime.corpus.many, cov, halves[0], gpt2.runtime.pad_id, 5)
    grams = {k: v.data_ptr() for k, v in engine._buffers.items() if k[0] == "gram"}
    assert grams
    run_shard(engine, gpt2.runtime.corpus.many, cov, halves[1], gpt2.runtime.pad_id, 5, into=sums)
    assert {k: v.data_ptr() for k, v in engine._buffers.items() if k[0] == "gram"} == grams  # reused, not remade
    qa = {n: est.factors[f"qa/{n}"] for n in engine.names}
    qs = {n: est.factors[f"qs/{n}"] for n in engine.names}
    corr = builtin_estimators.EigenCorrectionPass(qa, qs)
    after = run_shard(engine, gpt2.runtime.corpus.many, corr, Shard(0, idx), gpt2.runtime.pad_id, 5)
    assert engine._buffers and not any(k[0] == "gram" for k in engine._buffers)
    engine.release_buffers()
    alone = run_shard(engine, gpt2.runtime.corpus.many, corr, Shard(0, idx), gpt2.runtime.pad_id, 5)
    for k in alone:
        assert torch.equal(after[k], alone[k]), k


# -- 3. covariances by hand, with padding -----------------------------------------------------------
def hand_covariances(project: Project, indices, seed: int = 0) -> tuple[dict, dict, int]:
    """``Σ ā āᵀ`` and ``Σ g gᵀ`` with plain hooks, one unpadded sequence at a time, labels sampled
    from the model as the covariance pass samples them (``Σ g gᵀ`` over every token: the last
    one's gradient is zero)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(project.model_path)).float().eval()
    tracked = project.runtime.engine().tracked
    mods = dict(model.named_modules())
    A = {tm.name: 0.0 for tm in tracked}
    S = {tm.name: 0.0 for tm in tracked}
    tokens = 0
    for i in indices:
        ids = torch.as_tensor(project.runtime.corpus.get(int(i)))[None]
        seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        handles = []
        for tm in tracked:
            def hook(_m, args, out, name=tm.name, seen=seen):
                out.retain_grad()
                seen[name] = (args[0].detach(), out)

            handles.append(mods[tm.name].register_forward_hook(hook))
        logits = model(input_ids=ids, use_cache=False).logits[0]
        for h in handles:
            h.remove()
        gen = torch.Generator().manual_seed(sequence_seed(seed, "covariance", int(i)))
        # The engine's sampling rule: inverse CDF with one uniform per position, at the training
        # loss's positions only (every token but the last, which has no next token).
        cdf = torch.softmax(logits.detach(), -1).cumsum(-1)
        u = torch.rand((cdf.shape[0], 1), generator=gen) * cdf[:, -1:]
        labels = torch.searchsorted(cdf, u, right=True)[:, 0].clamp_max(cdf.shape[1] - 1)
        torch.nn.functional.cross_entropy(logits[:-1], labels[:-1], reduction="sum").backward()
        for tm in tracked:
            a, out = seen[tm.name]
            a = a[0].double()
            if tm.bias:
                a = torch.cat([a, torch.ones_like(a[:, :1])], 1)
            g = out.grad[0].double()
            A[tm.name] = A[tm.name] + a.T @ a
            S[tm.name] = S[tm.name] + g.T @ g
        tokens += ids.shape[1]
    return A, S, tokens


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox"])
def test_covariances_match_hand_hooks_and_ignore_padding(tiny, arch):
    project = tiny(arch)
    engine = project.runtime.engine()
    idx = np.arange(10)
    lengths = project.runtime.corpus.lengths()[idx]
    assert lengths.min() < lengths.max()  # the batch of 10 is right-padded
    padded = run_shard(engine, project.runtime.corpus.many, builtin_estimators.CovariancePass(), Shard(0, idx), project.runtime.pad_id, 10)
    single = run_shard(engine, project.runtime.corpus.many, builtin_estimators.CovariancePass(), Shard(0, idx), project.runtime.pad_id, 1)
    A, S, tokens = hand_covariances(project, idx)
    assert float(padded["tokens"].sum()) == tokens == int(lengths.sum())
    assert float(single["tokens"].sum()) == tokens
    for n in engine.names:
        for key, want in ((f"A/{n}", A[n]), (f"S/{n}", S[n])):
            got = builtin_estimators.symmetric(padded[key])
            assert rel_err(got, want) < 1e-4, key
            assert rel_err(got, builtin_estimators.symmetric(single[key])) < 1e-5, key


# -- 3b. the true Fisher's S against its exact expectation -----------------------------------------------
def small_vocabulary_gpt2(vocab: int = 20, width: int = 8, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=16, n_embd=width, n_layer=1, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def exact_fisher_output_covariances(model, tracked, sequences, positions: str = "loss") -> dict[str, torch.Tensor]:
    """``E_y[Σ_t g_t g_tᵀ]`` per module, computed by enumeration in float64: ``g_t`` is the gradient
    of ``Σ_s ℓ_s(y_s)`` with respect to the module's output at token ``t``, labels ``y_s`` drawn
    independently from ``p_s``. The cross terms vanish (``E[∇ℓ_s] = 0``), so the expectation is
    ``Σ_s Σ_y p_s(y) Σ_t h_{s,y,t} h_{s,y,t}ᵀ`` with ``h_{s,y,t} = ∂ℓ_s(y)/∂o_t``: one gradient per
    position ``s`` and vocabulary entry ``y``. ``positions``: ``loss`` (the training loss's
    positions, every token but the last) or ``all`` (every token: the old rule, for contrast)."""
    import copy

    ref = copy.deepcopy(model).double()
    mods = dict(ref.named_modules())
    S = {tm.name: torch.zeros(tm.out_features, tm.out_features, dtype=torch.float64) for tm in tracked}
    for seq in sequences:
        outs: dict[str, torch.Tensor] = {}
        handles = [mods[tm.name].register_forward_hook(lambda _m, _a, out, n=tm.name, outs=outs: outs.__setitem__(n, out)) for tm in tracked]
        emb = ref.get_input_embeddings()
        handles.append(emb.register_forward_hook(lambda _m, _a, out: out.requires_grad_(True)))
        logits = ref(input_ids=torch.as_tensor(seq)[None], use_cache=False).logits[0]
        for h in handles:
            h.remove()
        logp = torch.log_softmax(logits, -1)
        names = [tm.name for tm in tracked]
        last = len(seq) - 1 if positions == "loss" else len(seq)
        for s_pos in range(last):
            for y in range(logits.shape[-1]):
                grads = torch.autograd.grad(-logp[s_pos, y], [outs[n] for n in names], retain_graph=True)
                w = float(logp[s_pos, y].detach().exp())
                for n, g in zip(names, grads):
                    g = g[0]  # [T, out]
                    S[n] += w * (g.T @ g)
    return S


@pytest.mark.slow
def test_sampled_fisher_covariance_converges_to_its_exact_expectation():
    """inflq's sampled-label ``S = Σ_t g gᵀ`` over many seeds converges to the exact Fisher
    expectation over the training loss's positions, within a few standard errors derived from
    the per-seed spread; the old rule (sampling at every real token) is many bounds away."""
    from inflq.engine import GradientEngine, make_batch, select_modules

    torch.set_num_threads(1)
    model = small_vocabulary_gpt2()
    engine = GradientEngine(model, select_modules(model, "all"))
    gen = np.random.default_rng(0)
    sequences = [gen.integers(0, 20, size=4).tolist(), gen.integers(0, 20, size=3).tolist()]  # right-padded batch
    exact = exact_fisher_output_covariances(model, engine.tracked, sequences, "loss")
    old_rule = exact_fisher_output_covariances(model, engine.tracked, sequences, "all")

    n = 2000
    total = {n_: torch.zeros_like(v) for n_, v in exact.items()}
    squares = {n_: torch.zeros_like(v) for n_, v in exact.items()}
    for k in range(n):
        batch = make_batch(sequences, pad_id=0, sample_seeds=[2 * k, 2 * k + 1])
        caps, _ = engine.capture(batch, "sampled")
        for name, cap in caps.items():
            g = cap.gradients.reshape(-1, cap.gradients.shape[-1]).double()
            s_k = g.T @ g
            total[name] += s_k
            squares[name] += s_k * s_k
    for name, want in exact.items():
        mean = total[name] / n
        var = squares[name] / n - mean * mean  # per entry, across seeds
        # E‖mean − exact‖²_F = Σ var / n for an unbiased estimate: its root is the standard error
        # of the whole matrix; 3 of them is a bound an unbiased sampler meets with room to spare.
        se = float((var.clamp_min(0).sum() / n).sqrt())
        err = float(torch.linalg.matrix_norm(mean - want))
        bias = float(torch.linalg.matrix_norm(old_rule[name] - want))
        print(f"\n{name}: ‖mean − exact‖ {err:.3g} = {err / se:.2f} standard errors; old rule's bias {bias / se:.1f} standard errors")
        assert err <= 3 * se, name
        assert bias > 10 * se, name  # the old rule fails the bound by far: the test can tell the two apart


def test_sampled_labels_are_drawn_exactly_at_the_loss_positions():
    """The sampled-label loss has a term exactly where the training loss does (``loss_mask``: not
    a sequence's last token, not padding, not a query's prompt), so output gradients vanish at
    the last token; labels depend on the sequence's seed and position only, not on batching."""
    from inflq.engine import GradientEngine, make_batch, select_modules

    model = small_vocabulary_gpt2()
    engine = GradientEngine(model, select_modules(model, "all"))
    seqs = [[1, 5, 7, 2, 9, 3], [4, 4, 8, 1]]
    for loss_from in (None, [3, 2]):
        batch = make_batch(seqs, 0, sample_seeds=[11, 12], loss_from=loss_from)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        per_token = engine.losses(logits, batch, "sampled")
        assert torch.equal(per_token > 0, batch.loss_mask)
    batch = make_batch(seqs, 0, sample_seeds=[11, 12])
    caps, _ = engine.capture(batch, "sampled")
    for cap in caps.values():
        for b, s in enumerate(seqs):
            assert float(cap.gradients[b, len(s) - 1 :].abs().max()) == 0.0  # last token and padding
            assert float(cap.gradients[b, len(s) - 2].abs().max()) > 0.0
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    together = engine.sample_labels(logits, batch)
    alone = make_batch(seqs[1:], 0, sample_seeds=[12])
    by_itself = engine.sample_labels(model(input_ids=alone.input_ids).logits, alone)
    assert torch.equal(together[1, :3], by_itself[0, :3])


# -- 4. EK-FAC against exact influence with the full damped Gauss-Newton matrix ---------------------
def exact_influence_correlations(root: Path, seed: int = 0, repeats: int = 4) -> dict[str, tuple[float, float]]:
    """Pearson and Spearman correlations of each estimator's scores with exact influence over
    24 training sequences. The factors are fitted on the corpus written ``repeats`` times: the
    same Gauss-Newton matrix, with ``repeats`` sampled-label draws per sequence."""
    n = 24
    project = make_project(root, "gpt2", width=8, layers=1, n=n, seed=seed, repeats=repeats)
    ref = Reference(project)
    seqs = [project.runtime.corpus.get(i) for i in range(n)]
    assert all(np.array_equal(project.runtime.corpus.get(r * n + i), seqs[i]) for r in range(repeats) for i in range(n))
    G = ref.gauss_newton(seqs)
    damping = 0.1 * float(torch.trace(G)) / ref.size  # 0.1 × mean eigenvalue
    train = ref.flat(ref.gradients(seqs))
    qs = queries_tokens(project)
    query = ref.flat(ref.gradients([q.tokens for q in qs], [q.completion_start for q in qs]))
    # Scores are ⟨(G + λI)⁻¹ ∇ℓ_q, ∇L⟩ with ℓ_q = −f: the influence −∇fᵀ(G + λI)⁻¹∇L.
    exact = (query @ torch.linalg.solve(G + damping * torch.eye(ref.size, dtype=G.dtype), train.T)).numpy()
    dot = (query @ train.T).numpy()

    found = {}
    for spec in ("identity", f"ekfac:damping={damping!r}", f"kfac:damping={damping!r}"):
        r = run_investigation(project, "default", RunSettings(estimator=spec, rank=None))
        found[spec.split(":")[0]] = score_matrix(project, "default", r.result_set_id)[:, :n]
    assert rel_err(found["identity"], dot) < 1e-4
    c = {k: corr(v, exact) for k, v in found.items()}
    print(f"\nexact influence ({ref.size} tracked parameters, λ={damping:.3g}, {exact.size} pairs): "
          + ", ".join(f"{k} pearson {p:.3f} spearman {s:.3f}" for k, (p, s) in c.items()))
    return c


def test_ekfac_tracks_exact_influence_better_than_gradient_dot_product(tmp_path):
    c = exact_influence_correlations(tmp_path)
    # Thresholds from model seeds 0-6: EK-FAC pearson 0.90-0.97, spearman 0.80-0.92; identity
    # pearson 0.40-0.64, spearman 0.38-0.53.
    assert c["ekfac"][0] > 0.85 and c["ekfac"][1] > 0.75
    assert c["ekfac"][0] > c["identity"][0] + 0.25 and c["ekfac"][1] > c["identity"][1] + 0.25


# -- 5. batch size and seeds ------------------------------------------------------------------------
def test_scores_do_not_depend_on_batch_size(gpt2):
    got = []
    for batch_size in (1, 5):
        settings = RunSettings(estimator="ekfac", rank=None, batch_size=batch_size, refit=True)
        got.append(score_matrix(gpt2, "default", run_investigation(gpt2, "default", settings).result_set_id))
    assert np.isfinite(got[0]).all()
    assert rel_err(got[1], got[0]) < 1e-4


def test_factors_are_deterministic_given_a_seed(gpt2):
    def fresh(seed: int) -> dict[str, torch.Tensor]:
        est, _, _ = fitted(gpt2, "ekfac", seed=seed, refit=True)
        return est.factors

    first, again, other = fresh(0), fresh(0), fresh(1)
    assert first.keys() == again.keys() == other.keys()
    for key in first:
        assert torch.equal(first[key], again[key]), key
    for key in (k for k in first if k.startswith("lambda/")):
        assert rel_err(other[key], first[key]) > 1e-3, key  # other sampled labels, other factors


# -- 6. layer and token attributions add up ---------------------------------------------------------
def test_layer_and_token_attributions_sum_to_the_score(gpt2, monkeypatch):
    run = run_investigation(gpt2, "default", RunSettings(estimator="ekfac", rank=4, top_k=3))
    S = score_matrix(gpt2, "default", run.result_set_id)
    scale = float(np.abs(S).max())  # a Python float: pytest.approx refuses numpy scalars as tolerances
    rows = list(gpt2.db.query("SELECT * FROM results WHERE result_set_id = ?", [run.result_set_id]))
    qids = [q["id"] for q in catalog.queries(gpt2.db, "default")]
    assert len(rows) == 2 * 3 * len(qids)
    for row in rows:
        assert row["score"] == pytest.approx(float(S[qids.index(row["query_id"]), row["seq_idx"]]), abs=1e-6 * scale)
        for column in ("module_scores", "layer_scores"):
            parts = json.loads(row[column])
            assert sum(parts.values()) == pytest.approx(row["score"], abs=1e-5 * scale), column
        assert set(json.loads(row["layer_scores"])) == {"0", "1"}

    rs = next(gpt2.db["result_sets"].rows_where("id = ?", [run.result_set_id]))
    session = ScoringSession.for_result_set(gpt2, rs)
    assert session.qg.left, "rank 4 should compress every module of a 16-wide model"
    for qi, qid in enumerate(qids):
        for idx in (0, 5, 17):
            tokens = gpt2.runtime.corpus.get(idx)
            module, per_token = session.breakdown(tokens, qid)
            assert per_token.shape == (len(tokens), len(session.qg.names))
            np.testing.assert_allclose(per_token.sum(axis=0), module, rtol=0, atol=1e-5 * scale)
            assert module.sum() == pytest.approx(float(S[qi, idx]), abs=1e-5 * scale)
            for kind in ("layer", "token"):
                part = session.attribute(tokens, qid, kind)
                assert part.values.sum() == pytest.approx(part.total, abs=1e-6 * scale)
                assert part.total == pytest.approx(float(S[qi, idx]), abs=1e-5 * scale)
            assert len(session.attribute(tokens, qid, "token").labels) == len(tokens)

    # Both contractions of the training captures give the same scores.
    worker = LocalWorker(gpt2, session.engine)
    found = {}
    for way in ("dw", "lowrank"):
        monkeypatch.setattr(QueryGradients, "contraction", lambda self, name, b, t, way=way: way if name in self.left else "dw")
        found[way] = worker.run(ScorePass(session.qg), Shard(0, np.arange(len(gpt2.runtime.corpus))), 5, None)["scores"].T.numpy()
    assert rel_err(found["dw"], S) < 1e-5
    assert rel_err(found["lowrank"], S) < 1e-5

    # Deferred dot products: whatever the group size, and with the contraction changing from batch
    # to batch (by length), the scores and per-module scores come out the same and in order.
    monkeypatch.setattr(QueryGradients, "contraction", lambda self, name, b, t: "dw" if t % 2 or name in self.full else "lowrank")
    every = Shard(0, np.arange(len(gpt2.runtime.corpus)))
    grouped = {g: worker.run(ScorePass(session.qg, per_module=True, group_bytes=g), every, 3, None) for g in (0, 50_000, 1 << 30)}
    for g, out in grouped.items():
        assert rel_err(out["scores"].T.numpy(), S) < 1e-5, g
        torch.testing.assert_close(out["module_scores"], grouped[0]["module_scores"], rtol=1e-5, atol=1e-6 * scale)

    # A batch whose sequence gradients exceed the group is dotted a slice of sequences at a time
    # (uneven slices here: two sequences of every module's gradients fit, batches hold five), its
    # buffers staying within the group.
    monkeypatch.setattr(QueryGradients, "contraction", lambda self, name, b, t: "dw")
    every_dw = 4 * sum(int(np.prod(session.qg.dense(n).shape[1:])) for n in session.qg.names)
    sliced = ScorePass(session.qg, per_module=True, group_bytes=2 * every_dw + 1)
    out = worker.run(sliced, every, 5, None)
    assert rel_err(out["scores"].T.numpy(), S) < 1e-5
    torch.testing.assert_close(out["module_scores"], grouped[0]["module_scores"], rtol=1e-5, atol=1e-6 * scale)
    assert sum(b.numel() * 4 for b in sliced._buffers.values()) <= 1.25 * (2 * every_dw + 1)


@pytest.mark.parametrize("older_shards", [False, True])
def test_layer_breakdown_needs_no_second_pass(gpt2, monkeypatch, older_shards):
    """Scoring keeps each shard's top and bottom K per query with their per-module scores, so no
    sequence is scored twice; the parts equal a separate per-module breakdown and sum to the
    score. Shards written without them (``older_shards``: by ``inflq doctor`` or an older inflq)
    get exactly their picks rescored."""
    import inflq.runs.scoring
    import inflq.runs.workers as runs

    calls: list[tuple[str, bool, int]] = []
    real = runs.run_shard

    def counting(engine, sequences, pass_, shard, *a, **k):
        calls.append((pass_.phase, bool(pass_.per_module), len(shard)))
        return real(engine, sequences, pass_, shard, *a, **k)

    monkeypatch.setattr(runs, "run_shard", counting)
    if older_shards:
        monkeypatch.setattr(inflq.runs.scoring, "shard_extremes", lambda *a, **k: {})
    k = 2
    run = run_investigation(gpt2, "default", RunSettings(estimator="ekfac", rank=4, top_k=k, shard_size=5))
    scoring = [c for c in calls if c[0] == "scoring"]
    S = score_matrix(gpt2, "default", run.result_set_id)
    qids = [q["id"] for q in catalog.queries(gpt2.db, "default")]
    rows = list(gpt2.db.query("SELECT * FROM results WHERE result_set_id = ?", [run.result_set_id]))
    picked = {r["seq_idx"] for r in rows}
    assert sum(n for _, breakdown, n in scoring if not breakdown) == len(gpt2.runtime.corpus)
    if older_shards:
        assert sum(n for _, breakdown, n in scoring if breakdown) == len(picked), "the picks, and only they, are rescored"
    else:
        assert not any(breakdown for _, breakdown, _ in scoring), "every candidate scored once, none twice"
    assert len(rows) == 2 * k * len(qids)
    scale = float(np.abs(S).max())
    rs = next(gpt2.db["result_sets"].rows_where("id = ?", [run.result_set_id]))
    session = ScoringSession.for_result_set(gpt2, rs)
    for row in rows:
        qi = qids.index(row["query_id"])
        side = S[qi][np.argsort(-S[qi], kind="stable")]
        want = side[row["rank"] - 1] if row["side"] == "top" else side[::-1][row["rank"] - 1]
        assert row["score"] == pytest.approx(float(want), abs=1e-6 * scale)
        parts = json.loads(row["module_scores"])
        module, _ = session.breakdown(gpt2.runtime.corpus.get(row["seq_idx"]), row["query_id"])
        np.testing.assert_allclose([parts[n] for n in session.qg.names], module, rtol=0, atol=1e-5 * scale)
        assert sum(parts.values()) == pytest.approx(row["score"], abs=1e-5 * scale)


def test_compression_keeps_full_rank_where_scoring_would_multiply_the_factors_back_out():
    from inflq.contractions import Compression, dw_is_cheaper

    shapes = {"wide": (64, 512, 129), "narrow": (1, 512, 129), "tiny": (64, 16, 17)}
    # Unknown sequence length: compress whatever a rank-32 factorisation makes smaller.
    assert Compression(32).plan(shapes) == {"tiny"}
    # 20-token sequences, 64 queries: forming DW and dotting is cheaper, so 64 queries stay full;
    # one query is cheaper per token at rank 32.
    assert dw_is_cheaper(20, 64, 512, 129, 32) and not dw_is_cheaper(20, 1, 512, 129, 32)
    assert Compression(32, tokens=20).plan(shapes) == {"tiny", "wide"}
    # ... unless the full-rank queries would exceed the memory cap.
    assert Compression(32, tokens=20, full_rank_bytes=64 * 512 * 129 * 4 - 1).plan(shapes) == {"tiny"}
    pre = {n: torch.randn(*shape) for n, shape in shapes.items()}
    qg = QueryGradients.from_preconditioned(pre, Compression(32, tokens=20))
    assert set(qg.full) == {"tiny", "wide"} and set(qg.left) == {"narrow"}
    assert torch.equal(qg.full["wide"], pre["wide"])


# -- 7. low-rank query batching ---------------------------------------------------------------------
DEMO = ROOT / "projects" / "demo"


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Project:
    """The demo model and corpus when they exist; else a random 4-layer, 64-wide GPT-2."""
    root = tmp_path_factory.mktemp("demo")
    if (DEMO / "model" / "config.json").is_file():
        project = Project.init(root / "project", DEMO / "model", DEMO / "corpus.jsonl")
        for line in (DEMO / "queries.jsonl").read_text().splitlines():
            if line.strip():
                q = json.loads(line)
                add_query(project, "default", q["prompt"], q["completion"])
        return project
    return make_project(root, "gpt2", width=64, layers=4, n=120)


@pytest.mark.slow
def test_rank_32_query_batching_keeps_the_ranking(demo):
    est, engine, _ = fitted(demo, "ekfac", fit_sequences=256)
    queries = catalog.queries(demo.db, "default")
    pre = est.precondition(query_gradients(demo, engine, queries, batch_size=8))
    full = QueryGradients.from_preconditioned(pre, None)
    low = QueryGradients.from_preconditioned(pre, 32)
    widths = {tm.name: min(tm.shape) for tm in engine.tracked}
    assert set(low.left) == {n for n, w in widths.items() if w > 32 and 32 * sum(pre[n].shape[1:]) < pre[n][0].numel()}
    assert low.left, "rank 32 compressed nothing: the model is too narrow for this test"
    idx = np.random.default_rng(0).choice(len(demo.runtime.corpus), size=min(300, len(demo.runtime.corpus)), replace=False)
    worker = LocalWorker(demo, engine)
    scores = {r: worker.run(ScorePass(qg), Shard(0, np.sort(idx)), 16, None)["scores"].T.numpy() for r, qg in (("full", full), (32, low))}
    per_query = [spearmanr(a, b)[0] for a, b in zip(scores[32], scores["full"])]
    pooled = corr(scores[32], scores["full"])
    print(f"\nrank 32 vs full rank ({len(low.left)}/{len(widths)} modules compressed, {len(queries)} queries x {len(idx)} "
          f"sequences): spearman per query min {min(per_query):.4f} mean {np.mean(per_query):.4f}, pooled {pooled[1]:.4f}")
    assert min(per_query) >= 0.98


# -- 8. bfloat16 --------------------------------------------------------------------------------------
def test_bfloat16_scores_are_finite_and_agree_with_float32(gpt2):
    settings = RunSettings(estimator="ekfac", rank=None)
    f32 = score_matrix(gpt2, "default", run_investigation(gpt2, "default", settings).result_set_id)
    try:
        gpt2.runtime.configure(dtype="bfloat16")
        assert next(gpt2.runtime.model.parameters()).dtype == torch.bfloat16
        bf16 = score_matrix(gpt2, "default", run_investigation(gpt2, "default", settings).result_set_id)
    finally:
        gpt2.runtime.configure(dtype="float32")
    assert np.isfinite(bf16).all()
    c = corr(bf16, f32)
    per_query = [spearmanr(a, b)[0] for a, b in zip(bf16, f32)]
    print(f"\nbfloat16 vs float32 ({f32.size} pairs): pearson {c[0]:.4f} spearman {c[1]:.4f}, per-query spearman min {min(per_query):.4f}")
    assert c[1] >= 0.9


def test_eigenbasis_query_compression_equals_svd_of_the_preconditioned_gradient(tmp_path):
    """EK-FAC compresses queries in its eigenbasis (rotating only r columns back); the result is the
    rank-r truncated SVD of the fully preconditioned gradient."""
    from inflq.contractions import QueryGradients
    from inflq.project import Project
    from inflq.runs import (
        RunSettings,
        ensure_factors,
        make_estimator,
        make_executor,
        query_gradients,
    )

    model = make_model_dir(tmp_path / "m", "gpt2", width=16)
    project = Project.init(tmp_path / "p", model, write_corpus(tmp_path / "c.jsonl"))
    add_query(project, "default", "the first president of astrobia was", "zorald pfaff")
    add_query(project, "default", "a river flows through the old", "town")
    engine = project.runtime.engine()
    est = make_estimator("ekfac")
    ensure_factors(project, est, engine, make_executor("local"), RunSettings(), Monitor())
    grads = query_gradients(project, engine, catalog.queries(project.db, "default"), 8)
    fast = est.precondition_queries(grads, 4)
    slow = QueryGradients.from_preconditioned(est.precondition(grads), 4)
    assert fast.left and set(fast.left) == set(slow.left) and set(fast.full) == set(slow.full)
    for name in slow.names:
        a, b = fast.dense(name), slow.dense(name)
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6 * float(b.abs().max())), name
    # The token route (rotating the queries' token factors instead of their gradients) is the same.
    from inflq_builtins.estimators import rotate_first_is_cheaper

    routed = [n for n in grads if rotate_first_is_cheaper(grads.factors[n][0].shape[1], *grads[n].shape[1:])]
    assert routed, "no module took the token route: widen the model"
    plain = dict(grads)
    by_tokens, by_matrix = est.precondition(grads), est.precondition(plain)
    for name in grads:
        b = by_matrix[name]
        assert torch.allclose(by_tokens[name], b, rtol=1e-4, atol=1e-6 * float(b.abs().max())), name
