"""Plugin base classes: Estimator, Filter, Attribution, Executor, Trainer, Measurement, and the contexts they receive.

A plugin is a subclass with a ``name``, a one-line ``description`` and declared ``options``;
it is registered through a hook in :mod:`inflq.hookspecs`. See ``docs/plugins.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from .options import Option, resolve_options
from .progress import Monitor

if TYPE_CHECKING:  # torch (1-2 s to import) and numpy load where used: plugins import this module cheaply
    import numpy as np
    import torch

    from .contractions import Compression, QueryGradients
    from .engine import Batch, Captured, GradientEngine, SequenceGradients, TrackedModule
    from .queries import TokenizedQuery


# -- passes: the unit of work executors distribute (run by inflq.passes.run_shard) -------------------
@dataclass(frozen=True)
class Shard:
    """A numbered slice of the sequences a pass visits (indices into the corpus)."""

    index: int
    indices: np.ndarray

    def __len__(self) -> int:
        return int(len(self.indices))


class Pass:
    """One streamed pass. Subclasses set ``phase``, ``labels``, ``combine`` and implement ``process``."""

    phase: ClassVar[str] = "pass"
    labels: ClassVar[str] = "data"  # "data" or "sampled"
    combine: ClassVar[str] = "sum"  # "sum" or "concat"
    seed: int = 0
    # The tracked modules whose results this pass yields (``None``: all of them). A fit by module
    # (``FitContext.groups``) runs a pass once per group of modules, each time with that group
    # here; the engine still captures every tracked module, so the group's results are bitwise
    # those of a pass over all of them.
    modules: tuple[str, ...] | None = None
    # Whether ``process``/``accumulate`` read a batch's captures only while they run and keep
    # nothing that shares their memory (results are computed from them, not views of them): the
    # engine may then write every batch's captures into the same buffers (no fresh memory per
    # batch; ``GradientEngine.capture_parts(reuse=True)``). Off unless a pass says so.
    transient_captures: ClassVar[bool] = False

    def selected(self, captures: dict[str, Captured]) -> Iterator[tuple[str, Captured]]:
        """``captures``' items for :attr:`modules` (all of them when it is ``None``), in order."""
        if self.modules is None:
            return iter(captures.items())
        return ((name, captures[name]) for name in self.modules)

    def process(self, engine: GradientEngine, batch: Batch, captures: dict[str, Captured]) -> dict[str, torch.Tensor]:
        """Results for this batch, or (passes that group work across batches) ``{}`` and later
        results from :meth:`flush`; concatenated results must come out in batch order."""
        raise NotImplementedError

    def flush(self, discard: bool = False) -> dict[str, torch.Tensor]:
        """Results held back by :meth:`process` (called at the end of every shard); ``discard``
        drops them (called at the start of a shard, after a failure elsewhere)."""
        return {}

    def accumulate(self, engine: GradientEngine, batch: Batch, captures: dict[str, Captured], sums: dict[str, torch.Tensor]) -> None:
        """For ``combine = "sum"`` passes: add this batch's results into the running ``sums`` (CPU
        tensors, created by the first batch). The default adds :meth:`process`'s results; a pass
        whose results are large (a matrix per module) overrides it to add them one at a time with
        :func:`inflq.add_into`, so that memory never holds a second full set of sums."""
        from .linalg import add_into

        add_into(sums, self.process(engine, batch, captures))


class SumPass(Pass):
    """A ``sum`` pass whose batch results are float64 sums yielded one at a time by ``_parts(batch,
    captures)`` (``(key, tensor)`` pairs): added into the running sums one part at a time, so that
    memory holds the running sums and one part, not a second full set (a batch's float64 sums
    for every module of GPT-2 small would be another 2.6 GB). EK-FAC's, K-FAC's and the diagonal's
    fitting passes and the gradient index's are ones."""

    combine: ClassVar[str] = "sum"
    transient_captures: ClassVar[bool] = True  # each part is added into the sums before the next is made

    def _parts(self, batch: Batch, captures: dict[str, Captured]) -> Iterator[tuple[str, torch.Tensor]]:
        raise NotImplementedError

    def process(self, engine: GradientEngine, batch: Batch, captures: dict[str, Captured]) -> dict[str, torch.Tensor]:
        import torch

        return {k: v.to(torch.float64).cpu() for k, v in self._parts(batch, captures)}

    def accumulate(self, engine: GradientEngine, batch: Batch, captures: dict[str, Captured], sums: dict[str, torch.Tensor]) -> None:
        import torch

        from .linalg import add_into

        for k, v in self._parts(batch, captures):
            add_into(sums, {k: v}, torch.float64)


class Plugin:
    """Common to every plugin kind: a name, a description and typed options."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    options: ClassVar[tuple[Option, ...]] = ()
    # The kind's default, used where a run names none (``Registry.default``); built-ins set it.
    default: ClassVar[bool] = False

    def __init__(self, **options: Any) -> None:
        self.settings: dict[str, Any] = resolve_options(f"{self.kind} {self.name}", self.options, options)

    kind: ClassVar[str] = "plugin"

    def spec(self) -> str:
        """The spec string that recreates this plugin with its non-default settings."""
        given = {o.name: self.settings[o.name] for o in self.options if self.settings[o.name] != o.default}
        return self.name + (":" + ",".join(f"{k}={v}" for k, v in given.items()) if given else "")


# -- fitting -------------------------------------------------------------------------------------
@dataclass
class FitContext:
    """What an estimator's ``fit`` may use: the engine's tracked modules, the fitting data as
    passes run by the executor, a seed and a monitor."""

    engine: GradientEngine
    run_pass: Callable[[Pass], dict[str, torch.Tensor]]
    num_sequences: int
    seed: int
    monitor: Monitor
    indices: np.ndarray | None = None
    sequences: Callable[[np.ndarray], list[np.ndarray]] | None = None
    pad_id: int = 0
    project: Any = None
    # Bytes of sums one fitting pass may hold (per worker and on the driver), from the run's
    # ``--fit-memory`` or the executor's :meth:`Executor.fit_memory`; ``None``: no limit.
    memory: int | None = None
    # The executor's :meth:`Executor.run_tasks` (``tasks(fn, tasks, on_result, monitor)``) and
    # whether it runs tasks in other processes (:attr:`Executor.remote_tasks`); ``None``: in this
    # process, in order (a context built without an executor: tests, benchmarks, plans).
    tasks: Callable[[Callable[[Any, Monitor], Any], Iterable, Callable[[int, Any], None], Monitor], None] | None = None
    remote_tasks: bool = False

    @property
    def tracked(self) -> list[TrackedModule]:
        return self.engine.tracked

    @property
    def task_device(self) -> torch.device | None:
        """The device a task of :meth:`run_tasks` should compute on: the engine's where tasks run
        in this process; ``None`` where they run elsewhere (each on its own process's device)."""
        return None if self.remote_tasks else self.engine.device

    def run_tasks(self, fn: Callable[[Any, Monitor], Any], tasks: Iterable, on_result: Callable[[int, Any], None]) -> None:
        """Independent pieces of a fit (EK-FAC: one eigendecomposition each) on the executor's
        workers: ``fn(task, monitor)`` for each of ``tasks``, ``on_result(i, result)`` in this process
        as task ``i`` finishes (in any order where the executor runs them elsewhere; ``fn`` must
        then be a module-level function, the tasks and results picklable). ``tasks`` may be a
        generator: each task is taken only when it is sent, so a task's data can be dropped by the
        driver as it goes. Without an executor, and on the local one, the tasks run here, one
        after another, in order; cancelling :attr:`monitor` stops them between tasks."""
        if self.tasks is not None:
            self.tasks(fn, tasks, on_result, self.monitor)
            return
        for i, task in enumerate(tasks):
            self.monitor.check()
            on_result(i, fn(task, self.monitor))

    def groups(self, sums_bytes: Callable[[TrackedModule], int], what: str = "sums") -> list[tuple[str, ...] | None]:
        """The tracked modules in groups whose sums fit :attr:`memory`, for fitting by module: run a
        pass per group with ``pass_.modules = group``. ``sums_bytes(module)`` is what one module
        adds to a pass's sums. Groups are consecutive runs of the tracked modules, in order, each
        filled as far as the budget allows. Without a budget, or when everything fits, one group
        ``[None]``: a single pass over all modules, as without fitting by module."""
        from .errors import InflqError

        sizes = [(tm.name, int(sums_bytes(tm))) for tm in self.tracked]
        if self.memory is None or sum(b for _, b in sizes) <= self.memory:
            return [None]
        out: list[tuple[str, ...]] = []
        group: list[str] = []
        held = 0
        for name, b in sizes:
            if b > self.memory:
                raise InflqError(
                    f"module {name}'s {what} need {b / 2**30:.3g} GB, more than the fitting memory of "
                    f"{self.memory / 2**30:.3g} GB: raise --fit-memory (or the executor's memory), or untrack it (--modules)"
                )
            if group and held + b > self.memory:
                out.append(tuple(group))
                group, held = [], 0
            group.append(name)
            held += b
        out.append(tuple(group))
        return out

    def batches(self, batch_size: int, seed: int | None = None) -> Iterator[Batch]:
        """Endless shuffled mini-batches of the fitting data (for iterative estimators such as LiSSA)."""
        if self.indices is None or self.sequences is None:
            raise RuntimeError("this context carries no fitting data")
        import numpy as np

        from .engine import make_batch

        rng = np.random.default_rng(self.seed if seed is None else seed)
        while True:
            order = rng.permutation(self.indices)
            for s in range(0, len(order) - batch_size + 1 if len(order) >= batch_size else 1, batch_size):
                chunk = order[s : s + batch_size]
                seeds = [int(x) for x in rng.integers(0, 2**62, size=len(chunk))]
                yield make_batch(self.sequences(chunk), self.pad_id, self.engine.device, sample_seeds=seeds)


# -- estimators ------------------------------------------------------------------------------------
@dataclass
class ScoringContext:
    """What an estimator that scores the candidates itself (:meth:`Estimator.score_candidates`) may
    use: the run's queries and candidates, passes of its own over the candidates, and the queries'
    gradients.

    ``run_pass(pass_)`` runs ``pass_`` over the candidate sequences on the run's executor, shard by
    shard (the run's ``--shard-size``), and returns its results combined as ``pass_.combine`` says:
    for a ``"concat"`` pass, one row per candidate, in the order of ``candidates``. In a run, each
    shard is committed as it arrives, so that a run stopped during the pass continues from its last
    committed shard (``inflq run --resume``); the committed shards are dropped once the run is done,
    so keep what you need (``inflq.save_tensors``, a table of your own). Outside a run (the TUI's
    live query) the pass runs in this process and commits nothing.

    ``query_gradients()``: the queries' gradients ``∇ measurement loss`` as :meth:`Estimator.precondition`
    receives them (an :class:`inflq.SequenceGradients`, computed on first call). ``preconditioned``:
    the queries' preconditioned gradients the run saved (from :meth:`Estimator.precondition_queries`),
    with which its scoring passes would score; ``None`` outside a run."""

    project: Any
    queries: list[dict]  # catalog rows: id, prompt, completion, chat
    candidates: np.ndarray  # sorted int64 corpus indices
    monitor: Monitor
    engine: GradientEngine
    run_pass: Callable[[Pass], dict[str, torch.Tensor]] = field(repr=False)
    query_gradients: Callable[[], SequenceGradients] = field(repr=False)
    preconditioned: QueryGradients | None = field(default=None, repr=False)
    seed: int = 0


def describe_briefly(described: dict[str, Any], longest: int = 60) -> str:
    """``key value, ...`` of the short scalar entries of an estimator's :meth:`Estimator.describe`
    (numbers to 3 significant digits; nested values and long texts left to the stored settings)."""
    parts = []
    for key, value in described.items():
        if isinstance(value, bool) or (isinstance(value, str) and 0 < len(value) <= longest):
            parts.append(f"{key} {value}")
        elif isinstance(value, (int, float)):
            parts.append(f"{key} {value:.3g}" if isinstance(value, float) else f"{key} {value}")
    return ", ".join(parts)


class Estimator(Plugin):
    """An inverse-Hessian approximation (the *preconditioner*) and, optionally, fitted factors.

    Contract:
      * ``fit(ctx)`` computes the factors from fitting data and returns them as a flat dict of
        tensors (inflq caches them as a safetensors artifact addressed by ``factor_settings()``,
        the model and the fitting data). Estimators with ``fits_factors = False`` skip it.
      * ``load_factors(tensors)`` restores them.
      * ``precondition(grads)`` maps gradients ``{module: [n, out, in_dim]}`` to
        ``(G + λI)⁻¹ grads``. Scores are ``⟨precondition(∇ measurement loss), ∇ training loss⟩``,
        positive when the training sequence makes the completion more likely.
      * ``describe()`` returns what a result must record (e.g. the damping used), and
        ``summarize(described)`` says it in one line for result headers.
    """

    kind = "estimator"
    fits_factors: ClassVar[bool] = False
    # Scores a new query against the whole corpus without a pass over it (``score_candidates``
    # from stored data, e.g. the gradient index): the TUI's live query uses such an estimator.
    interactive: ClassVar[bool] = False
    # The preconditioned queries must never be compressed (a rank-r factorisation would change the
    # scores this estimator means, e.g. a projection's dense PᵀP q): runs hold every module at full
    # rank whatever ``--rank`` says, record rank ``None``, and refuse with a one-line error when the
    # queries exceed ``--full-rank-memory`` rather than compress them.
    full_rank_queries: ClassVar[bool] = False
    # Its place in the comparison set that ``inflq validate`` measures when no estimators are named
    # (``Registry.comparison``; the built-ins: identity 0, ekfac 1, lissa 2); None: not in it.
    compared: ClassVar[int | None] = None

    def factor_settings(self) -> dict[str, Any]:
        """Settings that determine the factors (part of the factors' cache key)."""
        return {}

    def fit(self, ctx: FitContext) -> dict[str, torch.Tensor]:
        return {}

    def load_factors(self, tensors: dict[str, torch.Tensor]) -> None:
        pass

    def prepare(self, ctx: FitContext) -> None:
        """Called before preconditioning on every run, after factors are fitted or loaded.
        Estimators that need the model and fitting data at precondition time (LiSSA) keep ``ctx``."""

    def precondition(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def precondition_queries(self, grads: dict[str, torch.Tensor], rank: int | None | Compression) -> QueryGradients:
        """The queries' preconditioned gradients, held as ``rank`` says: an ``int`` (rank-r factors),
        ``None`` (full rank) or an :class:`inflq.Compression` (runs pass one: a rank, and full rank
        where scoring is cheaper that way; full rank throughout for :attr:`full_rank_queries`).
        Default: :meth:`precondition`, then :meth:`QueryGradients.from_preconditioned` with
        ``rank``; estimators with a cheaper route override it and hand ``rank`` on the same way."""
        from .contractions import QueryGradients

        return QueryGradients.from_preconditioned(self.precondition(grads), rank)

    def describe(self) -> dict[str, Any]:
        """What a result set must record (stored in its settings as ``estimator_settings``): by
        default the options' values; add what the run found out (the damping used, convergence)."""
        return dict(self.settings)

    @classmethod
    def summarize(cls, described: dict[str, Any]) -> str:
        """One line for result headers (``inflq top``, the TUI's results) from what :meth:`describe`
        returned for a result set: by default its short scalar entries as ``key value``
        (:func:`describe_briefly`). Override to say it better (EK-FAC: the damping it used)."""
        return describe_briefly(described)

    def score_candidates(self, ctx: ScoringContext) -> np.ndarray | None:
        """Scores ``[len(ctx.queries), len(ctx.candidates)]`` (float32) of the run's queries against
        the sorted corpus ``ctx.candidates``, computed by the estimator itself (from stored data, or
        from a pass of its own over the candidates, ``ctx.run_pass``), or ``None`` (the default): the
        run scores them with its passes, from :meth:`precondition_queries`'s gradients. Called after
        :meth:`prepare`; the run still preconditions the queries (for attribution and the top rows'
        per-module scores), so scores returned here should be those gradients' scores up to the
        estimator's own storage precision. Ignored for estimators with :meth:`checkpoints`."""
        return None

    def score_sequences(self, project: Any, queries: list[dict], sequences: list[np.ndarray], monitor: Monitor) -> np.ndarray | None:
        """Scores ``[len(queries), len(sequences)]`` (float32) of ``queries`` against token
        sequences outside the corpus (e.g. hand-written probes, tokenized as training sequences),
        on the same scale as :meth:`score_candidates`'s, or ``None`` (the default: not offered).
        An interactive estimator offers it so that the live query scores probes beside its top
        rows; it may cache what it computes per sequence. Called after :meth:`prepare`."""
        return None

    def checkpoints(self, project: Any) -> list[tuple[Path, float]] | None:
        """Models to score with, each with its weight, for estimators that sum over training
        checkpoints (TracIn): scores are ``Σ_c weight_c × score(model_c)``. ``None`` (the default):
        the project's own model, once."""
        return None


# -- filters ---------------------------------------------------------------------------------------
@dataclass
class FilterContext:
    """What a filter may use to choose candidates for a batch of queries."""

    num_sequences: int
    query_tokens: list[np.ndarray]
    query_completion_starts: list[int]
    sequences: Callable[[np.ndarray], list[np.ndarray]]
    metadata: Callable[[str], np.ndarray]
    artifacts_dir: Path
    corpus_fingerprint: str
    tokenizer_fingerprint: str
    seed: int
    monitor: Monitor
    make_filter: Callable[[str], Filter] = field(repr=False, default=None)  # type: ignore[assignment]
    # The project (``project.runtime``: model, tokenizer, corpus, ``engine(modules)``; ``project.db``)
    # and the run's module spec, for filters that look at gradients or stored per-project data;
    # ``None`` where a filter runs without a project (scripts, benchmarks).
    project: Any = field(repr=False, default=None)
    modules: str | None = None
    # Each query's measurement (its :class:`MeasurementTerm` s: token sequences and weights), for
    # filters that look at the measurement's gradient; ``query_tokens`` and
    # ``query_completion_starts`` are the completion's (the prompt joined with the completion).
    # ``None`` where a filter runs without a project.
    query_measurements: list[list[MeasurementTerm]] | None = field(repr=False, default=None)


class Filter(Plugin):
    """Chooses, per query, the candidate training sequences to score.

    ``candidates(ctx)`` returns one sorted ``int64`` array of corpus indices per query.
    Sequences that are not candidates get NaN scores, never zero.
    """

    kind = "filter"
    # Chooses without looking at the queries (every sequence, a random sample): the baseline a
    # filter's candidates are compared with (search depth).
    unfiltered: ClassVar[bool] = False
    # Combines other filters: the name of its one option, which holds their specs joined with
    # ``+`` (the built-in ``union``: ``of``). A ``--filter a+b`` is made as this filter with
    # that option set to ``a+b`` (``Registry.joining``).
    joins: ClassVar[str | None] = None

    def candidates(self, ctx: FilterContext) -> list[np.ndarray]:
        raise NotImplementedError


# -- attributions ----------------------------------------------------------------------------------
@dataclass
class AttributionResult:
    """Parts of one score: ``labels[i]`` carries ``values[i]``; the values sum to ``total``."""

    kind: str
    labels: list[str]
    values: np.ndarray
    total: float


@dataclass
class AttributionContext:
    """One (query, training sequence) pair: per-module scores and per-module, per-token scores."""

    tracked: list[TrackedModule]
    module_scores: np.ndarray  # [M]
    token_module_scores: Callable[[], np.ndarray]  # -> [T, M], computed on demand
    tokens: list[str]


class Attribution(Plugin):
    """Splits a score into parts (layers, tokens, ...): ``attribute(ctx) -> AttributionResult``."""

    kind = "attribution"

    def attribute(self, ctx: AttributionContext) -> AttributionResult:
        raise NotImplementedError


# -- executors -------------------------------------------------------------------------------------
@dataclass
class Job:
    """A pass to run over shards. ``worker`` describes how to build the model and corpus on a
    worker (picklable); ``local`` is the driver's already-built context, for in-process executors.

    ``sums`` (``sum`` passes only): the driver's running sums of the shards before the first one
    given. An executor that runs the shards in this process one after another, in the order given,
    may pass it as ``local.run(..., into=job.sums)``: each shard then adds into it and the result
    reported is ``job.sums`` itself, so memory holds one set of sums instead of one per shard.
    Others ignore it and report each shard's own sums."""

    pass_: Pass
    worker: Any
    batch_size: int
    local: Any = None
    sums: dict[str, torch.Tensor] | None = None


class Executor(Plugin):
    """Runs a job's pass over shards, calling ``on_result(shard, tensors)`` in the driver as each
    shard finishes (in any order). Must stop within one batch once ``monitor`` is cancelled."""

    kind = "executor"
    # True where :meth:`run_tasks` runs the tasks in other processes (the Ray executor): a task that
    # computes on a device then uses its own process's (``FitContext.task_device`` is ``None``).
    remote_tasks: ClassVar[bool] = False

    def map(
        self,
        job: Job,
        shards: list[Shard],
        on_result: Callable[[Shard, dict[str, torch.Tensor]], None],
        monitor: Monitor,
    ) -> None:
        raise NotImplementedError

    def fit_memory(self) -> int | None:
        """Bytes of sums one fitting pass may hold on a worker (its memory budget), or ``None``
        (no limit of the executor's own). Where the fit's sums exceed it, estimators fit by module
        (:meth:`FitContext.groups`)."""
        return None

    def run_tasks(
        self,
        fn: Callable[[Any, Monitor], Any],
        tasks: Iterable,
        on_result: Callable[[int, Any], None],
        monitor: Monitor,
    ) -> None:
        """Run independent tasks, e.g. one retraining each (``inflq validate --lds``) or one
        eigendecomposition each (:meth:`FitContext.run_tasks`): ``fn(task, monitor)`` for each of
        ``tasks``, calling ``on_result(i, result)`` in the driver as task ``i`` finishes (in any
        order). ``tasks`` may be a generator: take each task only when sending it (a fit's tasks
        carry covariance sums the driver drops as they go). This default runs them in this
        process, one after another, in order, with the driver's ``monitor`` (so ``fn`` can stop
        within a step). An executor that runs them elsewhere (set :attr:`remote_tasks`) needs
        ``fn`` to be a module-level function and the tasks and results picklable, calls ``fn``
        with a monitor of its own, and stops the tasks in flight (their results lost) once
        ``monitor`` is cancelled."""
        for i, task in enumerate(tasks):
            monitor.check()
            on_result(i, fn(task, monitor))

    def close(self) -> None:
        pass


# -- trainers --------------------------------------------------------------------------------------
@dataclass
class TrainContext:
    """What a trainer may use to retrain the project's model on a subset of its corpus.

    ``project``: the :class:`inflq.Project` (``project.model_path`` holds ``config.json``;
    ``project.runtime.corpus`` the tokenized corpus, ``.many(indices)`` its sequences;
    ``project.runtime.pad_id``). ``indices``: the sorted corpus indices to train on. ``seed``: the
    seed of the initialisation and the data order (the same seed gives the same model for the same
    subset). ``workdir``: a temporary folder the trainer may write to, deleted after the subset is
    measured. ``monitor``: check it (``monitor.check()``) between steps so that Ctrl-C stops within
    a step."""

    project: Any
    indices: np.ndarray
    seed: int
    monitor: Monitor
    workdir: Path


class Trainer(Plugin):
    """Retrains the project's model, from the same initialisation recipe, on a subset of the corpus
    (the ground truth of the linear datamodeling score and of leave-one-out retraining).

    ``train(ctx)`` returns the retrained model in memory: a causal LM ``torch.nn.Module`` whose
    ``model(input_ids, attention_mask=...)`` returns an object with ``.logits`` (a Hugging Face
    model), on any device; inflq measures the queries' log-probabilities with it and then drops it.
    A trainer that trains elsewhere may instead return the path of a ``save_pretrained`` folder
    (inside ``ctx.workdir``), which inflq loads.
    """

    kind = "trainer"

    def train(self, ctx: TrainContext) -> torch.nn.Module | Path:
        raise NotImplementedError


# -- measurements ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class MeasurementTerm:
    """One token sequence a measurement reads, and the weight on each measured token's log-probability.

    ``tokens``: the sequence's token ids (a prompt joined with a completion, as the model sees it);
    ``start``: the first measured position (>= 1: the token there has context); ``weights``: one
    float per token at positions ``>= start``. The term's value is
    ``Σ_t weights[t - start] · log p(tokens[t] | tokens[:t])``."""

    tokens: np.ndarray
    start: int
    weights: np.ndarray

    @classmethod
    def of(cls, query: TokenizedQuery, weight: float | np.ndarray = 1.0) -> MeasurementTerm:
        """A tokenized completion (``query.tokens``, ``query.completion_start``) with ``weight`` on
        each of its tokens (a number, or one per completion token)."""
        import numpy as np

        n = len(query.tokens) - int(query.completion_start)
        w = np.broadcast_to(np.asarray(weight, dtype=np.float64), (n,)).copy()
        return cls(np.asarray(query.tokens, dtype=np.int64), int(query.completion_start), w)

    def position_weights(self) -> np.ndarray:
        """One weight per token of ``tokens`` (0 before ``start``)."""
        import numpy as np

        out = np.zeros(len(self.tokens), dtype=np.float64)
        out[self.start :] = self.weights
        return out


class Measurement(Plugin):
    """What a query measures: a weighted sum of token log-probabilities over one or more token
    sequences (``terms``). Every estimator scores the gradient of that sum, made in one place by
    the shared gradient engine, so a measurement needs nothing of the estimators.

    ``terms(completion, alternative)`` receives the query's prompt joined with its completion, and
    with its alternative where the query has one (both :class:`inflq.queries.TokenizedQuery`:
    ``tokens``, ``completion_start``), and returns :class:`MeasurementTerm` s (``MeasurementTerm.of(
    completion, weight)``). ``alternative = True``: the measurement needs a query's alternative
    completion (``--alternative``); a query without one is refused, as is an alternative given to
    a measurement that reads none.
    """

    kind = "measurement"
    alternative: ClassVar[bool] = False

    def terms(self, completion: TokenizedQuery, alternative: TokenizedQuery | None) -> list[MeasurementTerm]:
        raise NotImplementedError

    def formula(self) -> str:
        """The measurement in words for headers and help, e.g. ``log p(completion)``."""
        return self.description
