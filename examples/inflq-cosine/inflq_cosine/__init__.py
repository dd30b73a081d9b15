"""Gradient cosine similarity for inflq, as a third-party plugin.

* ``cosine`` (estimator): query-normalised gradient dot product, ``⟨∇ℓ_q / ‖∇ℓ_q‖, ∇L(z)⟩``.
  Positive scores mean the training sequence makes the completion more likely, as in inflq.
* Full cosine, ``⟨∇ℓ_q, ∇L(z)⟩ / (‖∇ℓ_q‖ ‖∇L(z)‖)``: :func:`cosine_matrix` divides a ``cosine``
  result set by training-gradient norms from :class:`GradientNormPass`, cached as an artifact.
"""

from __future__ import annotations

import hashlib
import time

import click
import numpy as np
import sqlite_utils
from sqlite_utils.migrations import Migrations

from inflq import Estimator, InflqError, Monitor, Pass, Shard, hookimpl

# -- the estimator -----------------------------------------------------------------------------------


class QueryNormalisedDotProduct(Estimator):
    """``precondition`` scales each query's gradient to unit norm over all tracked modules."""

    name = "cosine"
    description = "query-normalised gradient dot product (full cosine: inflq cosine PROJECT)"

    def precondition(self, grads):
        import torch  # imported where used: `inflq --help` loads every plugin and stays fast

        norms = torch.sqrt(sum((g.double() ** 2).flatten(1).sum(1) for g in grads.values()))  # [nq]
        if not torch.all(norms > 0):
            raise InflqError("a query gradient is zero (the completion is already certain?); cosine is undefined")
        return {n: (g.double() / norms[:, None, None]).to(g.dtype) for n, g in grads.items()}

    def describe(self):
        return {"normalised": "query gradients only; training-gradient norms via `inflq cosine`"}


@hookimpl
def register_estimators(register):
    register(QueryNormalisedDotProduct)


# -- a pass, an artifact and the plugin's own catalog table -------------------------------------------


class GradientNormPass(Pass):
    """Per-sequence training-gradient norms ``‖∇L(z)‖`` over the tracked modules."""

    phase = "gradient norms"
    labels = "data"
    combine = "concat"

    def process(self, engine, batch, captures):
        import torch

        total = 0
        for cap in captures.values():
            dw = torch.einsum("bto,bti->boi", cap.gradients, cap.activations)
            total = total + (dw.double() ** 2).sum(dim=(1, 2))
        return {"norms": torch.sqrt(total)}


MIGRATION_SET = "inflq_cosine"
migrations = Migrations(MIGRATION_SET)


@migrations(name="0001_norms")
def m0001_norms(db: sqlite_utils.Database) -> None:
    db["cosine_norms"].create(
        {"key": str, "modules": str, "num_sequences": int, "path": str, "checksum": str, "created_at": str}, pk="key"
    )


def open_tables(project) -> None:
    """Apply this plugin's migrations to the project's catalog (idempotent; run on every open)."""
    migrations.apply(project.db)


def training_norms(project, modules: str | None = None, monitor: Monitor | None = None, batch_size: int = 8) -> np.ndarray:
    """Gradient norms of every training sequence, cached as ``artifacts/cosine/*.safetensors``."""
    from inflq import LocalWorker, load_tensors, save_tensors

    open_tables(project)
    engine = project.runtime.engine(modules)
    key = hashlib.sha256(f"{project.model_fingerprint}|{project.runtime.corpus.fingerprint}|{','.join(engine.names)}".encode()).hexdigest()[:24]
    row = next(project.db["cosine_norms"].rows_where("key = ?", [key]), None)
    if row is not None:
        return load_tensors(project.root, row["path"], row["checksum"], "gradient norms")["norms"].numpy()
    n = len(project.runtime.corpus)
    monitor = monitor or Monitor()
    monitor.start(GradientNormPass.phase, n)
    norms = LocalWorker(project, engine).run(GradientNormPass(), Shard(0, np.arange(n)), batch_size, monitor)["norms"]
    rel = f"{project.plugin_folder('cosine')}/norms-{key}.safetensors"
    checksum = save_tensors(project.root, rel, {"norms": norms})
    with project.db.atomic():
        project.db["cosine_norms"].upsert({
            "key": key, "modules": ",".join(engine.names), "num_sequences": n, "path": rel, "checksum": checksum,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()),
        }, pk="key")
    return norms.numpy()


def cosine_matrix(project, investigation: str, result_set_id: int | None = None) -> np.ndarray:
    """Full cosine similarities ``[queries, sequences]`` from a ``cosine`` result set (NaN where a
    sequence was not a candidate)."""
    import json

    from inflq import result_set, score_matrix

    rs = result_set(project, investigation, result_set_id)
    if rs["estimator"].split(":")[0] != "cosine":
        raise InflqError(f"result set {rs['id']} was scored with {rs['estimator']}; run with --estimator cosine first")
    modules = ",".join(json.loads(rs["settings"])["modules"])
    scores = score_matrix(project, investigation, rs["id"])
    norms = training_norms(project, modules)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(norms[None, :] > 0, scores / norms[None, :], np.nan)


# -- a command ------------------------------------------------------------------------------------------


@hookimpl
def register_commands(cli):
    @cli.command("cosine")
    @click.argument("project")
    @click.option("-i", "--investigation", default="default", show_default=True, help="Investigation whose result set is used.")
    @click.option("-k", default=5, show_default=True, help="Sequences per query.")
    def cosine_cmd(project, investigation, k):
        """Top training sequences by full gradient cosine similarity (needs a cosine run)."""
        from inflq import investigation_queries, open_project

        p = open_project(project)
        cos = cosine_matrix(p, investigation)
        for qi, q in enumerate(investigation_queries(p, investigation)):
            click.echo(f"query {q['id']}: {q['prompt']!r} -> {q['completion']!r}")
            row = np.nan_to_num(cos[qi], nan=-np.inf)
            for idx in np.argsort(-row)[:k]:
                click.echo(f"  {cos[qi, idx]:+.4f}  {p.runtime.decode(p.runtime.corpus.get(int(idx)))[:80]}")
