"""A template for an inflq plugin: copy this folder, rename ``inflq_template`` (here, in
pyproject.toml and in the tests) and the plugins' names, and replace the maths. Import only what
``inflq`` exports (``inflq.__all__``, docs/plugins.md), and torch inside the functions that use it:
every ``inflq`` command imports every plugin.

* ``scaled-dot`` (estimator): the gradient dot product, each module's query gradient divided by its
  fan-in (``weighting=fan_in``) or not, times ``scale``: ``precondition`` is where an estimator's
  inverse-Hessian approximation goes.
* ``longest`` (filter): each query's ``k`` longest training sequences as its candidates.
"""

from __future__ import annotations

import numpy as np

from inflq import Estimator, Filter, InflqError, Option, hookimpl


class ScaledDotProduct(Estimator):
    name = "scaled-dot"
    description = "gradient dot product, scaled (a template: replace with your preconditioner)"
    # Typed options: the CLI reads them from the spec (--estimator scaled-dot:scale=2,weighting=fan_in)
    # and the TUI offers them as a form, checked against type and choices before the plugin sees them.
    options = (
        Option("scale", float, 1.0, "multiplies every score"),
        Option("weighting", str, "none", "divide each module's scores by its fan-in, or not", choices=("none", "fan_in")),
    )

    def __init__(self, **options) -> None:
        super().__init__(**options)  # resolves and checks the options into self.settings
        if self.settings["scale"] == 0:
            raise InflqError("scaled-dot: scale must not be 0 (every score would be 0); e.g. --estimator scaled-dot:scale=1")

    def precondition(self, grads):
        """``{module: [queries, out, in_dim]}`` (bias as the last column) -> the same, preconditioned."""
        scale = float(self.settings["scale"])
        if self.settings["weighting"] == "fan_in":
            return {name: g * (scale / g.shape[2]) for name, g in grads.items()}
        return {name: g * scale for name, g in grads.items()}

    def describe(self):
        """Recorded with the result set; :meth:`summarize` puts it in `inflq top`'s header."""
        return {"scale": self.settings["scale"], "weighting": self.settings["weighting"]}


class LongestSequences(Filter):
    name = "longest"
    description = "each query's k longest training sequences (a template: replace with your selection)"
    options = (Option("k", int, 100, "candidates per query"),)

    def candidates(self, ctx):
        """One sorted int64 array of corpus indices per query (the same for every query here)."""
        if self.settings["k"] < 1:
            raise InflqError(f"longest: k must be at least 1, got {self.settings['k']}; e.g. --filter longest:k=100")
        lengths = np.array([len(s) for s in ctx.sequences(np.arange(ctx.num_sequences))])
        ctx.monitor.start("longest", ctx.num_sequences)
        chosen = np.sort(np.argsort(-lengths, kind="stable")[: self.settings["k"]]).astype(np.int64)
        ctx.monitor.advance(ctx.num_sequences)
        return [chosen for _ in ctx.query_tokens]


@hookimpl
def register_estimators(register):
    register(ScaledDotProduct)


@hookimpl
def register_filters(register):
    register(LongestSequences)
