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
from .display import plural
from .engine import make_batch, math_attention
from .errors import InflqError
from .lds import best_damping, compared_specs
from .measuring import measure
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
from .settings import PBRF_QUERIES, ValidationSettings
from .validations import MIN_SAMPLE, STEADY_SAMPLE, sample_warning

_DEFAULT = ValidationSettings()  # the keyword arguments' defaults: declared in inflq/settings.py
# float64 logits one PBRF batch may hold (with their log-softmax and gradients, a few times this many
# bytes × 8): the demo's 64 fitting sequences fit in one batch; wider vocabularies and longer
# sequences (GPT-2 small) keep --batch-size sequences per batch.
PBRF_LOGITS = 1 << 24


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

    def __init__(self, project: Project, modules: str | None, fit: np.ndarray, dampings: dict[str, float], batch_size: int, dtype=torch.float64,
                 max_logits: int = PBRF_LOGITS) -> None:
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
        # As many sequences per batch as ``max_logits`` float64 logits allow (at least
        # ``batch_size``): a step is one forward and backward over all N sequences, and on small
        # models few large batches take a third of the time of many small ones (measured on the demo).
        vocab = int(getattr(self.model.config, "vocab_size", 0) or 1)
        longest = max((len(s) for s in seqs), default=1)
        per = max(batch_size, max_logits // max(1, longest * vocab))
        self.batches = [make_batch(seqs[s : s + per], self.pad_id, dev) for s in range(0, len(seqs), per)]
        with torch.no_grad():
            self.ref_logp = [torch.log_softmax(self._logits(self.theta_s, b.input_ids, b.attention_mask), -1) for b in self.batches]
        self.lr = 1.0
        self.momentum = 0.0

    def _logits(self, params, ids, att):
        with math_attention():  # twice differentiable, unlike the fused kernels
            return functional_call(self.model, params, (ids,), {"attention_mask": att, "use_cache": False}).logits.to(self.theta_s[next(iter(self.theta_s))].dtype)

    def set_damping(self, dampings: dict[str, float]) -> None:
        """The per-module damping λ of the proximity term (a step costs the same whatever it is)."""
        for tm in self.tracked:
            for kind in ("weight", "bias") if tm.bias else ("weight",):
                self.decay[f"{tm.name}.{kind}"] = float(dampings[tm.name])

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

    def _logprobs(self, params, tokens) -> torch.Tensor:
        """``log p(tokens[t] | tokens[:t])`` for ``t >= 1``: ``[T - 1]``."""
        ids = torch.as_tensor(np.asarray(tokens, np.int64), device=self.device)[None]
        logp = torch.log_softmax(self._logits(params, ids, torch.ones_like(ids)), -1)[0, :-1]
        return logp.gather(1, ids[0, 1:, None])[:, 0]

    def _loss(self, params, tokens, start: int = 1) -> torch.Tensor:
        return -self._logprobs(params, tokens)[start - 1 :].sum()

    def _weighted(self, logp: torch.Tensor, weights: np.ndarray) -> torch.Tensor:
        # Weights of 1 (log p(completion)) leave the sum as it always was, in the model's precision.
        if np.all(weights == 1.0):
            return logp.sum()
        return (logp * torch.as_tensor(weights, dtype=logp.dtype, device=logp.device)).sum()

    def measurements(self, params, measured) -> np.ndarray:
        """Each query's measurement under ``params`` (``measured[q]``: its :class:`inflq.MeasurementTerm` s)."""
        with torch.no_grad():
            return np.array([
                sum(float(self._weighted(self._logprobs(params, t.tokens)[int(t.start) - 1 :], t.weights)) for t in terms)
                for terms in measured
            ])

    def solve(self, z: np.ndarray, eps: float, steps: int, monitor: Monitor | None = None, advance: bool = False) -> dict[str, torch.Tensor]:
        """Minimise the PBRF objective for sequence ``z`` up-weighted by ``eps``, ``steps`` steps from
        θ_s; ``advance``: one unit of the monitor's phase per step (a steady progress cadence)."""
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
                if advance:
                    monitor.advance(1)
        for v in theta.values():
            if not torch.isfinite(v).all():
                raise InflqError("the PBRF optimisation diverged; lower --pbrf-steps or check the model")
        return theta


def validate(
    project: Project,
    investigation: str,
    estimators: list[str] | None = _DEFAULT.estimators,
    sample: int = _DEFAULT.sample,
    dampings: list[float] | None = _DEFAULT.dampings,
    queries: int | None = _DEFAULT.queries,
    fit_sequences: int | None = _DEFAULT.fit_sequences,
    epsilon: float | None = _DEFAULT.epsilon,
    pbrf_steps: int = _DEFAULT.pbrf_steps,
    pbrf_damping: float | None = _DEFAULT.pbrf_damping,
    seed: int = _DEFAULT.seed,
    batch_size: int = _DEFAULT.batch_size,
    modules: str | None = None,
    max_minutes: float = _DEFAULT.max_minutes,
    monitor: Monitor | None = None,
    save: bool = True,
) -> Validation:
    """Correlate estimators' influence scores with PBRF influences on a sample of fitting sequences.

    ``estimators``: specs (default: the registry's comparison set, ``Registry.comparison``).
    ``dampings`` sweeps the default estimator's absolute damping (``ekfac:damping=λ`` among the
    built-ins) and recommends the value with the best Pearson correlation. ``queries``: the first
    that many of the investigation's queries (default 3). Refuses (with its estimated cost) a
    sample whose PBRF solves would take longer than ``max_minutes`` (timed on one PBRF step before
    anything else). Refuses a sample below :data:`inflq.validations.MIN_SAMPLE` (a correlation over
    so few points has no interval; over 2 it is always ±1) and warns below
    :data:`inflq.validations.STEADY_SAMPLE`. Progress comes step by step (phase ``PBRF``:
    ``2 × sample × pbrf_steps`` steps).
    """
    monitor = monitor or Monitor()
    specs, swept = compared_specs(estimators, dampings)
    project.require_model()
    queries = PBRF_QUERIES if queries is None else queries
    qrows = catalog.queries(project.db, investigation)[: max(1, queries)]
    if not qrows:
        raise InflqError(f"investigation {investigation!r} has no queries; add one with `inflq query add`")
    store = project.runtime.corpus
    fit = fit_indices(len(store), fit_sequences, seed)
    n = len(fit)
    if sample < MIN_SAMPLE:
        raise InflqError(f"--sample {sample} is too small: a correlation over {plural(sample, 'sequence')} "
                         f"{'is always ±1' if sample <= 2 else 'has no confidence interval'}; use --sample {STEADY_SAMPLE} or more (at least {MIN_SAMPLE})")
    if sample > n:
        raise InflqError(f"--sample {sample} is larger than the {n} fitting sequences; lower it or raise --fit-sequences")
    if pbrf_steps < 1:
        raise InflqError("--pbrf-steps must be at least 1")
    small = sample_warning(sample, len(qrows))
    if small:
        monitor.warn(small)
    rng = np.random.default_rng(seed + 1)
    chosen = np.sort(rng.choice(fit, size=sample, replace=False)).astype(np.int64)
    eps = float(epsilon) if epsilon is not None else 1.0 / n
    toks = [measure(project.runtime, q) for q in qrows]  # each query's measurement, as its gradient is taken
    engine = project.runtime.engine(modules)

    # The cost first: one timed step (no damping yet: a step costs the same whatever it is), then
    # refuse before spending minutes on the damping pass and the step size's power iteration.
    pbrf = PBRF(project, modules, fit, {tm.name: 0.0 for tm in engine.tracked}, batch_size)
    monitor.start("PBRF step timing", 2)
    pbrf.lr, pbrf.momentum = 0.0, 0.0
    pbrf.solve(store.get(int(chosen[0])), eps, 1, monitor)  # warm-up (first-call allocations)
    monitor.advance(1)
    t = time.perf_counter()
    pbrf.solve(store.get(int(chosen[0])), eps, 1, monitor)
    per_step = time.perf_counter() - t
    monitor.advance(1)
    per_solve = per_step * pbrf_steps
    total = per_solve * 2 * sample
    if total > max_minutes * 60:
        raise InflqError(
            f"a sample of {sample} needs about {total / 60:.0f} min of PBRF solves ({per_solve:.1f} s per solve × {2 * sample}); "
            f"lower --sample or --pbrf-steps, or raise --max-minutes"
        )
    monitor.note(f"PBRF: {plural(2 * sample, 'solve')} of {plural(pbrf_steps, 'step')}, about {total / 60:.1f} min ({per_step:.2f} s per step)")

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
    pbrf.set_damping(pb_damp)

    # Ground truth.
    pbrf.tune(monitor=monitor)
    base = pbrf.measurements(pbrf.theta_s, toks)
    truth = np.zeros((len(qrows), sample))
    monitor.start("PBRF", 2 * sample * pbrf_steps)
    t0 = time.perf_counter()
    for j, idx in enumerate(chosen):
        z = store.get(int(idx))
        up = pbrf.measurements(pbrf.solve(z, eps, pbrf_steps, monitor, advance=True), toks) - base
        down = pbrf.measurements(pbrf.solve(z, -eps, pbrf_steps, monitor, advance=True), toks) - base
        truth[:, j] = (up - down) / (2 * eps)
    pbrf_seconds = time.perf_counter() - t0
    del pbrf

    # Estimators, each timed: fitting (or preparing) and the inverse-HVPs of the query gradients.
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
    recommended = best_damping(rows, swept, lambda r: r.pearson)
    used = {
        "queries": [q["id"] for q in qrows], "sample": [int(i) for i in chosen], "fit_sequences": n, "epsilon": eps,
        "pbrf_steps": pbrf_steps, "pbrf_damping": pb_damp, "pbrf_seconds": pbrf_seconds, "pbrf_seconds_per_solve": pbrf_seconds / (2 * sample),
        "seed": seed, "modules": engine.names, "optimizer": "SGD + Nesterov momentum, float64", "recommended_damping": recommended,
        "damping_sweep": swept,
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
