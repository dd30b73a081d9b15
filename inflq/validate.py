"""How accurate is each estimator on this model? Estimators against the paper's ground truth.

The ground truth is the proximal Bregman response function (PBRF, Bae et al. 2022; Grosse et al.
2023 §2.2). For a sampled fitting sequence z and ε = ±1/N (N fitting sequences), minimise over the
tracked parameters θ, starting at the trained θ_s:

    (1/N) Σ_i D_out(f(θ, x_i), f(θ_s, x_i)) + ε L(z, θ) + (λ/2) ‖θ − θ_s‖²

where D_out is the Bregman divergence of the cross-entropy in logit space, which is
KL(p(θ_s) ‖ p(θ)) summed over the positions where the training loss has a term (a next token
exists: the normalisation of inflq's Gauss-Newton matrix and of its sampled-label Fisher), and λ is the damping (per module, EK-FAC's heuristic 0.1 × mean eigenvalue unless given).
The influence on a query's measurement m = log p(completion | prompt) is then
``(Δm(+ε) − Δm(−ε)) / (2ε)``: positive when up-weighting z makes the completion more likely,
inflq's sign. To first order it is ``−∇ℓ_qᵀ (G + λI)⁻¹ ∇L(z)``, the quantity every estimator
approximates.

The optimiser is SGD with Nesterov momentum, step ``1 / (λ_max(G) + λ)`` (power iteration) and the
momentum that is optimal for the quadratic's condition number, in float64. Not Adam: Adam's steps
do not scale with the gradient, and at ε = 1/N the response is a small, ε-linear displacement that
plain (momentum) gradient descent resolves symmetrically for ±ε, so the difference cancels
second-order terms and shared optimisation error.

Retraining as the ground truth (the linear datamodeling score, leave-one-out) is in
:mod:`inflq.lds`, with a ``trainer`` plugin; see ``docs/validation.md``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr
from torch.func import functional_call

from . import catalog
from .contractions import QueryGradients
from .engine import make_batch, math_attention
from .errors import InflqError
from .passes import ScorePass, Shard, sequence_seed
from .progress import Monitor
from .project import Project
from .runs import (
    LocalWorker,
    RunSettings,
    default_executor,
    fit_indices,
    make_estimator,
    prepare_estimator,
    query_gradients,
)


@dataclass
class ValidationRow:
    """One estimator (at one damping) against the PBRF."""

    estimator: str
    pearson: float
    spearman: float
    fit_seconds: float
    ihvp_seconds: float
    damping: float | None = None
    per_query: list[tuple[float, float]] = field(default_factory=list)


@dataclass
class Validation:
    """The result of :func:`validate`: rows per estimator, the PBRF influences and what was used."""

    id: int | None
    rows: list[ValidationRow]
    pbrf: np.ndarray  # [queries, sample]
    scores: dict[str, np.ndarray]
    sample: np.ndarray
    settings: dict[str, Any]
    recommended_damping: float | None = None


def _corr(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    if np.std(a) == 0 or np.std(b) == 0:
        return float("nan"), float("nan")
    return float(pearsonr(a, b)[0]), float(spearmanr(a, b)[0])


class PBRF:
    """The proximal Bregman response of the tracked parameters, on a float64 copy of the model."""

    def __init__(self, project: Project, modules: str | None, fit: np.ndarray, dampings: dict[str, float], batch_size: int, dtype=torch.float64) -> None:
        from .engine import select_modules

        dev = project.runtime.device
        self.model = project.runtime.load_model(torch.float32).to(dtype).eval().requires_grad_(False)
        self.tracked = select_modules(self.model, modules or project.config.modules)
        self.theta_s: dict[str, torch.Tensor] = {}
        self.decay: dict[str, float] = {}
        for tm in self.tracked:
            for kind in ("weight", "bias") if tm.bias else ("weight",):
                key = f"{tm.name}.{kind}"
                self.theta_s[key] = getattr(tm.module, kind).detach().clone()
                self.decay[key] = float(dampings[tm.name])
        self.device = dev
        self.pad_id = project.runtime.pad_id
        self.n = len(fit)
        seqs = project.runtime.corpus.many(fit)
        self.batches = [make_batch(seqs[s : s + batch_size], self.pad_id, dev) for s in range(0, len(seqs), batch_size)]
        with torch.no_grad():
            self.ref_logp = [torch.log_softmax(self._logits(self.theta_s, b.input_ids, b.attention_mask), -1) for b in self.batches]
        self.lr = 1.0
        self.momentum = 0.0

    def _logits(self, params, ids, att):
        with math_attention():  # twice differentiable, unlike the fused kernels
            return functional_call(self.model, params, (ids,), {"attention_mask": att, "use_cache": False}).logits.to(self.theta_s[next(iter(self.theta_s))].dtype)

    def tune(self, iterations: int = 15, monitor: Monitor | None = None) -> None:
        """Step size and momentum from the Gauss-Newton spectrum (power iteration, full data)."""
        gen = torch.Generator().manual_seed(0)
        x = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype).to(self.device) for k, v in self.theta_s.items()}
        top = 0.0
        if monitor is not None:
            monitor.start("PBRF step size", iterations)
        for _ in range(iterations):
            if monitor is not None:
                monitor.check()
            norm = math.sqrt(sum(float((v**2).sum()) for v in x.values()))
            x = {k: v / norm for k, v in x.items()}
            y = self._gn_product(x)
            top = math.sqrt(sum(float((v**2).sum()) for v in y.values()))
            x = y
            if monitor is not None:
                monitor.advance(1)
        # 1.2: power iteration approaches the top eigenvalue from below
        lo, hi = min(self.decay.values()), 1.2 * top + max(self.decay.values())
        kappa = max(hi / max(lo, 1e-30), 1.0)
        self.lr = 1.0 / hi
        self.momentum = (math.sqrt(kappa) - 1) / (math.sqrt(kappa) + 1)

    def _gn_product(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``G x``: the Hessian of the Bregman term at θ_s (double backward of the KL)."""
        out = {k: torch.zeros_like(v) for k, v in self.theta_s.items()}
        for b, ref in zip(self.batches, self.ref_logp):
            params = {k: v.clone().requires_grad_(True) for k, v in self.theta_s.items()}
            kl = self._kl(params, b, ref)
            g = torch.autograd.grad(kl, list(params.values()), create_graph=True)
            dot = sum((gi * x[k]).sum() for gi, k in zip(g, params))
            hv = torch.autograd.grad(dot, list(params.values()))
            for k, h in zip(params, hv):
                out[k] += h.detach()
        return out

    def _kl(self, params, batch, ref_logp) -> torch.Tensor:
        logp = torch.log_softmax(self._logits(params, batch.input_ids, batch.attention_mask), -1)
        kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1) * batch.loss_mask
        return kl.sum() / self.n

    def _loss(self, params, tokens, start: int = 1) -> torch.Tensor:
        ids = torch.as_tensor(np.asarray(tokens, np.int64), device=self.device)[None]
        logp = torch.log_softmax(self._logits(params, ids, torch.ones_like(ids)), -1)[0, :-1]
        return -logp.gather(1, ids[0, 1:, None])[start - 1 :].sum()

    def measurements(self, params, queries) -> np.ndarray:
        with torch.no_grad():
            return np.array([-float(self._loss(params, q.tokens, q.completion_start)) for q in queries])

    def solve(self, z: np.ndarray, eps: float, steps: int, monitor: Monitor | None = None) -> dict[str, torch.Tensor]:
        theta = {k: v.clone() for k, v in self.theta_s.items()}
        velocity = {k: torch.zeros_like(v) for k, v in theta.items()}
        for _ in range(steps):
            # Nesterov: the gradient at the look-ahead point.
            look = {k: (theta[k] + self.momentum * velocity[k]).requires_grad_(True) for k in theta}
            grads = {k: self.decay[k] * (look[k].detach() - self.theta_s[k]) for k in theta}
            for b, ref in zip(self.batches, self.ref_logp):
                for k, g in zip(look, torch.autograd.grad(self._kl(look, b, ref), list(look.values()))):
                    grads[k] += g
            for k, g in zip(look, torch.autograd.grad(eps * self._loss(look, z), list(look.values()))):
                grads[k] += g
            for k in theta:
                velocity[k] = self.momentum * velocity[k] - self.lr * grads[k]
                theta[k] = theta[k] + velocity[k]
            if monitor is not None:
                monitor.check()
        for v in theta.values():
            if not torch.isfinite(v).all():
                raise InflqError("the PBRF optimisation diverged; lower --pbrf-steps or check the model")
        return theta


def validate(
    project: Project,
    investigation: str,
    estimators: list[str] | None = None,
    sample: int = 20,
    dampings: list[float] | None = None,
    queries: int = 3,
    fit_sequences: int | None = 128,
    epsilon: float | None = None,
    pbrf_steps: int = 300,
    pbrf_damping: float | None = None,
    seed: int = 0,
    batch_size: int = 8,
    modules: str | None = None,
    max_minutes: float = 30.0,
    monitor: Monitor | None = None,
    save: bool = True,
) -> Validation:
    """Correlate estimators' influence scores with PBRF influences on a sample of fitting sequences.

    ``dampings`` sweeps EK-FAC's absolute damping (``ekfac:damping=λ``) and recommends the value
    with the best Pearson correlation. Refuses (with its estimated cost) a sample whose PBRF solves
    would take longer than ``max_minutes``.
    """
    monitor = monitor or Monitor()
    estimators = list(estimators or ["identity", "ekfac", "lissa"])
    project.require_model()
    qrows = catalog.queries(project.db, investigation)[: max(1, queries)]
    if not qrows:
        raise InflqError(f"investigation {investigation!r} has no queries; add one with `inflq query add`")
    store = project.runtime.corpus
    fit = fit_indices(len(store), fit_sequences, seed)
    n = len(fit)
    if sample < 2:
        raise InflqError("--sample must be at least 2 (correlations need two sequences)")
    if sample > n:
        raise InflqError(f"--sample {sample} is larger than the {n} fitting sequences; lower it or raise --fit-sequences")
    rng = np.random.default_rng(seed + 1)
    chosen = np.sort(rng.choice(fit, size=sample, replace=False)).astype(np.int64)
    eps = float(epsilon) if epsilon is not None else 1.0 / n
    toks = [project.runtime.tokenize_query(q["prompt"], q["completion"], bool(q["chat"])) for q in qrows]
    engine = project.runtime.engine(modules)

    # The PBRF's damping: absolute, or EK-FAC's heuristic per module (as LiSSA estimates it).
    if pbrf_damping is not None:
        pb_damp = {tm.name: float(pbrf_damping) for tm in engine.tracked}
    else:
        sums = {tm.name: 0.0 for tm in engine.tracked}
        monitor.start("PBRF damping", n)
        for s in range(0, n, batch_size):
            monitor.check()
            chunk = fit[s : s + batch_size]
            b = make_batch(store.many(chunk), project.runtime.pad_id, engine.device, sample_seeds=[sequence_seed(seed, "pbrf damping", int(i)) for i in chunk])
            for name, dw in engine.sequence_gradients(b, "sampled").items():
                sums[name] += float((dw.double() ** 2).sum())
            monitor.advance(len(chunk))
        pb_damp = {tm.name: 0.1 * sums[tm.name] / n / (tm.out_features * tm.in_dim) for tm in engine.tracked}

    # Ground truth, after checking its cost.
    pbrf = PBRF(project, modules, fit, pb_damp, batch_size)
    pbrf.tune(monitor=monitor)
    z0 = store.get(int(chosen[0]))
    t = time.perf_counter()
    pbrf.solve(z0, eps, 3, monitor)
    per_solve = (time.perf_counter() - t) / 3 * pbrf_steps
    total = per_solve * 2 * sample
    if total > max_minutes * 60:
        raise InflqError(
            f"a sample of {sample} needs about {total / 60:.0f} min of PBRF solves ({per_solve:.1f} s per solve × {2 * sample}); "
            f"lower --sample or --pbrf-steps, or raise --max-minutes"
        )
    base = pbrf.measurements(pbrf.theta_s, toks)
    truth = np.zeros((len(qrows), sample))
    monitor.start("PBRF", sample)
    t0 = time.perf_counter()
    for j, idx in enumerate(chosen):
        z = store.get(int(idx))
        up = pbrf.measurements(pbrf.solve(z, eps, pbrf_steps, monitor), toks) - base
        down = pbrf.measurements(pbrf.solve(z, -eps, pbrf_steps, monitor), toks) - base
        truth[:, j] = (up - down) / (2 * eps)
        monitor.advance(1)
    pbrf_seconds = time.perf_counter() - t0
    del pbrf

    # Estimators, each timed: fitting (or preparing) and the inverse-HVPs of the query gradients.
    specs = list(estimators) + [f"ekfac:damping={d!r}" for d in (dampings or [])]
    grads = query_gradients(project, engine, qrows, batch_size)
    worker = LocalWorker(project, engine)
    local = default_executor()
    rows: list[ValidationRow] = []
    scores: dict[str, np.ndarray] = {}
    for spec in specs:
        est = make_estimator(spec)
        settings = RunSettings(estimator=spec, modules=modules, fit_sequences=fit_sequences, seed=seed, batch_size=batch_size, refit=True)
        t = time.perf_counter()
        prepare_estimator(project, settings, monitor, estimator=est, engine=engine, executor=local)
        fit_s = time.perf_counter() - t
        t = time.perf_counter()
        pre = est.precondition(grads)
        ihvp_s = time.perf_counter() - t
        qg = QueryGradients.from_preconditioned(pre, None)
        got = worker.run(ScorePass(qg), Shard(0, chosen), batch_size, None)["scores"].numpy().T.astype(np.float64)
        if not np.isfinite(got).all():
            raise InflqError(f"{spec} produced non-finite scores; increase its damping")
        per_query = [_corr(got[q], truth[q]) for q in range(len(qrows))]
        d = est.settings.get("damping") if hasattr(est, "settings") else None
        rows.append(ValidationRow(spec, float(np.nanmean([p for p, _ in per_query])), float(np.nanmean([s for _, s in per_query])), fit_s, ihvp_s, d, per_query))
        scores[spec] = got
    sweep = [r for r in rows if r.estimator.startswith("ekfac:damping=")]
    recommended = max(sweep, key=lambda r: (r.pearson if math.isfinite(r.pearson) else -2)).damping if sweep else None
    used = {
        "queries": [q["id"] for q in qrows], "sample": [int(i) for i in chosen], "fit_sequences": n, "epsilon": eps,
        "pbrf_steps": pbrf_steps, "pbrf_damping": pb_damp, "pbrf_seconds": pbrf_seconds, "pbrf_seconds_per_solve": pbrf_seconds / (2 * sample),
        "seed": seed, "modules": engine.names, "optimizer": "SGD + Nesterov momentum, float64", "recommended_damping": recommended,
    }
    vid = None
    if save:
        inv = catalog.investigation(project.db, investigation)
        vid = catalog.insert_validation(project.db, [
            {
                "investigation_id": inv["id"], "estimator": r.estimator, "damping": r.damping,
                "pearson": r.pearson, "spearman": r.spearman, "fit_seconds": r.fit_seconds, "ihvp_seconds": r.ihvp_seconds,
                "num_queries": len(qrows), "num_sequences": sample,
                "settings": json.dumps({**used, "per_query": r.per_query}, default=float),
            }
            for r in rows
        ])
    return Validation(vid, rows, truth, scores, chosen, used, recommended)


def parse_list(text: str | None, kind=str) -> list:
    """``a,b,c`` into a list (``kind`` converts each item)."""
    if not text:
        return []
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            out.append(kind(part))
        except ValueError:
            raise InflqError(f"{part!r} is not a valid {kind.__name__} in {text!r}") from None
    return out
