"""The whole plugin API of inflq: each hook receives a ``register`` callable (``register_commands``:
the command group).

Built-in estimators, filters, attributions, executors, trainers, measurements and commands are registered through these
same hooks and the same ``inflq`` entry-point group that third-party plugins use (see
``docs/plugins.md``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("inflq")
hookimpl = pluggy.HookimplMarker("inflq")


@hookspec
def register_estimators(register: Callable[[type], None]) -> None:
    """Register :class:`inflq.Estimator` subclasses: ``register(MyEstimator)``."""


@hookspec
def register_filters(register: Callable[[type], None]) -> None:
    """Register :class:`inflq.Filter` subclasses (candidate selection): ``register(MyFilter)``."""


@hookspec
def register_attributions(register: Callable[[type], None]) -> None:
    """Register :class:`inflq.Attribution` subclasses (layer, token, ...): ``register(MyAttribution)``."""


@hookspec
def register_executors(register: Callable[[type], None]) -> None:
    """Register :class:`inflq.Executor` subclasses (where passes run): ``register(MyExecutor)``."""


@hookspec
def check_artifacts(project: Any) -> list[str]:
    """Verify the plugin's own files in ``project`` for ``inflq check``: one line per problem, naming
    the file and the fix (``"gradient index 3f2a… fails its checksums: rebuild it with ..."``);
    an empty list when everything verifies. inflq cannot repair these: the line says how."""


@hookspec
def register_trainers(register: Callable[[type], None]) -> None:
    """Register :class:`inflq.Trainer` subclasses (retraining on a corpus subset, for LDS): ``register(MyTrainer)``."""


@hookspec
def register_measurements(register: Callable[[type], None]) -> None:
    """Register :class:`inflq.Measurement` subclasses (what a query measures): ``register(MyMeasurement)``."""


@hookspec
def register_commands(cli: Any) -> None:
    """Add click commands to the ``inflq`` command group: ``@cli.command() def mine(): ...``.

    Called once, when the ``inflq`` command starts (:func:`inflq.cli.main`), not on import."""
