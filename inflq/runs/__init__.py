"""Runs: fit (or reuse) an estimator's factors, compute the queries' preconditioned gradients,
choose candidates, and score them shard by shard. Each finished shard is committed at once, so a
crash or Ctrl-C loses at most the shard in flight and ``resume`` continues from there.

- ``recipe``: make the estimator, executor and filter a spec names; :func:`prepare_estimator`.
- ``fitting``: fitting (or loading) factors, pass by pass, shard by shard.
- ``committed``: passes whose shards a run commits as they arrive (a fit's, an estimator's own).
- ``scoring``: query gradients, preconditioning, candidates, score shards, extremes.
- ``recording``: a run's record in the catalog, its result set, what an interrupted run kept.
- ``investigation``: :func:`run_investigation` and :func:`fit_factors`.
- ``workers``: the in-process worker and the spec a remote worker rebuilds it from.
"""

from ..settings import RunSettings
from .fitting import (
    cached_factor_set,
    ensure_factors,
    fit_indices,
    fit_memory_bytes,
)
from .investigation import RunResult, fit_factors, run_investigation
from .recipe import (
    Prepared,
    default_executor,
    make_estimator,
    make_executor,
    make_filter,
    make_trainer,
    prepare_estimator,
)
from .recording import (
    ResultRecord,
    committed_work,
    interrupted_run,
    result_record,
    start_run,
    store_result_set,
)
from .scoring import (
    Scorer,
    extremes,
    filter_context,
    preconditioned_queries,
    preconditioned_query_gradients,
    query_compression,
    query_gradients,
    save_queries,
    scorer_tensors,
    scorers_for,
    scoring_context,
    shard_extremes,
    split_checkpoint_tensors,
)
from .workers import LocalWorker, build_worker, checkpoint_engine, worker_spec

__all__ = [
    "LocalWorker", "Prepared", "ResultRecord", "RunResult", "RunSettings", "Scorer", "build_worker", "cached_factor_set", "checkpoint_engine",
    "committed_work", "default_executor", "ensure_factors", "extremes", "filter_context", "fit_factors", "fit_indices", "fit_memory_bytes", "interrupted_run",
    "make_estimator", "make_executor", "make_filter", "make_trainer", "preconditioned_queries", "preconditioned_query_gradients", "prepare_estimator", "query_compression",
    "query_gradients", "result_record", "run_investigation", "save_queries", "scorer_tensors", "scorers_for", "scoring_context", "shard_extremes",
    "split_checkpoint_tensors", "start_run", "store_result_set", "worker_spec",
]
