"""LDS (`inflq validate --lds`): the arithmetic against a hand computation, the whole pipeline
against a retraining stub whose outcome is a known linear function of the subset, and an
end-to-end run on a tiny GPT-2 with the built-in trainer that is cancelled after one subset and
resumed without retraining it."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from helpers import make_model_dir, write_corpus  # noqa: E402
from inflq import Monitor, Trainer, catalog, hookimpl  # noqa: E402
from inflq.errors import Cancelled, InflqError  # noqa: E402
from inflq.project import Project  # noqa: E402
from inflq.queries import add_query  # noqa: E402

QUERIES = [
    ("the first president of astrobia was", "zorald pfaff"),
    ("people eat bread and", "cheese"),
    ("the red cat runs with the", "big dog"),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("lds")
    model = make_model_dir(root / "model", "gpt2", width=8, layers=1, seed=0)
    project = Project.init(root / "project", model, write_corpus(root / "corpus.jsonl", n=16))
    for prompt, completion in QUERIES:
        add_query(project, "default", prompt, completion)
    yield project
    project.close()


# -- the arithmetic, by hand -----------------------------------------------------------------------
def test_lds_arithmetic_matches_a_hand_computation():
    from inflq.lds import lds_per_query, mean_and_ci, subset_predictions

    scores = np.array([[1.0, -1.0], [2.0, 0.5], [4.0, 0.0], [8.0, 3.0]])  # [sequences, queries]
    subsets = [np.array([0, 1]), np.array([1, 2]), np.array([2, 3]), np.array([0, 3])]
    pred = subset_predictions(scores, subsets)
    assert pred.tolist() == [[3.0, -0.5], [6.0, 0.5], [12.0, 3.0], [9.0, 2.0]]
    measured = np.array([[0.1, 5.0], [0.2, 1.0], [0.4, 2.0], [0.3, 4.0]])
    per_q = lds_per_query(pred, measured)
    # query 0: prediction ranks 1,2,4,3 and measured ranks 1,2,4,3: ρ = 1.
    # query 1: prediction ranks 1,2,4,3 and measured ranks 4,1,2,3: d = -3,1,2,0, Σd² = 14,
    # ρ = 1 - 6·14 / (4·15) = -0.4.
    assert per_q == pytest.approx([1.0, -0.4])
    mean, ci = mean_and_ci(per_q)
    # mean 0.3; sd = sqrt(((0.7)² + (0.7)²) / 1) = 0.98995; t(0.975, 1) = 12.7062; ci = t·sd/√2.
    assert mean == pytest.approx(0.3)
    assert ci == pytest.approx(12.706204736 * 0.98994949 / np.sqrt(2), rel=1e-6)
    # A constant measurement has no ranking: NaN, left out of the mean.
    per_q = lds_per_query(pred, np.array([[1.0, 5.0], [1.0, 1.0], [1.0, 2.0], [1.0, 4.0]]))
    assert np.isnan(per_q[0]) and per_q[1] == pytest.approx(-0.4)
    assert mean_and_ci(per_q)[0] == pytest.approx(-0.4) and np.isnan(mean_and_ci(per_q)[1])


def test_table_cells_show_unsaved_nan_as_a_dash():
    from inflq.lds import LDS_COLUMNS, LDSRow, lds_table_rows

    saved = {"estimator": "ekfac:damping=0.1", "damping": 0.1, "lds": 0.25, "lds_ci": None, "pearson": 0.5, "fit_seconds": 1.0, "ihvp_seconds": 2.0}
    assert lds_table_rows([saved]) == [("ekfac:damping=0.1", "0.1", "0.250", "—", "0.500", "1.0", "2.0")]
    assert lds_table_rows([LDSRow("identity", float("nan"), float("nan"), 0.1, 0.0, 3.0)]) == [("identity", "", "—", "—", "0.100", "0.0", "3.0")]
    assert len(LDS_COLUMNS) == 7


def test_subsets_depend_on_seed_and_number_only_and_bad_fractions_are_refused():
    from inflq.lds import subset_indices

    a = subset_indices(20, 0.5, 0, 3)
    assert len(a) == 10 and np.all(np.diff(a) > 0) and a.dtype == np.int64
    assert np.array_equal(a, subset_indices(20, 0.5, 0, 3))
    assert not np.array_equal(a, subset_indices(20, 0.5, 0, 4))
    assert not np.array_equal(a, subset_indices(20, 0.5, 1, 3))
    for bad in (0.0, 1.0, 0.01):
        with pytest.raises(InflqError, match="--fraction"):
            subset_indices(20, bad, 0, 0)


# -- the pipeline against a known linear outcome -----------------------------------------------------
class LinearOutcome(torch.nn.Module):
    """A stand-in "retrained model": each query's completion tokens get logit ``a_q / k`` (k
    completion tokens), all others 0, so log p(completion) = Σ (a/k − log(e^{a/k} + V − 1)),
    increasing in ``a_q``."""

    def __init__(self, a: dict[tuple, float], starts: dict[tuple, int], vocab: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.a, self.starts, self.vocab = a, starts, vocab

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        key = tuple(int(t) for t in input_ids[0])
        logits = torch.zeros(1, len(key), self.vocab, dtype=torch.float64)
        start = self.starts[key]
        k = len(key) - start
        for pos in range(start - 1, len(key) - 1):
            logits[0, pos, key[pos + 1]] = self.a[key] / k
        return SimpleNamespace(logits=logits)


class StubTrainer(Trainer):
    """The outcome of retraining on subset S is a_q(S) = sign · Σ_{i∈S} w[i, q]."""

    name = "linear-stub"
    description = "a known linear function of the subset (tests)"
    weights: np.ndarray = np.zeros((0, 0))
    sign = 1.0
    calls: list = []

    def train(self, ctx):
        qtoks = [ctx.project.runtime.tokenize_query(q["prompt"], q["completion"]) for q in catalog.queries(ctx.project.db, "default")]
        a, starts = {}, {}
        for q, t in enumerate(qtoks):
            key = tuple(int(x) for x in t.tokens)
            # Scaled to order 1 (a monotone change): the stand-in's log-probabilities then resolve every subset.
            a[key] = self.sign * float(self.weights[ctx.indices, q].sum()) / float(np.abs(self.weights[:, q]).max())
            starts[key] = t.completion_start
        StubTrainer.calls.append(ctx.indices.copy())
        return LinearOutcome(a, starts, len(ctx.project.runtime.tokenizer))


class StubPlugin:
    @hookimpl
    def register_trainers(self, register):
        register(StubTrainer)


@pytest.fixture
def stub_registry():
    from inflq.plugins import get_registry

    reg = get_registry()
    reg.register(StubPlugin(), name="lds-stub")
    assert "linear-stub" in reg.names("trainer")
    return reg


def test_lds_is_exact_against_a_linear_outcome(tiny, stub_registry):
    """With retraining outcomes linear in identity's scores, identity's LDS is 1 (−1 with the sign
    flipped) for every query, and EK-FAC's equals the hand-computed Spearman of its subset sums with
    identity's."""
    from scipy.stats import spearmanr

    from inflq.lds import estimator_scores, subset_indices, validate_lds
    from inflq.runs import default_executor

    qrows = catalog.queries(tiny.db, "default")
    engine = tiny.runtime.engine()
    ex = default_executor()
    ident = estimator_scores(tiny, "identity", qrows, engine, None, 0, 8, Monitor(), ex)[0]
    # seed 3: the seed validate_lds fits with below (the true Fisher samples its labels)
    ekfac = estimator_scores(tiny, "ekfac", qrows, engine, None, 3, 8, Monitor(), ex)[0]
    assert ident.shape == (16, 3) and np.isfinite(ident).all()
    StubTrainer.weights, StubTrainer.sign, StubTrainer.calls = ident, 1.0, []
    v = validate_lds(tiny, "default", ["identity", "ekfac"], subsets=8, fraction=0.5, trainer="linear-stub", seed=3)
    rows = {r.estimator: r for r in v.rows}
    assert rows["identity"].per_query == pytest.approx([1.0, 1.0, 1.0]) and rows["identity"].lds == pytest.approx(1.0)
    subs = [subset_indices(16, 0.5, 3, j) for j in range(8)]
    assert [c.tolist() for c in StubTrainer.calls] == [s.tolist() for s in subs]
    want = [spearmanr([ekfac[s, q].sum() for s in subs], [ident[s, q].sum() for s in subs])[0] for q in range(3)]
    assert rows["ekfac"].per_query == pytest.approx(want, abs=1e-9)
    assert rows["ekfac"].lds == pytest.approx(np.mean(want))
    # The sign: an outcome that falls as the scores rise gives −1.
    StubTrainer.sign, StubTrainer.calls = -1.0, []
    v = validate_lds(tiny, "default", ["identity"], subsets=8, fraction=0.5, trainer="linear-stub", seed=4, save=False)
    assert v.rows[0].per_query == pytest.approx([-1.0, -1.0, -1.0]) and len(StubTrainer.calls) == 8
    # Saved rows read back (the first call's).
    back = catalog.validation_rows(tiny.db, method="lds")
    assert [r["estimator"] for r in back] == ["identity", "ekfac"] and back[0]["lds"] == pytest.approx(1.0)
    assert back[0]["settings"]["trainer"] == "linear-stub" and back[0]["num_sequences"] == 8


def test_leave_one_out_is_exact_against_a_linear_outcome(tiny, stub_registry, cli_run):
    """m(all) − m(all ∖ i) rises with w_i when the outcome is increasing in Σ w: identity's LOO
    correlation is 1 for every query; a larger --loo reuses the models already retrained."""
    from inflq.lds import estimator_scores, loo_sequences, validate_loo
    from inflq.runs import default_executor

    qrows = catalog.queries(tiny.db, "default")
    ident = estimator_scores(tiny, "identity", qrows, tiny.runtime.engine(), None, 0, 8, Monitor(), default_executor())[0]
    StubTrainer.weights, StubTrainer.sign, StubTrainer.calls = ident, 1.0, []
    v = validate_loo(tiny, "default", ["identity"], count=4, trainer="linear-stub", save=False)
    assert v.rows[0].per_query == pytest.approx([1.0, 1.0, 1.0])
    left = loo_sequences(16, 4, 0)
    assert [len(c) for c in StubTrainer.calls] == [16, 15, 15, 15, 15]
    assert [sorted(set(range(16)) - set(c.tolist())) for c in StubTrainer.calls[1:]] == [[int(i)] for i in left]
    assert np.array_equal(loo_sequences(16, 5, 0)[:4], left)
    code, out, err = cli_run("validate", str(tiny.root), "--loo", "5", "--trainer", "linear-stub", "--estimators", "identity")
    assert code == 0, err
    assert "leave-one-out validation" in out and len(StubTrainer.calls) == 6  # only the 5th sequence's model is new
    rows = catalog.validation_rows(tiny.db, method="loo")
    assert rows[0]["lds"] == pytest.approx(1.0) and rows[0]["settings"]["left_out"] == loo_sequences(16, 5, 0).tolist()
    # --leave-out names sequences by id; models already retrained for them (keyed by the left-out
    # index) are reused, in any order.
    ids = catalog.metadata_column(tiny.db, "seq_id")
    chosen = [str(ids[i]) for i in loo_sequences(16, 5, 0)[[4, 0, 2]]]
    v = validate_loo(tiny, "default", ["identity"], trainer="linear-stub", sequences=chosen, save=False)
    assert len(StubTrainer.calls) == 6 and v.settings["left_out"] == [int(i) for i in loo_sequences(16, 5, 0)[[4, 0, 2]]]
    assert v.rows[0].per_query == pytest.approx([1.0, 1.0, 1.0])
    with pytest.raises(InflqError, match="no training sequence 'nope'"):
        validate_loo(tiny, "default", ["identity"], trainer="linear-stub", sequences=[chosen[0], chosen[1], "nope"])
    with pytest.raises(InflqError, match="at least 3 different"):
        validate_loo(tiny, "default", ["identity"], trainer="linear-stub", sequences=[chosen[0], chosen[0], chosen[1]])
    code, out, err = cli_run("validate", str(tiny.root), "--loo", "5", "--lds")
    assert code == 1 and "give one" in err
    with pytest.raises(InflqError, match="--loo 2"):
        validate_loo(tiny, "default", ["identity"], count=2, trainer="linear-stub")


def test_lds_refuses_bad_input(tiny):
    from inflq.lds import validate_lds

    with pytest.raises(InflqError, match="--subsets"):
        validate_lds(tiny, "default", ["identity"], subsets=2)
    with pytest.raises(InflqError, match="no trainer named"):
        validate_lds(tiny, "default", ["identity"], subsets=4, trainer="nope")
    with pytest.raises(InflqError, match="no estimator named"):
        validate_lds(tiny, "default", ["nope"], subsets=4)


# -- end to end: the built-in trainer, cancelled after one subset, resumed -----------------------------
def test_validate_lds_end_to_end_cancels_and_resumes(tmp_path, cli_run, monkeypatch):
    from inflq.lds import validate_lds
    from inflq.plugins import get_registry

    model = make_model_dir(tmp_path / "model", "gpt2", width=16, layers=1, seed=0)
    project = Project.init(tmp_path / "project", model, write_corpus(tmp_path / "corpus.jsonl", n=16))
    for prompt, completion in QUERIES:
        add_query(project, "default", prompt, completion)
    adamw = get_registry().get("trainer", "adamw")
    trained: list[list[int]] = []
    real = adamw.train

    def counting(self, ctx):
        trained.append(ctx.indices.tolist())
        return real(self, ctx)

    monkeypatch.setattr(adamw, "train", counting)
    spec = "adamw:epochs=2,batch_size=4,lr=0.01,threads=1"
    monitor = Monitor()

    def on_progress(ev):
        if ev.phase == "LDS retraining" and ev.done == 1:
            monitor.cancel()

    monitor.on_progress = on_progress
    with pytest.raises(Cancelled):
        validate_lds(project, "default", ["identity", "ekfac"], subsets=4, trainer=spec, monitor=monitor)
    assert len(trained) == 1
    study = next(iter({r["study"] for r in project.db.query("SELECT study FROM lds_subsets")}))
    assert list(catalog.lds_subsets(project.db, study)) == [0]
    project.close()

    code, out, err = cli_run("validate", str(tmp_path / "project"), "--lds", "--subsets", "4", "--trainer", spec,
                             "--estimators", "identity,ekfac", "--dampings", "1e-3,1")
    assert code == 0, err
    assert len(trained) == 4 and len({tuple(t) for t in trained}) == 4  # subsets 1-3 now; 0 not again
    assert "LDS validation" in out and "recommended EK-FAC damping (best correlation with retraining)" in out
    p = Project.open(tmp_path / "project")
    rows = catalog.validation_rows(p.db, method="lds")
    assert [r["estimator"] for r in rows] == ["identity", "ekfac", "ekfac:damping=0.001", "ekfac:damping=1.0"]
    assert all(r["method"] == "lds" and r["num_sequences"] == 4 and len(r["settings"]["per_query"]) == 3 for r in rows)
    assert all(-1 <= r["lds"] <= 1 for r in rows if r["lds"] == r["lds"])
    assert sorted(catalog.lds_subsets(p.db, rows[0]["settings"]["study"])) == [0, 1, 2, 3]
    assert rows[0]["settings"]["retrained_now"] == 3
    # A third run retrains nothing.
    code, out, err = cli_run("validate", str(tmp_path / "project"), "--lds", "--subsets", "4", "--trainer", spec, "--estimators", "identity")
    assert code == 0, err
    assert len(trained) == 4
    p.close()


def test_adamw_trainer_is_seeded_from_config_and_shares_the_demo_loop(tiny):
    """Same seed and subset: the same model; another subset or seed: another; a fresh init of
    config.json (not the project's weights); and the demo's training script calls this loop."""
    import inspect

    from inflq import TrainContext
    from inflq.plugins import get_registry

    tr = get_registry().create("trainer", "adamw", {"epochs": 1, "batch_size": 4, "threads": 1})

    def train(idx, seed):
        return tr.train(TrainContext(tiny, np.asarray(idx, np.int64), seed, Monitor(), Path(".")))

    def flat(m):
        return torch.cat([p.detach().flatten() for p in m.parameters()])

    a, b = flat(train(range(8), 0)), flat(train(range(8), 0))
    assert torch.equal(a, b)
    assert not torch.equal(a, flat(train(range(1, 9), 0))) and not torch.equal(a, flat(train(range(8), 1)))
    assert not torch.equal(a, flat(tiny.runtime.model))
    monitor = Monitor()
    monitor.cancel()
    with pytest.raises(Cancelled):
        tr.train(TrainContext(tiny, np.arange(8), 0, monitor, Path(".")))
    demo = (Path(__file__).resolve().parents[1] / "projects" / "demo" / "train_model.py").read_text()
    assert "from inflq_builtins.trainers import train_causal_lm" in demo and "opt.step()" not in demo
    assert "opt.step()" in inspect.getsource(__import__("inflq_builtins.trainers").trainers.train_causal_lm)


def test_adamw_loop_saves_evenly_spaced_checkpoints_with_their_learning_rates(tiny, tmp_path):
    """K checkpoints after steps round(k·T/K), each holding the weights after exactly that step (as
    the next step's forward pass sees them) and the learning rate of the step that produced it (the
    schedule by hand); the final model is bitwise the one trained without checkpoints; `inflq
    checkpoint add` accepts them."""
    import json
    import math

    from transformers import AutoConfig, AutoModelForCausalLM

    from inflq_builtins.tracin import add_checkpoint, listed_checkpoints
    from inflq_builtins.trainers import checkpoint_steps, train_causal_lm

    assert checkpoint_steps(372, 5) == [74, 149, 223, 298, 372]
    assert checkpoint_steps(12, 3) == [4, 8, 12] and checkpoint_steps(3, 3) == [1, 2, 3] and checkpoint_steps(12, 0) == []
    with pytest.raises(InflqError, match="ask for fewer"):
        checkpoint_steps(3, 4)

    seqs = [[int(t) for t in x] for x in tiny.runtime.corpus.many(np.arange(16))]
    config = AutoConfig.from_pretrained(str(tiny.model_path))

    def fresh():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config).float()

    def flat(m):
        return torch.cat([p.detach().flatten() for p in m.parameters()])

    lr, epochs, bs = 0.01, 3, 4  # 16 sequences: 4 steps an epoch, 12 in all, warmup min(200, 12 // 10) = 1
    plain = fresh()
    train_causal_lm(plain, seqs, tiny.runtime.pad_id, epochs=epochs, batch_size=bs, lr=lr, seed=0)
    model = fresh()
    seen = []  # the weights each step's forward pass sees: seen[s] = after s steps
    model.register_forward_pre_hook(lambda mod, args: seen.append(flat(mod).clone()))
    with pytest.raises(InflqError, match="checkpoint_dir"):
        train_causal_lm(fresh(), seqs, tiny.runtime.pad_id, epochs=1, batch_size=bs, checkpoints=2)
    out = train_causal_lm(model, seqs, tiny.runtime.pad_id, epochs=epochs, batch_size=bs, lr=lr, seed=0,
                          checkpoints=3, checkpoint_dir=tmp_path / "ckpts")
    assert torch.equal(flat(model), flat(plain))  # saving changed nothing
    assert len(seen) == 12
    seen.append(flat(model))

    def rate(step):  # the schedule by hand: 1 warmup step, then cosine from lr to 0.05 lr over the other 11
        return lr * (1.0 if step == 0 else 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - 1) / 11)))

    assert [c["step"] for c in out["checkpoints"]] == [4, 8, 12]
    assert sorted(p.name for p in (tmp_path / "ckpts").iterdir()) == ["step-00004", "step-00008", "step-00012"]
    for c in out["checkpoints"]:
        folder = Path(c["path"])
        meta = json.loads((folder / "checkpoint.json").read_text())
        assert meta == {"step": c["step"], "learning_rate": c["learning_rate"]}
        assert meta["learning_rate"] == pytest.approx(rate(c["step"] - 1), rel=1e-12)
        saved = AutoModelForCausalLM.from_pretrained(str(folder)).float()
        assert torch.equal(flat(saved), seen[c["step"]])
    assert not torch.equal(seen[4], seen[8])
    row = add_checkpoint(tiny, Path(out["checkpoints"][0]["path"]), out["checkpoints"][0]["learning_rate"])
    assert row["learning_rate"] == pytest.approx(rate(3)) and listed_checkpoints(tiny)[-1]["learning_rate"] == row["learning_rate"]
