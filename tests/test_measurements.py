"""What a query measures (issue 25, item 11): the `measurement` plugin kind and its built-ins
`logprob`, `mean-logprob` and `margin`, chosen per query.

The references are computed the slow way: each measurement written out by hand on a float64 copy
of the model and differentiated with torch.autograd; and, since every estimator is linear in the
query's gradient, a margin query must score exactly as (the completion's query) − (the
alternative's query), estimator by estimator, through the same runs a user makes.
"""

from __future__ import annotations

import json
import sqlite3
import types

import numpy as np
import pytest
import torch

from inflq import Measurement, MeasurementTerm, catalog, get_registry, hookimpl
from inflq.engine import Conv1D
from inflq.project import Project
from inflq.queries import add_query
from inflq.reading import score_matrix
from inflq.runs import RunSettings, run_investigation
from inflq.testing import cli, query_gradients, tiny_project, using_plugin

PROMPT = "the first president of astrobia was"
A, B = "zorald pfaff", "velmora"


def _project(folder, arch: str = "gpt2") -> Project:
    """Queries 1: log p(A), 2: log p(B), 3: margin A vs B, 4: mean log p(A), after one prompt."""
    p = tiny_project(folder, arch=arch, queries=[(PROMPT, A), (PROMPT, B)])
    add_query(p, "default", PROMPT, A, measurement="margin", alternative=B)
    add_query(p, "default", PROMPT, A, measurement="mean-logprob")
    return p


@pytest.fixture(scope="module")
def proj(tmp_path_factory) -> Project:
    return _project(tmp_path_factory.mktemp("measure"))


def _rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


# -- the query gradient is autograd's gradient of the measurement ---------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_each_measurements_query_gradient_is_autograds(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    p = _project(tmp_path, arch)
    model = AutoModelForCausalLM.from_pretrained(str(p.model_path), attn_implementation="eager").double().eval()
    tracked = p.runtime.engine().tracked
    own = dict(model.named_parameters())

    def logprob(prompt: str, completion: str) -> tuple[torch.Tensor, int]:
        """Σ log p(completion token | everything before it), and how many tokens: by hand."""
        tq = p.runtime.tokenize_query(prompt, completion)
        ids = torch.as_tensor(tq.tokens)[None]
        logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0, :-1], dim=-1)
        picked = logp.gather(1, ids[0, 1:, None])[:, 0]
        return picked[tq.completion_start - 1 :].sum(), len(tq.tokens) - tq.completion_start

    ours = query_gradients(p)
    rows = catalog.queries(p.db, "default")
    assert [q["measurement"] for q in rows] == ["logprob", "logprob", "margin", "mean-logprob"]
    for i, q in enumerate(rows):
        lp, n = logprob(q["prompt"], q["completion"])
        if q["measurement"] == "logprob":
            f = lp
        elif q["measurement"] == "mean-logprob":
            f = lp / n
        else:
            f = lp - logprob(q["prompt"], q["alternative"])[0]
        params = [own[f"{tm.name}.weight"] for tm in tracked] + [own[f"{tm.name}.bias"] for tm in tracked if tm.bias]
        grads = dict(zip([f"{tm.name}.weight" for tm in tracked] + [f"{tm.name}.bias" for tm in tracked if tm.bias],
                         torch.autograd.grad(-f, params), strict=True))  # the measurement loss is −f
        for tm in tracked:
            w = grads[f"{tm.name}.weight"]
            w = w.T if isinstance(tm.module, Conv1D) else w  # Conv1D stores [in, out]
            want = torch.cat([w, grads[f"{tm.name}.bias"][:, None]], 1) if tm.bias else w
            assert _rel(ours[tm.name][i], want) < 1e-4, (q["measurement"], tm.name)
    # The margin's gradient is the completion's minus the alternative's; the mean is the sum over 2 tokens.
    for name, g in ours.items():
        assert _rel(g[2], g[0] - g[1]) < 1e-5 and _rel(g[3], g[0] / 2) < 1e-6, name


# -- every estimator scores a margin as the difference of its two completions' scores ---------------
def _scores(p: Project, spec: str) -> np.ndarray:
    r = run_investigation(p, "default", RunSettings(estimator=spec, rank=None))
    return score_matrix(p, "default", r.result_set_id)


@pytest.mark.parametrize("spec", ["identity", "ekfac", "kfac", "lissa:depth=3,batch_size=4,damping=0.01,scale=100"])
def test_estimators_score_a_margin_as_completion_minus_alternative(proj, spec):
    s = _scores(proj, spec)
    assert np.isfinite(s).all() and np.abs(s[0] - s[1]).max() > 0
    assert _rel(s[2], s[0] - s[1]) < 1e-4, spec
    assert _rel(s[3], s[0] / 2) < 1e-4, spec


def test_tracin_scores_a_margin_as_completion_minus_alternative(tmp_path):
    p = _project(tmp_path)
    r = cli("checkpoint", "add", p.root, p.model_path, "--lr", "0.5")
    assert r.code == 0, r.err
    p = Project.open(p.root)
    s = _scores(p, "tracin")
    assert _rel(s[2], s[0] - s[1]) < 1e-4
    assert _rel(s, 0.5 * _scores(p, "identity")) < 1e-4  # one checkpoint: η × the gradient dot product


def test_the_gradient_index_scores_a_margin_as_completion_minus_alternative(tmp_path):
    p = _project(tmp_path)
    r = cli("index", "build", p.root, "--k-s", "100000", "--k-a", "100000", "--kind", "orthogonal")
    assert r.code == 0, r.err
    s = _scores(p, "index")
    scale = np.abs(s[:2]).max()
    assert np.abs(s[2] - (s[0] - s[1])).max() <= 3e-3 * scale  # float16 rows and queries
    # At full width the index is EK-FAC's own scores: the margin's too.
    exact = _scores(p, "ekfac")
    assert np.abs(s[2] - exact[2]).max() <= 3e-3 * np.abs(exact[2]).max()
    # The index filter ranks the margin's candidates by the margin's own gradient.
    r = cli("run", p.root, "--estimator", "ekfac", "--filter", "index:k=5", "--rank", "full")
    assert r.code == 0, r.err
    m = score_matrix(p, "default")
    picked = np.flatnonzero(np.isfinite(m[2]))
    assert len(picked) == 5 and set(picked) == set(np.argsort(-exact[2])[:5])


@pytest.mark.slow  # PBRF solves (about 10 s)
def test_the_pbrf_ground_truth_measures_the_margin(proj):
    from inflq.validate import validate

    v = validate(proj, "default", estimators=["identity"], sample=4, queries=3, pbrf_steps=3, epsilon=1e-3, dampings=None, save=False)
    truth = v.pbrf
    assert truth.shape[0] == 3 and np.abs(truth[0] - truth[1]).max() > 0
    assert _rel(truth[2], truth[0] - truth[1]) < 1e-6
    ident = v.scores[next(iter(v.scores))]
    assert _rel(ident[2], ident[0] - ident[1]) < 1e-4


def test_probes_and_attributions_use_the_query_measurement(proj):
    from inflq.reading import ScoringSession

    ids = [q["id"] for q in catalog.queries(proj.db, "default")]
    session = ScoringSession.for_queries(proj, ids[:3], estimator="ekfac", rank=None)
    tokens = proj.runtime.corpus.get(3)
    (ma, ta), (mb, tb), (mm, tm) = (session.breakdown(tokens, q) for q in ids[:3])
    assert _rel(mm, ma - mb) < 1e-4 and _rel(tm, ta - tb) < 1e-4
    texts = session.score_texts(["the first president of astrobia was zorald pfaff"], ids[2])
    assert texts  # scored without error through the same gradients


# -- through the CLI ---------------------------------------------------------------------------------
def test_a_margin_query_through_the_cli(tmp_path):
    p = tiny_project(tmp_path, queries=[])
    root = p.root
    r = cli("query", "add", root, PROMPT, A, "--measurement", "margin", "--alternative", B)
    assert r.code == 0, r.err
    # Bad choices are one line naming the fix, and add nothing.
    for args, words in [
        (("--measurement", "margin"), "--alternative"),
        (("--measurement", "nope"), "no measurement named 'nope'"),
        (("--alternative", B), "drop --alternative"),
        (("--measurement", "margin", "--alternative", A), "different alternative"),
    ]:
        r = cli("query", "add", root, PROMPT, A, *args)
        assert r.code == 1 and r.err.count("\n") <= 1 and r.err.startswith("Error:") and words in r.err, (args, r.err)
    r = cli("query", "list", root, "--json")
    (row,) = json.loads(r.out)
    assert row["measurement"] == "margin" and row["alternative"] == B
    assert "margin vs 'velmora'" in cli("query", "list", root).out
    r = cli("run", root, "--estimator", "identity", "--rank", "full")
    assert r.code == 0, r.err
    r = cli("top", root, "--json", "-k", "3")
    assert r.code == 0, r.err
    out = json.loads(r.out)[0]
    assert len(out["results"]) == 3 and out["query"]["measurement"] == "margin"
    head = " ".join(cli("top", root, "-k", "1").out.split("┏")[0].split())
    assert "measuring margin vs 'velmora'; positive = raises log p(completion) - log p(alternative)" in head, head
    # An edit to the measurement makes the old results stale; choosing logprob drops the alternative.
    r = cli("query", "edit", root, str(row["id"]), "--measurement", "logprob")
    assert r.code == 0 and "stale" in r.out, r.err
    (row,) = json.loads(cli("query", "list", root, "--json").out)
    assert row["measurement"] == "logprob" and row["alternative"] is None
    r = cli("query", "edit", root, str(row["id"]), "--alternative", B)
    assert r.code == 1 and "drop --alternative" in r.err
    r = cli("query", "edit", root, str(row["id"]), "--measurement", "margin", "--alternative", B)
    assert r.code == 0, r.err
    # A file of queries carries each line's measurement.
    f = tmp_path / "q.jsonl"
    f.write_text(json.dumps({"prompt": PROMPT, "completion": A, "measurement": "mean-logprob"}) + "\n"
                 + json.dumps({"prompt": PROMPT, "completion": A, "measurement": "margin"}) + "\n")
    r = cli("query", "add", root, "--file", f)
    assert r.code == 1 and "query 2: measurement margin" in r.err
    f.write_text(json.dumps({"prompt": PROMPT, "completion": A, "measurement": "mean-logprob"}) + "\n")
    assert cli("query", "add", root, "--file", f).code == 0
    assert [q["measurement"] for q in json.loads(cli("query", "list", root, "--json").out)] == ["margin", "mean-logprob"]


def test_old_catalogs_migrate_to_logprob(tmp_path):
    p = tiny_project(tmp_path)
    db_path = p.root / "catalog.db"
    p.close()
    conn = sqlite3.connect(db_path)  # as an inflq from before measurements left it
    conn.execute("ALTER TABLE queries DROP COLUMN measurement")
    conn.execute("ALTER TABLE queries DROP COLUMN alternative")
    conn.execute("DELETE FROM _sqlite_migrations WHERE name = '0008_measurements'")
    conn.commit()
    conn.close()
    p = Project.open(p.root)
    rows = catalog.queries(p.db, "default")
    assert len(rows) == 2 and all(q["measurement"] == "logprob" and q["alternative"] is None for q in rows)
    assert cli("run", p.root, "--estimator", "identity").code == 0


# -- the plugin kind ------------------------------------------------------------------------------------
class Last(Measurement):
    """A third party's measurement: the log-probability of the completion's last token only."""

    name = "last-token"
    description = "log p(the completion's last token)"

    def terms(self, completion, alternative):
        n = len(completion.tokens) - completion.completion_start
        return [MeasurementTerm.of(completion, np.eye(n)[-1])]


@hookimpl
def _register_last(register):
    register(Last)


_plugin = types.ModuleType("last_token_measurement")
_plugin.register_measurements = _register_last


def test_a_third_party_measurement_is_found_and_used(tmp_path):
    reg = get_registry()
    assert {"logprob", "margin", "mean-logprob"} <= set(reg.names("measurement"))
    assert reg.default("measurement") == "logprob"
    p = tiny_project(tmp_path, queries=[(PROMPT, A)])
    with using_plugin(_plugin):
        assert "last-token" in cli("plugins").out
        add_query(p, "default", PROMPT, A, measurement="last-token")
        g = query_gradients(p)
        # "zorald pfaff": the last token's log-probability is the whole minus the first token's.
        add_query(p, "default", PROMPT, "zorald")
        g = query_gradients(p)
        for name, v in g.items():
            assert _rel(v[1], v[0] - v[2]) < 1e-4, name


def test_lds_measures_each_querys_measurement(proj):
    """LDS and leave-one-out measure the query's measurement under each retrained model (here the
    project's own model stands in for one); a log p(completion) query keeps its study's old key."""
    import hashlib

    from inflq.lds import _from_task, _task_queries, query_logprobs, study_key
    from inflq.measuring import measure, measured_values
    from inflq.runs import make_trainer

    model = proj.runtime.model
    rows = catalog.queries(proj.db, "default")
    measured = [measure(proj.runtime, q) for q in rows]
    got = measured_values(model, measured)
    lp = query_logprobs(model, [proj.runtime.tokenize_query(PROMPT, A), proj.runtime.tokenize_query(PROMPT, B)])
    np.testing.assert_allclose(got, [lp[0], lp[1], lp[0] - lp[1], lp[0] / 2], rtol=1e-12)
    np.testing.assert_array_equal(measured_values(model, _from_task(_task_queries(measured))), got)  # as tasks carry them
    trainer = make_trainer(None)
    qtoks = [proj.runtime.tokenize_query(q["prompt"], q["completion"]) for q in rows[:2]]
    blob = {  # the key of a study from before measurements were chosen
        "model": proj.model_fingerprint, "corpus": proj.corpus_identity.recorded, "n": len(proj.runtime.corpus),
        "queries": [[int(t) for t in q.tokens] + [int(q.completion_start)] for q in qtoks],
        "trainer": trainer.name, "trainer_settings": trainer.settings, "seed": 0, "fraction": 0.5,
    }
    old = hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:24]
    assert study_key(proj, measured[:2], trainer, 0, 0.5) == old
    assert study_key(proj, measured[:3], trainer, 0, 0.5) != study_key(proj, measured[:2] + measured[:1], trainer, 0, 0.5)
