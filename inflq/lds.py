"""The linear datamodeling score (LDS): estimators against retraining.

Train the model on M random subsets of the corpus (each holding ``fraction`` of it) with a
``trainer`` plugin, measure each query's measurement (``log p(completion | prompt)`` by default; the
query's :class:`inflq.Measurement`) under each retrained model;
an estimator's prediction for a subset is the sum of its scores (over the full corpus, from the
project's model) of the sequences the subset holds. A query's LDS is the Spearman correlation, over
subsets, between predictions and measurements; the estimator's LDS is its mean over queries, with a
95 % t-interval over queries (Park et al. 2023; the Kronfluence and bergson examples).

Resumable: each retrained subset's measurements are committed at once (``lds_subsets``, keyed by the
study: model, corpus, queries, trainer, seed and fraction; subset ``j``'s indices depend only on the
seed, ``j`` and the corpus size, so raising M extends a study). A rerun skips committed subsets;
Ctrl-C loses at most the subset in flight.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import pearsonr, spearmanr
from scipy.stats import t as student_t

from . import catalog
from .base import TrainContext, Trainer
from .display import plural
from .errors import InflqError
from .measuring import measure, measured_values
from .plugins import get_registry
from .progress import Monitor
from .project import Project
from .settings import ValidationSettings

_DEFAULT = ValidationSettings()  # the keyword arguments' defaults: declared in inflq/settings.py


@dataclass
class LDSRow:
    """One estimator (at one damping): its LDS over subsets, per query and averaged."""

    estimator: str
    lds: float
    ci: float
    pearson: float
    fit_seconds: float
    score_seconds: float
    damping: float | None = None
    per_query: list[float] = field(default_factory=list)


@dataclass
class LDSValidation:
    """The result of :func:`validate_lds`."""

    id: int | None
    rows: list[LDSRow]
    measured: np.ndarray  # [subsets, queries]
    predictions: dict[str, np.ndarray]  # spec -> [subsets, queries]
    settings: dict[str, Any]
    recommended_damping: float | None = None
    trained: list[int] = field(default_factory=list)  # the subsets retrained by this call


LDS_COLUMNS = ("estimator", "damping", "LDS", "± 95% CI", "pearson", "fit s", "score s")


def lds_table_rows(rows: list) -> list[tuple[str, ...]]:
    """The cells of an LDS table (``LDS_COLUMNS``) for :class:`LDSRow`s or saved catalog rows
    (``catalog.validation_rows``), as the CLI and the TUI show them."""

    def num(x, form: str) -> str:  # NaN is saved as NULL: either shows as "—"
        return "—" if x is None or not math.isfinite(x) else format(x, form)

    def cells(estimator, damping, lds, ci, pearson, fit_s, score_s):
        return (estimator, "" if damping is None else f"{damping:g}", num(lds, ".3f"), num(ci, ".3f"), num(pearson, ".3f"), num(fit_s, ".1f"), num(score_s, ".1f"))

    out = []
    for r in rows:
        if isinstance(r, dict):
            out.append(cells(r["estimator"], r["damping"], r["lds"], r["lds_ci"], r["pearson"], r["fit_seconds"], r["ihvp_seconds"]))
        else:
            out.append(cells(r.estimator, r.damping, r.lds, r.ci, r.pearson, r.fit_seconds, r.score_seconds))
    return out


def lds_title(vid: int | None, settings: dict) -> str:
    if settings.get("method") == "loo":
        return (f"leave-one-out validation {vid}: {plural(len(settings['queries']), 'query')} × {plural(settings['subsets'], 'sequence')} left out "
                f"(Spearman with the measured effect), trainer {settings['trainer']}")
    return (f"LDS validation {vid}: {plural(len(settings['queries']), 'query')} × {plural(settings['subsets'], 'subset')} of "
            f"{plural(settings['subset_size'], 'sequence')}, trainer {settings['trainer']}")


# -- what is compared: shared by validate (the PBRF) and the retraining validations ----------------
def compared_specs(estimators: list[str] | None, dampings: list[float] | None) -> tuple[list[str], str | None]:
    """The estimator specs a validation compares: ``estimators`` (default: the registry's
    comparison set) and the default estimator at each of ``dampings`` (``ekfac:damping=λ`` among
    the built-ins); with the name of the estimator whose damping is swept (None: no sweep)."""
    registry = get_registry()
    specs = list(estimators or registry.comparison("estimator"))
    if not dampings:
        return specs, None
    swept = registry.default("estimator")
    if "damping" not in {o.name for o in registry.get("estimator", swept).options}:
        raise InflqError(f"--dampings sweeps the default estimator's damping, and {swept} has no damping option; "
                         "name specs with their damping in --estimators instead")
    return specs + [f"{swept}:damping={d!r}" for d in dampings], swept


def best_damping(rows: list, swept: str | None, score) -> float | None:
    """The damping of the swept estimator's row (``swept:damping=λ``) with the best ``score(row)``."""
    if swept is None:
        return None
    sweep = [r for r in rows if r.estimator.startswith(f"{swept}:damping=")]
    return max(sweep, key=lambda r: score(r) if math.isfinite(score(r)) else -2).damping if sweep else None


def swept_estimator(settings: dict, rows: list) -> str | None:
    """The estimator whose damping a validation swept: recorded in its settings, or (validations
    saved before it was) read from its rows' specs (``name:damping=λ``)."""
    if settings.get("damping_sweep"):
        return settings["damping_sweep"]
    for r in rows:
        name, _, rest = (r["estimator"] if isinstance(r, dict) else r.estimator).partition(":")
        if rest.startswith("damping="):
            return name
    return None


def recommendation(damping: float | None, swept: str | None, against: str = "retraining") -> str | None:
    """The line recommending the swept estimator's best damping, as the CLI and the TUI show it."""
    if damping is None or swept is None:
        return None
    return f"recommended {swept} damping (best correlation with {against}): {damping:g} (run with --estimator {swept}:damping={damping:g})"



# -- the arithmetic --------------------------------------------------------------------------------
def subset_indices(n: int, fraction: float, seed: int, subset: int) -> np.ndarray:
    """Subset ``subset``'s sorted corpus indices: ``round(fraction × n)`` of ``n``, drawn from a
    generator seeded by (``seed``, ``subset``) alone."""
    k = int(round(fraction * n))
    if not 0 < fraction < 1 or k < 1 or k >= n:
        raise InflqError(f"--fraction {fraction} must leave between 1 and {n - 1} of the {n} sequences in a subset")
    rng = np.random.default_rng([int(seed), 0x1D5, int(subset)])
    return np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)


def subset_predictions(scores: np.ndarray, subsets: list[np.ndarray]) -> np.ndarray:
    """``[subsets, queries]``: per subset, the sum of ``scores[i, q]`` over its sequences ``i``."""
    return np.stack([scores[idx].sum(0) for idx in subsets])


def lds_per_query(predictions: np.ndarray, measured: np.ndarray) -> np.ndarray:
    """Spearman over subsets (rows) between predictions and measurements, per query (column);
    NaN where either is constant."""
    out = np.full(predictions.shape[1], np.nan)
    for q in range(predictions.shape[1]):
        a, b = predictions[:, q], measured[:, q]
        if np.std(a) > 0 and np.std(b) > 0:
            out[q] = float(spearmanr(a, b)[0])
    return out


def mean_and_ci(values: np.ndarray) -> tuple[float, float]:
    """The mean of the finite ``values`` and the half-width of its 95 % t-interval (NaN with fewer
    than two)."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if not len(v):
        return float("nan"), float("nan")
    if len(v) < 2:
        return float(v.mean()), float("nan")
    return float(v.mean()), float(student_t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))


# -- the ground truth ------------------------------------------------------------------------------
def query_logprobs(model, queries: list, device=None) -> np.ndarray:
    """``log p(completion | prompt)`` of each tokenized query (``tokens``, ``completion_start``) under ``model``."""
    import torch

    device = device or next(model.parameters()).device
    out = []
    with torch.no_grad():
        for q in queries:
            ids = torch.as_tensor(np.asarray(q.tokens, np.int64), device=device)[None]
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits.double()
            logp = torch.log_softmax(logits, -1)[0, :-1].gather(1, ids[0, 1:, None])[:, 0]
            out.append(float(logp[q.completion_start - 1 :].sum()))
    return np.array(out)


def _plain(terms: list) -> bool:
    """One term with weight 1 on every token: ``log p(completion | prompt)``."""
    return len(terms) == 1 and bool(np.all(np.asarray(terms[0].weights) == 1.0))


def study_key(project: Project, measured: list, trainer: Trainer, seed: int, fraction: float | str) -> str:
    """What determines a study's measurements, hashed: retrained subsets of another key are not
    reused. ``measured[q]``: each query's :class:`inflq.MeasurementTerm` s (a ``log p(completion)``
    query is keyed as it was before measurements were chosen, so older studies are reused).
    ``fraction``: LDS's subset fraction, or "loo" for leave-one-out."""
    blob = {
        "model": project.model_fingerprint, "corpus": project.corpus_identity.recorded, "n": len(project.runtime.corpus),
        "queries": [[int(t) for t in terms[0].tokens] + [int(terms[0].start)] if _plain(terms)
                    else [[[int(t) for t in m.tokens], int(m.start), [float(w) for w in m.weights]] for m in terms] for terms in measured],
        "trainer": trainer.name, "trainer_settings": trainer.settings, "seed": int(seed), "fraction": fraction,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _indices_sha(idx: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(idx, np.int64).tobytes()).hexdigest()[:16]


def _task_queries(measured: list) -> list:
    """Each query's measurement terms as plain lists (picklable, for tasks run elsewhere)."""
    return [[([int(t) for t in m.tokens], int(m.start), [float(w) for w in m.weights]) for m in terms] for terms in measured]


def _from_task(queries: list) -> list:
    from .base import MeasurementTerm

    return [[MeasurementTerm(np.asarray(t, np.int64), int(st), np.asarray(w, np.float64)) for t, st, w in terms] for terms in queries]


_TASK_PROJECTS: dict[str, Project] = {}  # per process: the driver's own project, or one opened by a worker


def retrain_task(task: dict, monitor: Monitor) -> list[float]:
    """One retraining, as an executor's task (``Executor.run_tasks``): train ``task["trainer"]`` (a
    spec) on the corpus sequences ``task["indices"]`` of the project in ``task["root"]`` (opened
    read-only once per process; the driver's own project in the driver) with ``task["seed"]``, and
    return each query's measurement (``task["queries"]``: its terms) under the retrained model."""
    from .modeling import is_adapter_dir, load_model
    from .runs import make_trainer

    root = task["root"]
    project = _TASK_PROJECTS.get(root)
    if project is None:
        project = _TASK_PROJECTS[root] = Project.open(root, readonly=True)
    trainer = make_trainer(task["trainer"])
    measured_queries = _from_task(task["queries"])
    with tempfile.TemporaryDirectory(prefix="inflq-lds-") as wd:
        out = trainer.train(TrainContext(project, np.asarray(task["indices"], np.int64), int(task["seed"]), monitor, Path(wd)))
        if isinstance(out, (str, Path)):  # a saved model, or an adapter for the project's base model
            import torch

            adapter = Path(out) if is_adapter_dir(Path(out)) else None
            out = load_model(project.model_path if adapter else Path(out), project.runtime.device, torch.float32, adapter)
        out.eval()
        measured = measured_values(out, measured_queries)
        del out
    return measured.tolist()


def retrain_subsets(
    project: Project, trainer: Trainer, qtoks: list, study: str, subsets: list[np.ndarray], seed: int, monitor: Monitor, executor=None,
    keys: list[int] | None = None, investigation_id: int | None = None,
) -> tuple[np.ndarray, list[int]]:
    """The measurements ``[subsets, queries]``, retraining the subsets not yet committed to
    ``study`` on ``executor`` (``Executor.run_tasks``; default: the registry's default executor,
    in this process), each committed by this process as soon as it is measured. ``keys``: the
    number each subset is committed under (default: its position); ``investigation_id``: the
    investigation they are retrained for (removed with it). Returns them and the positions of the
    subsets trained now."""
    done = catalog.lds_subsets(project.db, study)
    keys = list(range(len(subsets))) if keys is None else [int(k) for k in keys]
    measured = np.zeros((len(subsets), len(qtoks)))
    todo = []
    for j, idx in enumerate(subsets):
        row = done.get(keys[j])
        if row is not None and row["indices_sha"] == _indices_sha(idx) and len(row["measurements"]) == len(qtoks):
            measured[j] = row["measurements"]
        else:
            todo.append(j)
    monitor.start("LDS retraining", len(subsets))
    monitor.advance(len(subsets) - len(todo), f"{plural(len(subsets) - len(todo), 'subset')} already trained")
    root = str(project.root.resolve())
    queries = _task_queries(qtoks)
    tasks = [{"root": root, "trainer": trainer.spec(), "indices": subsets[j], "seed": int(seed), "queries": queries} for j in todo]
    started = time.perf_counter()
    last = [started]

    def on_result(i: int, got: list[float]) -> None:
        j = todo[i]
        measured[j] = got
        if not np.isfinite(measured[j]).all():
            raise InflqError(f"the model retrained on subset {j} gives non-finite log-probabilities; check the trainer's settings")
        now = time.perf_counter()  # in parallel: the time since the previous subset arrived
        catalog.insert_lds_subset(project.db, study, keys[j], len(subsets[j]), _indices_sha(subsets[j]), measured[j].tolist(), now - last[0],
                                  investigation_id)
        last[0] = now
        monitor.advance(1, f"subset {j + 1} of {len(subsets)} trained")

    if executor is None:
        from .runs import default_executor

        executor = default_executor()
    seeded = root not in _TASK_PROJECTS
    if seeded:
        _TASK_PROJECTS[root] = project  # a task run in this process uses the driver's project
    try:
        executor.run_tasks(retrain_task, tasks, on_result, monitor)
    finally:
        if seeded:
            _TASK_PROJECTS.pop(root, None)
    return measured, todo


# -- the estimators' scores --------------------------------------------------------------------------
def estimator_scores(project: Project, spec: str, qrows: list[dict], engine, modules: str | None, seed: int, batch_size: int, monitor: Monitor, executor):
    """Scores ``[sequences, queries]`` of every corpus sequence under estimator ``spec`` (factors
    fitted on the whole corpus or reused, through :func:`inflq.runs.prepare_estimator`; TracIn sums
    its checkpoints), with the seconds spent preparing and scoring, and its damping."""
    from .base import Shard
    from .passes import ScorePass
    from .runs import LocalWorker, RunSettings, make_estimator, prepare_estimator, scorers_for

    est = make_estimator(spec)
    settings = RunSettings(estimator=spec, modules=modules, fit_sequences=None, seed=seed, batch_size=batch_size)
    t = time.perf_counter()
    prepare_estimator(project, settings, monitor, estimator=est, engine=engine, executor=executor)
    fit_s = time.perf_counter() - t
    t = time.perf_counter()
    everything = Shard(0, np.arange(len(project.runtime.corpus), dtype=np.int64))
    total = None
    for scorer in scorers_for(project, est, engine, qrows, settings, None):
        monitor.start(f"LDS scores: {spec}", len(everything))
        got = LocalWorker(project, scorer.engine).run(ScorePass(scorer.queries), everything, batch_size, monitor)["scores"].double().numpy()
        total = got if total is None else total + got
    assert total is not None
    if not np.isfinite(total).all():
        raise InflqError(f"{spec} produced non-finite scores; increase its damping")
    return total, fit_s, time.perf_counter() - t, est.settings.get("damping")


def _retrain(project: Project, investigation: str, trainer: Trainer, qtoks, study: str, subs, seed: int, monitor: Monitor, executor: str | None, keys=None):
    from .runs import default_executor, make_executor

    ex = make_executor(executor) if executor else default_executor()
    try:
        inv = catalog.investigation(project.db, investigation)["id"]
        return retrain_subsets(project, trainer, qtoks, study, subs, seed, monitor, ex, keys, investigation_id=inv)
    finally:
        ex.close()


def _queries_and_specs(project: Project, investigation: str, estimators, dampings, queries) -> tuple[list[dict], list[str], str | None]:
    from .runs import make_estimator

    project.require_model()
    qrows = catalog.queries(project.db, investigation)
    if queries is not None:
        qrows = qrows[: max(1, queries)]
    if not qrows:
        raise InflqError(f"investigation {investigation!r} has no queries; add one with `inflq query add`")
    specs, swept = compared_specs(estimators, dampings)
    for spec in specs:
        make_estimator(spec)  # a bad spec fails now, not after hours of retraining
    return qrows, specs, swept


def _compare(project: Project, qrows, specs, predict, measured, modules, seed, batch_size, monitor) -> tuple[list[LDSRow], dict[str, np.ndarray], list[str]]:
    """Each spec's scores over the corpus, turned into predictions by ``predict`` and correlated
    per query (Spearman, and Pearson) with ``measured``."""
    from .runs import default_executor

    engine = project.runtime.engine(modules)
    executor = default_executor()
    rows: list[LDSRow] = []
    preds: dict[str, np.ndarray] = {}
    try:
        for spec in specs:
            scores, fit_s, score_s, damping = estimator_scores(project, spec, qrows, engine, modules, seed, batch_size, monitor, executor)
            p = predict(scores)
            per_q = lds_per_query(p, measured)
            mean, ci = mean_and_ci(per_q)
            pear = [float(pearsonr(p[:, q], measured[:, q])[0]) if np.std(p[:, q]) > 0 and np.std(measured[:, q]) > 0 else float("nan") for q in range(len(qrows))]
            rows.append(LDSRow(spec, mean, ci, float(np.nanmean(pear)) if np.isfinite(pear).any() else float("nan"), fit_s, score_s, damping, per_q.tolist()))
            preds[spec] = p
    finally:
        executor.close()
    return rows, preds, engine.names


def _save(project: Project, investigation: str, method: str, rows: list[LDSRow], used: dict, num_queries: int, num: int) -> int:
    inv = catalog.investigation(project.db, investigation)
    return catalog.insert_validation(project.db, [
        {
            "investigation_id": inv["id"], "method": method, "estimator": r.estimator, "damping": r.damping,
            "lds": r.lds, "lds_ci": r.ci, "pearson": r.pearson, "spearman": r.lds, "fit_seconds": r.fit_seconds,
            "ihvp_seconds": r.score_seconds, "num_queries": num_queries, "num_sequences": num,
            "settings": json.dumps({**used, "per_query": r.per_query}, default=float),
        }
        for r in rows
    ])


def validate_lds(
    project: Project,
    investigation: str,
    estimators: list[str] | None = _DEFAULT.estimators,
    subsets: int = _DEFAULT.subsets,
    fraction: float = _DEFAULT.fraction,
    trainer: str | None = _DEFAULT.trainer,
    dampings: list[float] | None = _DEFAULT.dampings,
    queries: int | None = _DEFAULT.queries,
    seed: int = _DEFAULT.seed,
    batch_size: int = _DEFAULT.batch_size,
    modules: str | None = None,
    monitor: Monitor | None = None,
    save: bool = True,
    executor: str | None = _DEFAULT.executor,
) -> LDSValidation:
    """LDS of each estimator spec (default: the registry's comparison set) and of the default
    estimator at each of ``dampings`` (``ekfac:damping=λ`` among the built-ins; recommending
    the λ with the best LDS) over ``subsets`` subsets of ``fraction`` of the corpus, retrained with
    ``trainer`` (a spec; default: the registry's default trainer). ``queries``: the first that many
    of the investigation's queries (default: all). ``seed`` seeds the subsets, every retraining and
    the estimators' fitting. ``executor``: the executor spec the retrainings run on
    (``Executor.run_tasks``, e.g. ``ray:num_workers=4``; default: the registry's default, in this
    process); each is committed here as it arrives, so a rerun resumes either way."""
    from .runs import make_trainer

    monitor = monitor or Monitor()
    if subsets < 3:
        raise InflqError("--subsets must be at least 3 (a Spearman correlation over subsets)")
    qrows, specs, swept = _queries_and_specs(project, investigation, estimators, dampings, queries)
    tr = make_trainer(trainer)
    assert isinstance(tr, Trainer)
    n = len(project.runtime.corpus)
    subs = [subset_indices(n, fraction, seed, j) for j in range(subsets)]
    qtoks = [measure(project.runtime, q) for q in qrows]
    study = study_key(project, qtoks, tr, seed, float(fraction))

    t0 = time.perf_counter()
    measured, trained = _retrain(project, investigation, tr, qtoks, study, subs, seed, monitor, executor)
    retrain_s = time.perf_counter() - t0
    rows, preds, names = _compare(project, qrows, specs, lambda scores: subset_predictions(scores, subs), measured, modules, seed, batch_size, monitor)
    recommended = best_damping(rows, swept, lambda r: r.lds)
    used = {
        "method": "lds", "queries": [q["id"] for q in qrows], "subsets": subsets, "fraction": fraction, "subset_size": len(subs[0]),
        "num_corpus": n, "trainer": tr.spec(), "seed": seed, "study": study, "retrain_seconds": retrain_s, "retrained_now": len(trained),
        "modules": names, "recommended_damping": recommended, "damping_sweep": swept,
    }
    vid = _save(project, investigation, "lds", rows, used, len(qrows), subsets) if save else None
    return LDSValidation(vid, rows, measured, preds, used, recommended, trained)


def _sequence_index(project: Project, seq_id: str) -> int:
    row = catalog.sequence_by_id(project.db, str(seq_id).strip())
    if row is None:
        raise InflqError(f"no training sequence {seq_id!r}; ids look like <document id>:<chunk>")
    return int(row["idx"])


def loo_sequences(n: int, count: int, seed: int) -> np.ndarray:
    """The first ``count`` of a permutation of the corpus seeded by ``seed`` (a larger count extends
    a smaller one's choice)."""
    if not 3 <= count < n:
        raise InflqError(f"--loo {count} must be at least 3 and below the {n} sequences of the corpus")
    return np.random.default_rng([int(seed), 0x100]).permutation(n)[:count].astype(np.int64)


def validate_loo(
    project: Project,
    investigation: str,
    estimators: list[str] | None = _DEFAULT.estimators,
    count: int | None = _DEFAULT.count,
    trainer: str | None = _DEFAULT.trainer,
    dampings: list[float] | None = _DEFAULT.dampings,
    queries: int | None = _DEFAULT.queries,
    seed: int = _DEFAULT.seed,
    batch_size: int = _DEFAULT.batch_size,
    modules: str | None = None,
    monitor: Monitor | None = None,
    save: bool = True,
    executor: str | None = _DEFAULT.executor,
    sequences: list[str] | None = _DEFAULT.sequences,
) -> LDSValidation:
    """Leave-one-out: retrain on the whole corpus and on the corpus without each of ``count``
    seeded sequences (or of the ``sequences`` named by id, ``document id:chunk``); the measured effect of sequence i on a query is ``m(all) − m(all ∖ i)``
    (positive: including i raised the completion's log-probability, inflq's sign), correlated
    (Spearman per query, over the ``count`` sequences, averaged) with each estimator's score of i.
    Retrained models are committed as LDS subsets are (subset 0: all; 1 + i: without corpus
    sequence i, so that any choice reuses them), on ``executor`` as in :func:`validate_lds`."""
    from .runs import make_trainer

    monitor = monitor or Monitor()
    if count is None and not sequences:
        raise InflqError("leave-one-out needs a count of seeded sequences (--loo N) or the sequences to leave out (--leave-out ID,ID,ID)")
    qrows, specs, swept = _queries_and_specs(project, investigation, estimators, dampings, queries)
    tr = make_trainer(trainer)
    assert isinstance(tr, Trainer)
    n = len(project.runtime.corpus)
    if sequences:
        left = np.array([_sequence_index(project, s) for s in sequences], np.int64)
        if len(set(left.tolist())) != len(left) or len(left) < 3:
            raise InflqError(f"--leave-out needs at least 3 different sequences, got {len(set(left.tolist()))}")
        count = len(left)
    else:
        left = loo_sequences(n, count, seed)
    everything = np.arange(n, dtype=np.int64)
    subs = [everything] + [np.delete(everything, i) for i in left]
    qtoks = [measure(project.runtime, q) for q in qrows]
    study = study_key(project, qtoks, tr, seed, "loo:1+index")  # subsets keyed by the left-out index

    t0 = time.perf_counter()
    measured, trained = _retrain(project, investigation, tr, qtoks, study, subs, seed, monitor, executor, keys=[0] + [1 + int(i) for i in left])
    retrain_s = time.perf_counter() - t0
    effect = measured[0][None, :] - measured[1:]
    rows, preds, names = _compare(project, qrows, specs, lambda scores: scores[left], effect, modules, seed, batch_size, monitor)
    recommended = best_damping(rows, swept, lambda r: r.lds)
    used = {
        "method": "loo", "queries": [q["id"] for q in qrows], "subsets": count, "left_out": [int(i) for i in left], "subset_size": n - 1,
        "num_corpus": n, "trainer": tr.spec(), "seed": seed, "study": study, "retrain_seconds": retrain_s, "retrained_now": len(trained),
        "modules": names, "recommended_damping": recommended, "damping_sweep": swept,
    }
    vid = _save(project, investigation, "loo", rows, used, len(qrows), count) if save else None
    return LDSValidation(vid, rows, effect, preds, used, recommended, trained)
