"""trak-lite: a projection estimator written against inflq's plugin contract alone (``inflq.__all__``),
as a third party would write it (tests/test_architecture.py holds it to that). TRAK-style:

* every gradient is projected to ``k`` dimensions by a fixed random matrix, ``φ(z) = Σ_m P_m vec ∇_m L(z)``
  over the tracked modules ``m`` (:func:`projection`: Gaussian, ``1/√k``, seeded by the option ``seed``
  and the module's name);
* the preconditioner is the projected Gauss-Newton matrix of the fitting data, ``F = ΦᵀΦ / n``
  (empirical: the data's own labels), damped: a score is ``φ(q)ᵀ (F + λI)⁻¹ φ(z)``;
* the preconditioned query, lifted back, ``Pᵀ (F + λI)⁻¹ φ(q)``, is dense in every module: compressing
  it to rank r would change the scores, so the estimator declares ``full_rank_queries``;
* it keeps its own per-sequence data: ``score_candidates`` runs a pass over the candidates through the
  run's executor (``ScoringContext.run_pass``, sharded, committed, resumed), stores the projected rows
  as an artifact of its own recorded in a table of its own, and scores from them. ``rows=false`` leaves
  scoring to the run's passes instead (from the full-rank preconditioned queries).
"""

from __future__ import annotations

import hashlib
import time
from typing import TYPE_CHECKING

import numpy as np
from sqlite_utils.migrations import Migrations

from inflq import Estimator, InflqError, Option, Pass, SumPass, hookimpl, load_tensors, save_tensors

if TYPE_CHECKING:
    import torch

PHASE = "projected gradients"


@hookimpl
def register_estimators(register):
    register(TrakLite)


def projection(name: str, out: int, inn: int, k: int, seed: int) -> torch.Tensor:
    """``P_m`` of module ``name``: ``[k, out · in_dim]`` float32, Gaussian with variance ``1/k``, the
    same in every process for the same arguments."""
    import torch

    g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:7], "big"))
    return torch.randn(k, out * inn, generator=g, dtype=torch.float32) / k**0.5


class _Projecting:
    """φ of the captured sequences, ``[B, k]``, with the projections built once per module."""

    def __init__(self, k: int, seed: int) -> None:
        self.k, self.seed = k, seed
        self._p: dict[str, torch.Tensor] = {}

    def project(self, name: str, dw: torch.Tensor) -> torch.Tensor:
        """``P_m vec dw`` for gradients ``dw [B, out, in_dim]``."""
        if name not in self._p:
            self._p[name] = projection(name, dw.shape[1], dw.shape[2], self.k, self.seed)
        p = self._p[name].to(dw.device)
        return dw.flatten(1).to(p.dtype) @ p.T

    def phi(self, captures, selected) -> torch.Tensor:
        total = 0
        for name, cap in selected:
            total = total + self.project(name, cap.sequence_gradients())
        return total


class ProjectedCovariancePass(SumPass):
    """``ΦᵀΦ`` over the fitting data and the number of sequences (float64 sums)."""

    phase = "projected covariance"
    labels = "data"

    def __init__(self, k: int, seed: int) -> None:
        self.proj = _Projecting(k, seed)

    def _parts(self, batch, captures):
        import torch

        phi = self.proj.phi(captures, self.selected(captures)).to(torch.float64)
        yield "sequences", torch.tensor([float(batch.size)], dtype=torch.float64)
        yield "FF", phi.T @ phi


class ProjectedGradientsPass(Pass):
    """Each sequence's projected training gradient ``φ(z)``: one row per sequence, in order."""

    phase = PHASE
    labels = "data"
    combine = "concat"

    def __init__(self, k: int, seed: int) -> None:
        self.proj = _Projecting(k, seed)

    def process(self, engine, batch, captures):
        return {"rows": self.proj.phi(captures, self.selected(captures)).cpu()}


# -- the plugin's own table: where each set of rows is stored ----------------------------------------
migrations = Migrations("trak_lite")


@migrations(name="0001_rows")
def m0001_rows(db) -> None:
    db["trak_lite_rows"].create({"key": str, "rows": int, "path": str, "checksum": str, "created_at": str}, pk="key")


class TrakLite(Estimator):
    name = "trak-lite"
    description = "TRAK-style projected gradients (k dimensions) with a damped projected Gauss-Newton (a test plugin)"
    fits_factors = True
    full_rank_queries = True
    options = (
        Option("k", int, 16, "dimensions the gradients are projected to"),
        Option("damping", float, 0.01, "λ added to the projected Gauss-Newton matrix"),
        Option("seed", int, 0, "seed of the random projection"),
        Option("rows", bool, True, "score from stored projected rows (a pass of its own); false: the run's scoring passes"),
    )

    def __init__(self, **options) -> None:
        super().__init__(**options)
        if self.settings["k"] < 1:
            raise InflqError(f"trak-lite: k must be at least 1, got {self.settings['k']}; e.g. --estimator trak-lite:k=16")
        self.inverse: torch.Tensor | None = None  # (F + λI)⁻¹, [k, k] float64
        self.fitted_on = 0
        self.rows_key: str | None = None

    def factor_settings(self):
        return {"k": self.settings["k"], "seed": self.settings["seed"]}

    def fit(self, ctx):
        sums = ctx.run_pass(ProjectedCovariancePass(self.settings["k"], self.settings["seed"]))
        factors = {"F": sums["FF"] / sums["sequences"][0], "sequences": sums["sequences"]}
        self.load_factors(factors)  # fit leaves the estimator ready, as load_factors does on later runs
        return factors

    def load_factors(self, tensors):
        import torch

        k = self.settings["k"]
        self.inverse = torch.linalg.inv(tensors["F"].to(torch.float64) + self.settings["damping"] * torch.eye(k, dtype=torch.float64))
        self.fitted_on = int(tensors["sequences"][0])

    def _preconditioned_rows(self, grads) -> torch.Tensor:
        """``(F + λI)⁻¹ φ(q)`` of the queries' gradients ``{module: [nq, out, in_dim]}``: ``[nq, k]``."""
        import torch

        proj = _Projecting(self.settings["k"], self.settings["seed"])
        phi = sum(proj.project(name, g).to(torch.float64) for name, g in grads.items())
        return phi @ self.inverse.to(phi.device)

    def precondition(self, grads):
        import torch

        pre = self._preconditioned_rows(grads)
        return {
            name: (pre.to(torch.float32) @ projection(name, g.shape[1], g.shape[2], self.settings["k"], self.settings["seed"]).to(g.device)).reshape(g.shape)
            for name, g in grads.items()
        }

    def score_candidates(self, ctx):
        import torch

        if not self.settings["rows"]:
            return None
        rows = self._rows(ctx)
        q = self._preconditioned_rows(ctx.query_gradients())
        return (q @ rows.to(torch.float64).T).numpy().astype(np.float32)

    def _rows(self, ctx) -> torch.Tensor:
        """The candidates' projected gradients: read back from this plugin's own store, or computed by
        a pass over the candidates on the run's executor and stored there."""
        import torch

        project = ctx.project
        migrations.apply(project.db)
        self.rows_key = hashlib.sha256(
            f"{project.model_fingerprint}|{project.runtime.corpus.fingerprint}|{','.join(ctx.engine.names)}|{self.settings['k']}|{self.settings['seed']}".encode()
            + np.asarray(ctx.candidates, dtype=np.int64).tobytes()
        ).hexdigest()[:24]
        row = next(project.db["trak_lite_rows"].rows_where("key = ?", [self.rows_key]), None)
        if row is not None:
            return load_tensors(project.root, row["path"], row["checksum"], "trak-lite rows")["rows"]
        rows = ctx.run_pass(ProjectedGradientsPass(self.settings["k"], self.settings["seed"]))["rows"]
        rel = f"{project.plugin_folder('trak-lite')}/rows-{self.rows_key}.safetensors"
        checksum = save_tensors(project.root, rel, {"rows": rows, "indices": torch.from_numpy(np.asarray(ctx.candidates, dtype=np.int64))})
        with project.db.atomic():
            project.db["trak_lite_rows"].upsert(
                {"key": self.rows_key, "rows": int(rows.shape[0]), "path": rel, "checksum": checksum,
                 "created_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())}, pk="key")
        return rows

    def describe(self):
        out = {"k": self.settings["k"], "damping": self.settings["damping"], "fitted_on": self.fitted_on}
        if self.settings["rows"] and self.rows_key:
            out["rows"] = self.rows_key
        return out
