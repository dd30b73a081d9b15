"""Recording runs in the catalog: a run's start, progress, batching and outcome, the result set it
writes when it finishes, and what an interrupted run has committed."""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .. import catalog, layout
from ..artifacts import save_tensors
from ..base import Estimator, Executor
from ..display import plural
from ..engine import GradientEngine
from ..errors import Cancelled
from ..plugins import get_registry
from ..progress import Monitor
from ..project import Project, project_relative
from ..settings import RunSettings
from .scoring import CANDIDATE_PASSES, Scorer, extreme_module_scores, pick_extremes


def start_run(project: Project, investigation: str, settings: RunSettings, kind: str = "scores") -> int:
    inv = catalog.investigation(project.db, investigation)
    settings.resolve_defaults(get_registry())
    run_id = catalog.insert_run(project.db, {
        "investigation_id": inv["id"], "kind": kind, "estimator": settings.estimator, "filter": settings.filter,
        "executor": settings.executor, "settings": settings.to_json(), "model_fingerprint": project.model_fingerprint,
        "corpus_fingerprint": project.corpus_identity.recorded,
    })
    # Ids are never given twice now, but a run removed by an older inflq may have left its folder
    # under this id: a new run must not read its candidates.
    shutil.rmtree(project.root / layout.run_folder(run_id), ignore_errors=True)
    return run_id


@contextlib.contextmanager
def recording_outcome(project: Project, run_id: int, executor: Executor) -> Iterator[float]:
    """Record a cancelled or failed run in the catalog (the error re-raised), and close the executor.
    Yields the start time."""
    started = time.perf_counter()
    try:
        yield started
    except Cancelled:
        catalog.finish_run(project.db, run_id, "cancelled", seconds=time.perf_counter() - started)
        raise
    except BaseException as exc:
        catalog.finish_run(project.db, run_id, "failed", error=str(exc) or type(exc).__name__)
        raise
    finally:
        executor.close()


def record_batching(project: Project, run_id: int, settings: RunSettings, engine: GradientEngine, monitor: Monitor) -> None:
    """Choose the batching a run left open and record it with the run, so that a resumed run and
    the catalog say how its batches were made."""
    if settings.resolve_batching(engine, project):
        catalog.update_run(project.db, run_id, settings=settings.to_json())
    monitor.note(f"batches: {settings.batching().describe()}")


def record_progress(project: Project, run_id: int, monitor: Monitor, inner):
    """A progress callback that also records the run's phase and progress (at most twice a second)."""
    last = [0.0]

    def on_progress(ev):
        if inner is not None:
            inner(ev)
        now = time.perf_counter()
        if now - last[0] > 0.5 or ev.done >= ev.total:
            last[0] = now
            with contextlib.suppress(Exception):  # progress is advisory; a busy catalog must not fail the run
                catalog.update_run(project.db, run_id, phase=ev.phase, done=ev.done, total=ev.total)

    return on_progress


@dataclass
class ResultRecord:
    """A finished run's result set as the catalog stores it: the set's columns and its stored top
    and bottom sequences per query (built by :func:`result_record`, stored by :func:`store_result_set`)."""

    fields: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)


def result_record(
    project: Project, run_id: int, investigation: str, queries: list[dict], settings: RunSettings, estimator: Estimator,
    filt, scorers: list[Scorer], cand: np.ndarray, scores: np.ndarray, saved_queries: tuple[str, str], monitor: Monitor, kept=None,
    own_scores: bool = False,
) -> ResultRecord:
    """Save the full score matrix; the record holds the top and bottom K per query with their
    per-module and per-layer scores and texts (see :func:`extreme_module_scores` for ``kept``).
    ``own_scores``: the estimator scored the candidates itself (``Estimator.score_candidates``, e.g.
    from a stored gradient index), so the query rank applies to attributions only."""
    picks = pick_extremes(scores, settings.top_k)
    found = extreme_module_scores(project, scorers, cand, {(p[0], p[3]) for p in picks}, len(queries), settings, monitor, kept)
    engine, qg = scorers[-1].engine, scorers[-1].queries
    seq_idx = cand[sorted({p[3] for p in picks})]
    names = qg.names
    layers = {n: t.layer for n, t in zip(engine.names, engine.tracked, strict=False)}
    seqs = catalog.sequence_rows(project.db, list(map(int, seq_idx)))
    store = project.runtime.corpus
    rs_rel = layout.score_matrix(run_id)
    # The score matrix names its run and queries, so that if the catalog is lost, `inflq check
    # --repair` can say exactly which run, result set and queries a restored copy lacks.
    about = {"run_id": run_id, "investigation": investigation, "estimator": settings.estimator, "filter": settings.filter,
             "queries": [{"id": q["id"], "prompt": q["prompt"], "completion": q["completion"]} for q in queries]}
    rs_sum = save_tensors(project.root, rs_rel, {"indices": torch.from_numpy(cand), "scores": torch.from_numpy(scores)},
                          {"inflq_result": json.dumps(about)})
    inv = catalog.investigation(project.db, investigation)
    q_rel, q_sum = saved_queries
    checkpoints = [s.checkpoint for s in scorers] if scorers[-1].checkpoint else None
    record = ResultRecord({
        "run_id": run_id, "investigation_id": inv["id"], "name": f"run {run_id}: {settings.estimator} / {settings.filter}",
        "estimator": settings.estimator, "filter": filt.spec() if hasattr(filt, "spec") else settings.filter,
        "settings": json.dumps({**json.loads(settings.to_json()), "estimator_settings": estimator.describe(), "modules": names, "full_rank_modules": sorted(qg.full), "query_ids": [q["id"] for q in queries],
                                **({"scores_from": "estimator"} if own_scores else {}),
                                # Checkpoint estimators (TracIn): the models whose query gradients the queries artifact holds, in order.
                                **({"checkpoints": [project_relative(c, project.root) for c in checkpoints]} if checkpoints else {})}, default=float),
        "num_candidates": int(len(cand)), "scores_path": rs_rel, "scores_checksum": rs_sum,
        "queries_path": q_rel, "queries_checksum": q_sum,
    })
    text_cache: dict[int, str] = {}
    for qi, side, rank, col in picks:
        idx = int(cand[col])
        ms = found[(qi, col)]
        by_layer: dict[str, float] = {}
        for n, v in zip(names, ms, strict=False):
            key = str(layers[n]) if layers[n] is not None else n
            by_layer[key] = by_layer.get(key, 0.0) + float(v)
        if idx not in text_cache:
            text_cache[idx] = project.runtime.decode(store.get(idx))
        record.rows.append({
            "query_id": queries[qi]["id"], "side": side, "rank": rank, "seq_idx": idx,
            "seq_id": seqs[idx]["seq_id"], "score": float(scores[qi, col]),
            "module_scores": json.dumps(dict(zip(names, map(float, ms), strict=False))), "layer_scores": json.dumps(by_layer),
            "text": text_cache[idx],
        })
    return record


def store_result_set(project: Project, record: ResultRecord) -> int:
    """Record a result set and its stored sequences. Returns its id."""
    return catalog.insert_result_set(project.db, record.fields, record.rows)


def interrupted_run(project: Project, investigation: str, kind: str = "scores") -> dict | None:
    """The investigation's most recent run of ``kind`` that did not finish (cancelled, failed, or
    left ``running`` by a killed process): what a bare ``--resume`` continues."""
    return catalog.interrupted_run(project.db, catalog.investigation(project.db, investigation)["id"], kind)


def committed_work(project: Project, run_id: int) -> str:
    """What a cancelled or failed run has committed, so what a resume keeps and what it redoes.
    Work is committed a whole shard at a time (``shard_size`` sequences, fitting and scoring
    alike); the shard in flight when a run stops is computed again."""
    row = catalog.get_run(project.db, run_id)
    shard_size = RunSettings.from_json(row["settings"]).shard_size
    parts = []
    totals = catalog.fit_shard_totals(project.db, run_id)
    if row["factor_set_id"] is not None:
        parts.append(f"its factors (factor set {row['factor_set_id']})")
    else:
        for key, n_shards, n_seqs in totals:
            if not key.startswith(CANDIDATE_PASSES):
                parts.append(f"{plural(n_seqs, 'sequence', sep=False)} of the {key.split(':', 1)[1]} pass in {plural(n_shards, 'shard')}")
    for key, n_shards, n_seqs in totals:
        if key.startswith(CANDIDATE_PASSES):  # the estimator's own pass over the candidates
            parts.append(f"{plural(n_seqs, 'candidate', sep=False)} of the estimator's {key.split(':', 2)[2]} pass in {plural(n_shards, 'shard')}")
    n_shards, n_seqs = catalog.score_shard_totals(project.db, run_id)
    if n_shards:
        parts.append(f"{n_seqs} scored {'sequence' if n_seqs == 1 else 'sequences'} in {plural(n_shards, 'shard')}")
    unit = f"work is committed one shard ({plural(shard_size, 'sequence', sep=False)}) at a time, and the shard in flight is computed again"
    if not parts:
        return f"nothing committed yet, so a resume starts from the beginning ({unit})"
    return "committed: " + ", ".join(parts) + f"; {unit}"
