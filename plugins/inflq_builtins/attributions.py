"""Built-in attributions: a score split over transformer layers, and over training tokens."""

from __future__ import annotations

import numpy as np

from inflq import Attribution, AttributionResult, hookimpl


@hookimpl
def register_attributions(register):
    register(LayerAttribution)
    register(TokenAttribution)


class LayerAttribution(Attribution):
    name = "layer"
    description = "per-layer influence: the module scores grouped by transformer block"

    def attribute(self, ctx):
        groups: dict[str, float] = {}
        for tm, v in zip(ctx.tracked, ctx.module_scores, strict=False):
            key = f"layer {tm.layer}" if tm.layer is not None else tm.name
            groups[key] = groups.get(key, 0.0) + float(v)
        values = np.array(list(groups.values()), dtype=np.float64)
        return AttributionResult("layer", list(groups), values, float(values.sum()))


class TokenAttribution(Attribution):
    name = "token"
    description = "per-token influence g_tᵀ Q ā_t over the training sequence's tokens"

    def attribute(self, ctx):
        per_token = ctx.token_module_scores().sum(axis=1)
        return AttributionResult("token", list(ctx.tokens), per_token, float(per_token.sum()))
