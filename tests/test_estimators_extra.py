"""LiSSA and TracIn, against answers computed the slow way.

The exact damped Gauss-Newton influence is built with ``torch.func.jacrev`` on a separately loaded
float64 copy of a tiny model: ``G = mean_seq Σ_t J_tᵀ (diag p_t − p_t p_tᵀ) J_t`` over the tracked
modules' parameters and the training loss's positions ``t`` (every token but the last), the
normalisation EK-FAC uses.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.func import functional_call, grad, jacrev

from helpers import make_model_dir, write_corpus
from inflq import catalog
from inflq.errors import InflqError
from inflq.project import Project
from inflq.queries import add_query
from inflq.reading import score_matrix
from inflq.runs import RunSettings, run_investigation
from inflq_builtins.tracin import listed_checkpoints

QUERIES = [
    ("the first president of astrobia was", "zorald pfaff"),
    ("people eat bread and", "cheese"),
    ("the red cat runs with the", "big dog"),
]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: threads only contend (on a busy 2-core runner a product took 50× longer)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_project(root: Path, width: int = 8, layers: int = 1, n: int = 12, seed: int = 0) -> Project:
    model = make_model_dir(root / "model", "gpt2", width=width, layers=layers, seed=seed)
    project = Project.init(root / "project", model, write_corpus(root / "corpus.jsonl", n=n))
    for prompt, completion in QUERIES:
        add_query(project, "default", prompt, completion)
    return project


class ExactGaussNewton:
    """Flat gradients and the dense Gauss-Newton matrix over the tracked parameters (float64)."""

    def __init__(self, project: Project) -> None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(project.model_path), attn_implementation="eager")
        self.model = model.double().eval().requires_grad_(False)
        own = dict(self.model.named_parameters())
        self.params = {}
        for tm in project.runtime.engine().tracked:
            self.params[f"{tm.name}.weight"] = own[f"{tm.name}.weight"]
            if tm.bias:
                self.params[f"{tm.name}.bias"] = own[f"{tm.name}.bias"]
        self.size = sum(p.numel() for p in self.params.values())

    def logits(self, params, ids):
        return functional_call(self.model, params, (ids[None],), {"use_cache": False}).logits[0]

    def loss(self, params, ids, start):
        logp = torch.log_softmax(self.logits(params, ids)[:-1], -1)
        return -logp.gather(1, ids[1:, None])[start - 1 :].sum()

    def gradient(self, tokens, start: int = 1) -> torch.Tensor:
        g = grad(self.loss)(self.params, torch.as_tensor(np.asarray(tokens, np.int64)), start)
        return torch.cat([g[k].reshape(-1) for k in self.params])

    def matrix(self, sequences) -> torch.Tensor:
        G = torch.zeros(self.size, self.size, dtype=torch.float64)
        for s in sequences:
            ids = torch.as_tensor(np.asarray(s, np.int64))
            jac = jacrev(self.logits)(self.params, ids)
            J = torch.cat([jac[k].reshape(len(ids), -1, self.params[k].numel()) for k in self.params], -1)[:-1]
            p = torch.softmax(self.logits(self.params, ids), -1)[:-1]  # the last token has no next token, no loss
            H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
            G += torch.einsum("tvp,tvw,twq->pq", J, H, J)
        return G / len(sequences)


def exact_influence(project: Project, damping_factor: float) -> tuple[np.ndarray, np.ndarray, float]:
    ref = ExactGaussNewton(project)
    seqs = [project.runtime.corpus.get(i) for i in range(len(project.runtime.corpus))]
    G = ref.matrix(seqs)
    damping = damping_factor * float(torch.trace(G)) / ref.size
    train = torch.stack([ref.gradient(s) for s in seqs])
    qs = [project.runtime.tokenize_query(q["prompt"], q["completion"]) for q in catalog.queries(project.db, "default")]
    query = torch.stack([ref.gradient(q.tokens, q.completion_start) for q in qs])
    exact = query @ torch.linalg.solve(G + damping * torch.eye(ref.size, dtype=G.dtype), train.T)
    return exact.numpy(), (query @ train.T).numpy(), damping


def pearson(a, b) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


# -- LiSSA ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("lissa"))


@pytest.mark.slow
def test_lissa_converges_to_exact_damped_gauss_newton_influence(tiny):
    exact, dot, damping = exact_influence(tiny, damping_factor=1.0)
    found, residual = {}, {}
    # Full-batch mini-batches (12 sequences) make the recursion deterministic Richardson iteration.
    for depth in (20, 500):
        r = run_investigation(tiny, "default", RunSettings(estimator=f"lissa:damping={damping!r},depth={depth},batch_size=12", rank=None))
        found[depth] = score_matrix(tiny, "default", r.result_set_id)
        settings = json.loads(tiny.db["result_sets"].get(r.result_set_id)["settings"])["estimator_settings"]
        residual[depth] = settings["residual"]
        assert len(settings["residuals"]) == len(QUERIES) and settings["scale_used"] > 0
    c = {d: pearson(v, exact) for d, v in found.items()}
    print(f"\nlissa vs exact influence (λ={damping:.3g}): {c}, residuals {residual}, dot product {pearson(dot, exact):.3f}")
    assert c[500] >= 0.99
    assert residual[500] < residual[20] and residual[500] < 0.05
    assert pearson(found[500], exact) > pearson(dot, exact)


def test_lissa_default_damping_is_ekfacs_heuristic(tiny):
    """Without a damping, λ = 0.1 × the module's mean Gauss-Newton eigenvalue (trace / size)."""
    from inflq import Monitor
    from inflq.runs import ensure_factors, make_estimator, make_executor

    ref = ExactGaussNewton(tiny)
    G = ref.matrix([tiny.runtime.corpus.get(i) for i in range(len(tiny.runtime.corpus))])
    est = make_estimator("lissa:depth=1")
    engine = tiny.runtime.engine()
    ensure_factors(tiny, est, engine, make_executor("local"), RunSettings(estimator="lissa"), Monitor())
    offset = 0
    for tm in engine.tracked:
        n = tm.out_features * tm.in_dim
        block = torch.diagonal(G)[offset : offset + n]
        offset += n
        # sampled labels make it an estimate; 256 > 12 sequences, so every sequence counted once per batch
        assert est.dampings[tm.name] == pytest.approx(0.1 * float(block.mean()), rel=0.5), tm.name
    assert est.scale > max(torch.linalg.eigvalsh(G).max().item() * 0.5, 0)


def test_lissa_divergence_is_stopped_with_advice(tiny):
    with pytest.raises(InflqError, match="larger scale"):
        run_investigation(tiny, "default", RunSettings(estimator="lissa:scale=1e-3,depth=200,batch_size=4", rank=None))


def test_lissa_bad_options():
    from inflq.plugins import get_registry

    with pytest.raises(InflqError, match="at least 1"):
        get_registry().create("estimator", "lissa", {"depth": "0"})
    with pytest.raises(InflqError, match="positive"):
        get_registry().create("estimator", "lissa", {"scale": "-1"})


# -- TracIn -----------------------------------------------------------------------------------------
def test_tracin_with_one_checkpoint_is_the_gradient_dot_product(tiny, cli_run):
    with pytest.raises(InflqError, match="checkpoint add"):
        run_investigation(tiny, "default", RunSettings(estimator="tracin", rank=None))
    code, out, err = cli_run("checkpoint", "add", str(tiny.root), str(tiny.model_path), "--lr", "1")
    assert code == 0, err
    p = Project.open(tiny.root)
    assert [float(c["learning_rate"]) for c in listed_checkpoints(p)] == [1.0]
    assert p.db["checkpoints"].count == 1
    ident = score_matrix(p, "default", run_investigation(p, "default", RunSettings(estimator="identity", rank=None)).result_set_id)
    trac = score_matrix(p, "default", run_investigation(p, "default", RunSettings(estimator="tracin", rank=None)).result_set_id)
    assert np.array_equal(trac, ident)
    code, _, err = cli_run("checkpoint", "add", str(tiny.root), str(tiny.model_path), "--lr", "1")
    assert code == 1 and "already" in err
    # leave the shared project as it was
    listed_checkpoints(p).clear()
    p.save_config()
    p.db.execute("DELETE FROM checkpoints")
    p.db.conn.commit()


def test_tracin_sums_learning_rate_weighted_scores_over_checkpoints(tmp_path):
    from inflq_builtins.tracin import add_checkpoint

    project = make_project(tmp_path / "a", seed=0)
    other = make_project(tmp_path / "b", seed=3)  # same architecture, other weights
    add_checkpoint(project, project.model_path, 0.5)
    add_checkpoint(project, other.model_path, 2.0)
    ident_a = score_matrix(project, "default", run_investigation(project, "default", RunSettings(estimator="identity", rank=None)).result_set_id)
    ident_b = score_matrix(other, "default", run_investigation(other, "default", RunSettings(estimator="identity", rank=None)).result_set_id)
    r = run_investigation(project, "default", RunSettings(estimator="tracin", rank=None, shard_size=5))
    trac = score_matrix(project, "default", r.result_set_id)
    want = 0.5 * ident_a + 2.0 * ident_b
    assert np.abs(trac - want).max() <= 1e-4 * np.abs(want).max()
    # the stored top results carry per-module scores summed over checkpoints too
    row = next(project.db["results"].rows_where("result_set_id = ? AND side = 'top' AND rank = 1", [r.result_set_id]))
    assert sum(json.loads(row["module_scores"]).values()) == pytest.approx(row["score"], rel=1e-4)
    only_last = score_matrix(project, "default", run_investigation(project, "default", RunSettings(estimator="tracin:last=1", rank=None)).result_set_id)
    assert np.abs(only_last - 2.0 * ident_b).max() <= 1e-4 * np.abs(ident_b).max() * 2


def test_tracin_attributions_use_every_checkpoints_gradients(tmp_path):
    """TracIn's token and layer attributions are ``Σ_c η_c ×`` checkpoint c's per-token/per-module
    terms, each with that checkpoint's query and training gradients: they sum to the TracIn score
    computed independently (torch.func gradients of each checkpoint), and per token they equal the
    η-weighted sum of each checkpoint's identity attribution; for result sets and for probes."""
    from inflq.reading import ScoringSession
    from inflq_builtins.tracin import add_checkpoint

    project = make_project(tmp_path / "a", seed=0)
    other = make_project(tmp_path / "b", seed=3)  # same architecture, other weights
    add_checkpoint(project, project.model_path, 0.5)
    add_checkpoint(project, other.model_path, 2.0)
    refs = [(0.5, ExactGaussNewton(project)), (2.0, ExactGaussNewton(other))]
    qtoks = [project.runtime.tokenize_query(q["prompt"], q["completion"]) for q in catalog.queries(project.db, "default")]

    def tracin(tokens, qi) -> float:
        return sum(lr * float(ref.gradient(qtoks[qi].tokens, qtoks[qi].completion_start) @ ref.gradient(tokens)) for lr, ref in refs)

    def session(p: Project, spec: str) -> ScoringSession:
        r = run_investigation(p, "default", RunSettings(estimator=spec, rank=None))
        return ScoringSession.for_result_set(p, p.db["result_sets"].get(r.result_set_id))

    trac, ident_a, ident_b = session(project, "tracin"), session(project, "identity"), session(other, "identity")
    assert len(trac.checkpoints) == 2
    qids, qids_b = [q["id"] for q in catalog.queries(project.db, "default")], [q["id"] for q in catalog.queries(other.db, "default")]
    probe_session = ScoringSession.for_queries(project, qids, estimator="tracin")
    probe = "the first president of astrobia was zorald pfaff ."
    cases = [(project.runtime.corpus.get(i), qi) for i in (0, 4, 9) for qi in range(len(qids))]
    cases.append((project.runtime.tokenize_sequence(probe), 0))
    for tokens, qi in cases:
        want = tracin(tokens, qi)
        scale = max(abs(want), 1e-3)
        for s in (trac, probe_session):
            tok = s.attribute(tokens, qids[qi], "token")
            layer = s.attribute(tokens, qids[qi], "layer")
            assert tok.total == pytest.approx(want, abs=1e-4 * scale)
            assert layer.total == pytest.approx(want, abs=1e-4 * scale)
            assert tok.values.sum() == pytest.approx(want, abs=1e-4 * scale)
            weighted = 0.5 * ident_a.attribute(tokens, qids[qi], "token").values + 2.0 * ident_b.attribute(tokens, qids_b[qi], "token").values
            np.testing.assert_allclose(tok.values, weighted, rtol=0, atol=1e-5 * scale)
    (text_result,) = probe_session.score_texts([probe], qids[0])
    assert text_result.total == pytest.approx(tracin(project.runtime.tokenize_sequence(probe), 0), rel=1e-4)


def test_checkpoint_with_another_architecture_is_refused(tmp_path, cli_run):
    project = make_project(tmp_path / "a")
    wider = make_model_dir(tmp_path / "wider", "gpt2", width=16, layers=1)
    llama = make_model_dir(tmp_path / "llama", "llama", width=8, layers=1)
    code, _, err = cli_run("checkpoint", "add", str(project.root), str(wider), "--lr", "1e-3")
    assert code == 1 and "different architecture" in err
    code, _, err = cli_run("checkpoint", "add", str(project.root), str(llama), "--lr", "1e-3")
    assert code == 1 and "llama" in err and "gpt2" in err
    code, _, err = cli_run("checkpoint", "add", str(project.root), str(project.model_path), "--lr", "0")
    assert code == 1 and "positive" in err
    assert listed_checkpoints(Project.open(project.root)) == []


# -- validation against the PBRF ----------------------------------------------------------------------
@pytest.mark.slow
def test_validate_ranks_ekfac_and_lissa_above_the_gradient_dot_product(tiny, cli_run):
    # ε = 1e-3 rather than 1/N: with N = 12 sequences of a random model, ε = 1/N moves the
    # parameters far outside the region where any linear estimator can follow (measured).
    code, out, err = cli_run(
        "validate", str(tiny.root), "--estimators", "identity,ekfac,lissa:depth=400", "--sample", "8", "--queries", "3",
        "--pbrf-steps", "150", "--epsilon", "1e-3", "--dampings", "1e-6,1e-2,1",
    )
    assert code == 0, err
    assert "recommended EK-FAC damping" in out and "LiSSA / EK-FAC inverse-HVP time" in out
    rows = {r["estimator"]: r for r in tiny.db.query("SELECT * FROM validations WHERE validation = (SELECT max(validation) FROM validations)")}
    print("\n" + "\n".join(f"{k}: pearson {r['pearson']:.3f} spearman {r['spearman']:.3f} ihvp {r['ihvp_seconds']:.4f}s" for k, r in rows.items()))
    assert set(rows) == {"identity", "ekfac", "lissa:depth=400", "ekfac:damping=1e-06", "ekfac:damping=0.01", "ekfac:damping=1.0"}
    for name in ("ekfac", "lissa:depth=400"):
        assert rows[name]["pearson"] > rows["identity"]["pearson"] + 0.1, name
    assert rows["lissa:depth=400"]["ihvp_seconds"] > rows["ekfac"]["ihvp_seconds"]
    settings = json.loads(rows["ekfac"]["settings"])
    assert len(settings["sample"]) == 8 and settings["epsilon"] == 1e-3


def test_validate_refuses_an_infeasible_sample_with_its_cost(tiny):
    from inflq.validate import validate

    with pytest.raises(InflqError, match=r"needs about .* s per solve × 16"):
        validate(tiny, "default", ["identity"], sample=8, pbrf_steps=100000, max_minutes=0.01)
    with pytest.raises(InflqError, match="larger than the 12 fitting sequences"):
        validate(tiny, "default", ["identity"], sample=50)
