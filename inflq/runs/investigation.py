"""The two runs: scoring an investigation's queries against the candidates (``inflq run``) and
fitting factors alone (``inflq factors fit``), each resumable from its committed shards."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .. import catalog
from ..errors import InflqError
from ..plugins import get_registry
from ..progress import Monitor
from ..project import Project
from ..settings import RunSettings
from .recipe import make_estimator, make_executor, make_filter, prepare_estimator
from .recording import (
    record_batching,
    record_progress,
    recording_outcome,
    result_record,
    start_run,
    store_result_set,
)
from .scoring import (
    check_full_rank_memory,
    choose_candidates,
    estimator_scores,
    filter_context,
    forget_candidate_passes,
    honour_full_rank,
    query_compression,
    save_queries,
    score_shards,
    scorers_for,
    scoring_context,
)


@dataclass
class RunResult:
    run_id: int
    result_set_id: int
    seconds: float
    phases: dict[str, float] = field(default_factory=dict)


def _resumable(project: Project, run_id: int, kind: str) -> dict:
    """The recorded run that ``--resume run_id`` continues, or an error saying why not."""
    row = catalog.get_run(project.db, run_id)
    if kind == "factors":
        if row is None or row["kind"] != "factors":
            raise InflqError(f"run {run_id} is not a factor fit; see `inflq runs`")
    else:
        if row is None:
            raise InflqError(f"no run {run_id} to resume; see `inflq runs`")
        if row["kind"] == "factors":
            raise InflqError(f"run {run_id} is a factor fit: continue it with `inflq factors fit --resume {run_id}`")
    if row["status"] == "done":
        raise InflqError(f"run {run_id} is already complete")
    return row


def run_investigation(
    project: Project,
    investigation: str,
    settings: RunSettings | None = None,
    monitor: Monitor | None = None,
    resume: int | None = None,
    executor: str | None = None,
) -> RunResult:
    """Score the investigation's queries against the candidates. ``resume``: a run id to continue.
    ``executor``: an executor spec that overrides the settings' (e.g. to resume a run elsewhere)."""
    monitor = monitor or Monitor()
    if resume is not None:
        row = _resumable(project, resume, "scores")
        settings = RunSettings.from_json(row["settings"])
        investigation = catalog.investigation(project.db, row["investigation_id"])["name"]
        run_id = resume
    else:
        settings = settings or RunSettings()
        run_id = None
    if executor is not None:  # where shards run never changes their result
        settings.executor = executor
    settings.resolve_defaults(get_registry())
    project.require_model()
    queries = catalog.queries(project.db, investigation)
    if not queries:
        raise InflqError(f"investigation {investigation!r} has no queries; add one with `inflq query add`")
    estimator = make_estimator(settings.estimator)
    filt = make_filter(settings.filter)
    executor = make_executor(settings.executor)
    honour_full_rank(estimator, settings, monitor)  # before the settings are recorded
    if run_id is None:
        run_id = start_run(project, investigation, settings)
    else:
        catalog.restart_run(project.db, run_id, executor=settings.executor, settings=settings.to_json())
    monitor.on_progress = record_progress(project, run_id, monitor, monitor.on_progress)
    phases: dict[str, float] = {}
    with recording_outcome(project, run_id, executor) as started:
        engine = project.runtime.engine(settings.modules)
        check_full_rank_memory(project, estimator, engine, len(queries), int(settings.full_rank_mb) << 20)  # before any fitting
        record_batching(project, run_id, settings, engine, monitor)
        t = time.perf_counter()
        prepared = prepare_estimator(project, settings, monitor, estimator=estimator, engine=engine, executor=executor, run_id=run_id)
        phases["factors"] = time.perf_counter() - t
        catalog.update_run(project.db, run_id, factor_set_id=prepared.factor_set_id)
        # Candidates are fixed at the first attempt and reused on resume.
        t = time.perf_counter()
        ctx = lambda: filter_context(project, queries, settings.seed, monitor, make_filter, settings.modules)  # noqa: E731
        cand, mask = choose_candidates(project, run_id, filt, ctx, len(queries))
        phases["candidates"] = time.perf_counter() - t
        if len(cand) == 0:
            raise InflqError("the filter chose no candidate sequences; loosen it (e.g. --filter all)")
        # Preconditioned query gradients, low rank, saved for on-demand attribution.
        t = time.perf_counter()
        monitor.start("query gradients", len(queries))
        compression = query_compression(settings, project.runtime.corpus.lengths()[cand], estimator)
        scorers = scorers_for(project, estimator, engine, queries, settings, compression)
        monitor.advance(len(queries))
        saved_queries = save_queries(project, run_id, scorers, settings.rank)
        phases["query gradients"] = time.perf_counter() - t
        # Scores from the estimator itself (a stored index, or passes of its own over the candidates,
        # committed shard by shard), else by the scoring passes, in shards, committing each one.
        t = time.perf_counter()
        own = scoring_context(project, estimator, engine, queries, cand, settings, monitor, executor=executor, run_id=run_id,
                              preconditioned=scorers[-1].queries)
        scored = estimator_scores(project, estimator, own, mask)
        own_scores = scored is not None
        if scored is None:
            scored = score_shards(project, run_id, scorers, cand, mask, settings, executor, monitor)
        phases["scoring"] = time.perf_counter() - t
        t = time.perf_counter()
        record = result_record(project, run_id, investigation, queries, settings, estimator, filt, scorers, cand, scored.scores, saved_queries, monitor,
                               kept=scored.kept, own_scores=own_scores)
        rs_id = store_result_set(project, record)
        phases["top results"] = time.perf_counter() - t
        seconds = time.perf_counter() - started
        catalog.finish_run(project.db, run_id, "done", seconds=seconds)
        forget_candidate_passes(project, run_id)
    keep_copy(project, run_id, monitor)
    return RunResult(run_id, rs_id, seconds, phases)


def keep_copy(project: Project, run_id: int, monitor: Monitor) -> None:
    """A copy of the catalog after each completed run (``backups/``, the newest few kept), so that a
    damaged catalog loses at most what came after it (``inflq check --repair``). A copy that cannot
    be written is a warning, never a failed run."""
    from ..backups import backup_catalog

    try:
        backup_catalog(project, f"run-{run_id}")
    except Exception as exc:  # the run is committed; the copy is a safety net
        monitor.warn(f"could not copy the catalog to {project.root / 'backups'} ({exc}); the run itself is saved")


def fit_factors(
    project: Project,
    settings: RunSettings,
    monitor: Monitor | None = None,
    investigation: str = "default",
    resume: int | None = None,
) -> tuple[int, int | None, float]:
    """Fit (or find) the estimator's factors without scoring, as a run of kind ``factors`` so that
    fitting shards are committed and ``resume`` (that run's id) continues an interrupted fit.
    Returns ``(run id, factor set id, seconds)``; the factor set is ``None`` for estimators that
    fit nothing."""
    monitor = monitor or Monitor()
    if resume is not None:
        settings = RunSettings.from_json(_resumable(project, resume, "factors")["settings"])
        run_id = resume
        catalog.restart_run(project.db, run_id)
    else:
        run_id = None
    settings.resolve_defaults(get_registry())
    project.require_model()
    estimator = make_estimator(settings.estimator)
    executor = make_executor(settings.executor)
    if run_id is None:
        run_id = start_run(project, investigation, settings, kind="factors")
    monitor.on_progress = record_progress(project, run_id, monitor, monitor.on_progress)
    with recording_outcome(project, run_id, executor) as started:
        engine = project.runtime.engine(settings.modules)
        record_batching(project, run_id, settings, engine, monitor)
        fs_id = prepare_estimator(project, settings, monitor, estimator=estimator, engine=engine, executor=executor, run_id=run_id).factor_set_id
        seconds = time.perf_counter() - started
        catalog.finish_run(project.db, run_id, "done", seconds=seconds, factor_set_id=fs_id)
    keep_copy(project, run_id, monitor)
    return run_id, fs_id, seconds
