"""Built-in candidate filters: all sequences, a seeded random sample, a metadata match, and the
union of other filters (``tfidf:k=1000+random:n=500`` is how the paper compared them)."""

from __future__ import annotations

import numpy as np

from inflq import Filter, InflqError, Option, hookimpl


@hookimpl
def register_filters(register):
    register(AllSequences)
    register(RandomSample)
    register(MetadataFilter)
    register(Union)


class AllSequences(Filter):
    name = "all"
    description = "every training sequence (no filtering)"
    default = True
    unfiltered = True

    def candidates(self, ctx):
        every = np.arange(ctx.num_sequences, dtype=np.int64)
        return [every for _ in ctx.query_tokens]


class RandomSample(Filter):
    name = "random"
    description = "a seeded uniform random sample of the corpus, the same for every query"
    unfiltered = True
    options = (
        Option("n", int, 1000, "how many sequences to sample"),
        Option("seed", int, None, "sampling seed (default: the run's seed)"),
    )

    def candidates(self, ctx):
        n = self.settings["n"]
        if n <= 0:
            raise InflqError("random filter: n must be positive")
        n = min(n, ctx.num_sequences)
        seed = ctx.seed if self.settings["seed"] is None else self.settings["seed"]
        pick = np.sort(np.random.default_rng(seed).choice(ctx.num_sequences, size=n, replace=False)).astype(np.int64)
        return [pick for _ in ctx.query_tokens]


class MetadataFilter(Filter):
    name = "metadata"
    description = "sequences whose metadata field equals a value (values separated by |)"
    options = (
        Option("field", str, "source", "metadata field (e.g. source)"),
        Option("value", str, None, "value to match; several separated by |"),
    )

    def candidates(self, ctx):
        if self.settings["value"] is None:
            raise InflqError("metadata filter: give a value, e.g. --filter metadata:field=source,value=wiki")
        wanted = set(self.settings["value"].split("|"))
        column = ctx.metadata(self.settings["field"])
        pick = np.flatnonzero(np.isin(column, list(wanted))).astype(np.int64)
        if len(pick) == 0:
            raise InflqError(f"metadata filter: no sequence has {self.settings['field']} in {sorted(wanted)}")
        return [pick for _ in ctx.query_tokens]


class Union(Filter):
    name = "union"
    description = "the union of other filters' candidates, per query (of=tfidf:k=100+random:n=500)"
    joins = "of"  # --filter a+b is made as union:of=a+b
    options = (Option("of", str, None, "filter specs joined with +"),)

    def candidates(self, ctx):
        spec = self.settings["of"]
        if not spec or "+" not in spec:
            raise InflqError("union filter: give two or more filters joined with +, e.g. tfidf:k=100+random:n=500")
        parts = [ctx.make_filter(s).candidates(ctx) for s in spec.split("+")]
        return [np.unique(np.concatenate(per_q)).astype(np.int64) for per_q in zip(*parts, strict=False)]

    def spec(self):
        return self.settings["of"]
