"""LiSSA: the iterative inverse-Hessian-vector product the paper compares EK-FAC against.

For each query gradient ``v`` (all queries of a run iterate in lockstep on the same mini-batches):

    x_0 = v,    x_{j+1} = v + (I − (G_b + λI)/s) x_j,    (G + λI)⁻¹ v ≈ x_J / s

averaged over ``repeats`` independent recursions. ``G_b`` is the **exact** Gauss-Newton matrix of
mini-batch ``b`` of the fitting data (not the sampled-label Fisher): the product ``G_b x`` is a
forward-mode ``torch.func.jvp`` through the model to the logits, multiplication by the softmax
output Hessian ``diag(p) − p pᵀ`` at every position where the training loss has a term (a next
token exists), and a ``torch.func.vjp`` back to the tracked parameters. Its normalisation is
EK-FAC's: the mean over sequences of the per-sequence summed-loss Gauss-Newton matrix (the same
positions as EK-FAC's sampled-label passes), so the same damping means the same thing for both
estimators.

Convergence needs ``s`` above the largest eigenvalue of ``G_b + λI``; by default ``s`` is twice the
largest eigenvalue found by power iteration on a few mini-batches. A recursion that grows faster
than a contraction can (``‖x_j‖ > 2 (j + 1) ‖v‖``) or turns non-finite is stopped with an error
that asks for a larger scale. The relative residual ``‖(G_b + λI) x − v‖ / ‖v‖`` on fresh
mini-batches is recorded per query (``describe()``, hence in the result set's settings).
"""

from __future__ import annotations

import itertools
import math
import time
from typing import TYPE_CHECKING, Any

from inflq import Estimator, FitContext, InflqError, Option, hookimpl

if TYPE_CHECKING:
    import torch

    from inflq import Batch, TrackedModule


@hookimpl
def register_estimators(register):
    register(LiSSA)


class GaussNewtonProduct:
    """Exact Gauss-Newton-vector products over the tracked modules' parameters.

    Vectors are dicts ``{module: [k, out, in_dim]}`` in inflq's layout (bias as the last column),
    ``k`` vectors at a time.
    """

    def __init__(self, model: torch.nn.Module, tracked: list[TrackedModule]) -> None:
        self.model = model
        self.tracked = tracked
        self.params: dict[str, torch.Tensor] = {}
        for tm in tracked:
            self.params[f"{tm.name}.weight"] = tm.module.weight.detach()
            if tm.bias:
                self.params[f"{tm.name}.bias"] = tm.module.bias.detach()

    def to_params(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for tm in self.tracked:
            v = x[tm.name]
            w = v[..., : tm.in_features]
            w = w.transpose(-1, -2) if tm.transposed else w
            out[f"{tm.name}.weight"] = w.to(self.params[f"{tm.name}.weight"].dtype).contiguous()
            if tm.bias:
                out[f"{tm.name}.bias"] = v[..., tm.in_features].to(self.params[f"{tm.name}.bias"].dtype).contiguous()
        return out

    def from_params(self, p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        import torch

        out = {}
        for tm in self.tracked:
            w = p[f"{tm.name}.weight"].to(torch.float32)
            w = w.transpose(-1, -2) if tm.transposed else w
            out[tm.name] = torch.cat([w, p[f"{tm.name}.bias"].to(torch.float32)[..., None]], dim=-1) if tm.bias else w
        return out

    def __call__(self, batch: Batch, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``G_b x`` for each of the ``k`` vectors in ``x``: mean over the batch's sequences of
        ``Σ_t J_tᵀ (diag p_t − p_t p_tᵀ) J_t x`` over the training loss's positions."""
        import torch
        from torch.func import functional_call, jvp, vjp, vmap

        from inflq import math_attention

        ids, att = batch.input_ids, batch.attention_mask

        def logits(p):
            return functional_call(self.model, p, (ids,), {"attention_mask": att, "use_cache": False}).logits.float()

        saved = [(p, p.requires_grad) for p in self.model.parameters()]
        try:
            for p, _ in saved:
                p.requires_grad_(False)
            with math_attention():  # forward-mode AD needs the math kernel
                out, pullback = vjp(logits, self.params)
                tangents = self.to_params(x)
                jx = vmap(lambda t: jvp(logits, (self.params,), (t,))[1])(tangents)  # [k, B, T, V]
                prob = torch.softmax(out.detach(), dim=-1)
                hjx = prob * (jx - (prob * jx).sum(-1, keepdim=True))
                hjx = hjx * batch.loss_mask.to(hjx.dtype)[None, :, :, None]
                back = vmap(pullback)(hjx.to(out.dtype))[0]
        finally:
            for p, flag in saved:
                p.requires_grad_(flag)
        return {n: v / batch.size for n, v in self.from_params(back).items()}


def _norms(x: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-vector norms ``[k]`` over all modules."""
    import torch

    return torch.sqrt(sum((v.double() ** 2).flatten(1).sum(1) for v in x.values()))


class LiSSA(Estimator):
    """LiSSA (Agarwal et al. 2017) with exact Gauss-Newton-vector products on fitting mini-batches."""

    name = "lissa"
    description = "LiSSA: iterative inverse-HVP with exact Gauss-Newton products (the paper's baseline)"
    compared = 2
    options = (
        Option("damping", float, None, "absolute damping λ (default: damping_factor × mean Gauss-Newton eigenvalue, per module, as EK-FAC)"),
        Option("damping_factor", float, 0.1, "λ = damping_factor × mean eigenvalue per module, when no damping is given"),
        Option("scale", float, None, "s: must exceed the largest eigenvalue of G + λI (default: 2 × power-iteration estimate)"),
        Option("depth", int, 1000, "recursion depth J (mini-batches per recursion)"),
        Option("repeats", int, 1, "independent recursions averaged"),
        Option("batch_size", int, 8, "fitting sequences per mini-batch"),
        Option("query_chunk", int, 8, "query vectors iterated together (memory: chunk × batch × tokens × vocabulary)"),
    )

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if self.settings["depth"] < 1 or self.settings["repeats"] < 1 or self.settings["batch_size"] < 1:
            raise InflqError("lissa: depth, repeats and batch_size must be at least 1")
        if self.settings["scale"] is not None and self.settings["scale"] <= 0:
            raise InflqError("lissa: scale must be positive")
        self.ctx: FitContext | None = None
        self.gn: GaussNewtonProduct | None = None
        self.dampings: dict[str, float] = {}
        self.scale: float | None = None
        self.residuals: list[float] = []
        self.ihvp_seconds = 0.0

    # -- preparation: damping and scale ---------------------------------------------------------
    def prepare(self, ctx: FitContext) -> None:
        if ctx.indices is None or ctx.sequences is None:
            raise InflqError("lissa needs the fitting data at precondition time; run it through inflq.runs")
        self.ctx = ctx
        self.gn = GaussNewtonProduct(ctx.engine.model, ctx.tracked)
        bs = min(self.settings["batch_size"], len(ctx.indices))
        if self.settings["damping"] is not None:
            self.dampings = {tm.name: float(self.settings["damping"]) for tm in ctx.tracked}
        else:
            # mean eigenvalue of a module's block = trace / size = E_seq ‖DW‖² / size with sampled
            # labels (the true Fisher equals the Gauss-Newton matrix), EK-FAC's mean(Λ) in expectation.
            n_seq = min(len(ctx.indices), 256)
            sums = {tm.name: 0.0 for tm in ctx.tracked}
            seen = 0
            for batch in itertools.islice(ctx.batches(bs, seed=ctx.seed + 7), max(1, math.ceil(n_seq / bs))):
                for name, dw in ctx.engine.sequence_gradients(batch, "sampled").items():
                    sums[name] += float((dw.double() ** 2).sum())
                seen += batch.size
            self.dampings = {
                tm.name: float(self.settings["damping_factor"]) * sums[tm.name] / seen / (tm.out_features * tm.in_dim)
                for tm in ctx.tracked
            }
        if self.settings["scale"] is not None:
            self.scale = float(self.settings["scale"])
        else:
            self.scale = 2.0 * self._largest_eigenvalue(bs) + max(self.dampings.values())

    def _largest_eigenvalue(self, batch_size: int, batches: int = 3, iterations: int = 20) -> float:
        """Power iteration on ``G_b`` for a few mini-batches; the largest estimate."""
        import torch

        assert self.ctx is not None and self.gn is not None
        gen = torch.Generator().manual_seed(self.ctx.seed + 11)
        best = 0.0
        for batch in itertools.islice(self.ctx.batches(batch_size, seed=self.ctx.seed + 13), batches):
            x = {tm.name: torch.randn((1, *tm.shape), generator=gen).to(self.ctx.engine.device) for tm in self.ctx.tracked}
            est = 0.0
            for _ in range(iterations):
                nx = float(_norms(x)[0])
                x = {n: v / nx for n, v in x.items()}
                y = self.gn(batch, x)
                est = float(_norms(y)[0])
                if not math.isfinite(est) or est == 0.0:
                    break
                x = y
            best = max(best, est)
        if not math.isfinite(best) or best <= 0:
            raise InflqError("lissa: could not estimate the Gauss-Newton spectrum (non-finite); give scale=... explicitly")
        return best

    # -- the recursion ----------------------------------------------------------------------------
    def precondition(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        import torch

        if self.ctx is None or self.gn is None:
            raise InflqError("lissa was not prepared with fitting data; run it through inflq.runs")
        started = time.perf_counter()
        names = [tm.name for tm in self.ctx.tracked]
        nq = int(next(iter(grads.values())).shape[0])
        chunk = max(1, int(self.settings["query_chunk"]))
        depth, repeats = int(self.settings["depth"]), int(self.settings["repeats"])
        self.ctx.monitor.start("lissa", math.ceil(nq / chunk) * repeats * depth)
        parts: list[dict[str, torch.Tensor]] = []
        residuals: list[float] = []
        for start in range(0, nq, chunk):
            v = {n: grads[n][start : start + chunk].to(self.ctx.engine.device, torch.float32) for n in names}
            total = {n: torch.zeros_like(t) for n, t in v.items()}
            for r in range(repeats):
                total = {n: total[n] + t for n, t in self._recursion(v, seed=self.ctx.seed + 1000 * r + start).items()}
            x = {n: t / repeats for n, t in total.items()}
            residuals += self._residual(x, v)
            parts.append({n: t.cpu() for n, t in x.items()})
        self.residuals = residuals
        self.ihvp_seconds += time.perf_counter() - started
        out = {n: torch.cat([p[n] for p in parts]).to(grads[n].device) for n in names}
        return {n: out[n] for n in grads}

    def _recursion(self, v: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
        import torch

        assert self.ctx is not None and self.gn is not None and self.scale is not None
        s = self.scale
        vnorm = _norms(v).clamp_min(1e-30)
        x = {n: t.clone() for n, t in v.items()}
        batches = self.ctx.batches(min(self.settings["batch_size"], len(self.ctx.indices)), seed=seed)
        for j in range(int(self.settings["depth"])):
            gx = self.gn(next(batches), x)
            x = {n: v[n] + x[n] - (gx[n] + self.dampings[n] * x[n]) / s for n in x}
            grown = _norms(x) / vnorm
            # Under contraction ‖x_j‖ ≤ (j + 1)‖v‖; faster growth means s is below the spectrum.
            if not torch.isfinite(grown).all() or bool((grown > 2.0 * (j + 2)).any()):
                raise InflqError(
                    f"lissa diverged at step {j + 1} (scale {s:.3g} is below the Gauss-Newton spectrum): "
                    f"rerun with a larger scale, e.g. --estimator lissa:scale={s * 10:.3g}"
                )
            self.ctx.monitor.advance(1)
        return {n: t / s for n, t in x.items()}

    def _residual(self, x: dict[str, torch.Tensor], v: dict[str, torch.Tensor], batches: int = 2) -> list[float]:
        """``‖(G + λI) x − v‖ / ‖v‖`` per vector, with G averaged over fresh mini-batches."""
        import torch

        assert self.ctx is not None and self.gn is not None
        gx = {n: torch.zeros_like(t) for n, t in x.items()}
        it = self.ctx.batches(min(self.settings["batch_size"], len(self.ctx.indices)), seed=self.ctx.seed + 99)
        for batch in itertools.islice(it, batches):
            for n, t in self.gn(batch, x).items():
                gx[n] += t / batches
        r = {n: gx[n] + self.dampings[n] * x[n] - v[n] for n in x}
        return [float(a) for a in (_norms(r) / _norms(v).clamp_min(1e-30)).cpu()]

    def describe(self) -> dict[str, Any]:
        d = dict(self.settings)
        d["damping_per_module"] = self.dampings
        d["scale_used"] = self.scale
        d["gauss_newton"] = "exact (jvp, softmax Hessian, vjp)"
        if self.residuals:
            d["residual"] = max(self.residuals)
            d["residuals"] = self.residuals
        d["ihvp_seconds"] = self.ihvp_seconds
        return d
