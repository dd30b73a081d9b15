"""The one run recipe: make the estimator (and executor, filter) a spec names, build the engine,
and fit or reuse its factors. Runs, results, integrity, validate and the benchmarks all start
here."""

from __future__ import annotations

from dataclasses import dataclass

from ..base import Estimator, Executor
from ..engine import GradientEngine
from ..options import parse_spec, parse_specs
from ..plugins import get_registry
from ..progress import Monitor
from ..project import Project
from ..settings import RunSettings
from .fitting import ensure_factors


def make_estimator(spec: str) -> Estimator:
    s = parse_spec(spec)
    return get_registry().create("estimator", s.name, s.options)  # type: ignore[return-value]


def make_executor(spec: str) -> Executor:
    s = parse_spec(spec)
    return get_registry().create("executor", s.name, s.options)  # type: ignore[return-value]


def make_trainer(spec: str | None = None):
    """The trainer ``spec`` names (default: the registry's default trainer)."""
    s = parse_spec(spec or get_registry().default("trainer"))
    return get_registry().create("trainer", s.name, s.options)


def make_filter(spec: str):
    parts = parse_specs(spec)
    if len(parts) == 1:
        return get_registry().create("filter", parts[0].name, parts[0].options)
    union = get_registry().get("filter", "union")
    return union(of=spec)


@dataclass
class Prepared:
    """An estimator ready to precondition queries: its factors fitted or loaded."""

    estimator: Estimator
    engine: GradientEngine
    factor_set_id: int | None  # None: the estimator fits nothing


def prepare_estimator(
    project: Project,
    settings: RunSettings,
    monitor: Monitor | None = None,
    *,
    estimator: Estimator | None = None,
    engine: GradientEngine | None = None,
    executor: Executor | None = None,
    run_id: int | None = None,
) -> Prepared:
    """Make ``settings.estimator`` (unless given), an engine over ``settings.modules`` (unless
    given), and fit or load its factors on ``executor`` (default: the registry's default, in this
    process), committing fitting shards to ``run_id`` when given (see :func:`ensure_factors`)."""
    settings.resolve_defaults(get_registry())
    estimator = estimator or make_estimator(settings.estimator)
    engine = engine or project.runtime.engine(settings.modules)
    own = executor is None
    executor = executor or default_executor()
    try:
        fs_id = ensure_factors(project, estimator, engine, executor, settings, monitor or Monitor(), run_id=run_id)
    finally:
        if own:
            executor.close()
    return Prepared(estimator, engine, fs_id)


def default_executor() -> Executor:
    """The registry's default executor (the built-in one runs in this process)."""
    return make_executor(get_registry().default("executor"))
