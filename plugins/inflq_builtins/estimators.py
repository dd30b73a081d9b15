"""Built-in estimators: the gradient dot product (identity), EK-FAC, K-FAC and diagonal.

EK-FAC follows METHOD.md: per tracked module, covariances ``A = E[ā āᵀ]`` and ``S = E[g gᵀ]`` over
tokens with labels sampled from the model (the true Fisher), their float64 eigendecompositions, and
a second pass that refits the eigenvalues in the Kronecker eigenbasis,
``Λ = E_seq[(Q_Sᵀ DW Q_A)²]``. The inverse-Hessian-vector product is
``Q_S [(Q_Sᵀ V Q_A) ⊘ (Λ + λ)] Q_Aᵀ`` with ``λ = 0.1 × mean(Λ)`` unless a damping is given.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from inflq import Estimator, FitContext, Option, SumPass, hookimpl

if TYPE_CHECKING:  # torch is imported where it is used: importing a plugin must stay cheap
    import torch


@hookimpl
def register_estimators(register):
    register(GradientDotProduct)
    register(EKFAC)
    register(KFAC)
    register(Diagonal)


class GradientDotProduct(Estimator):
    """Identity preconditioner: ``score = ⟨∇ measurement, ∇ training loss⟩``. The naive baseline."""

    name = "identity"
    description = "gradient dot product (no Hessian): the naive baseline"
    compared = 0  # inflq validate's default comparison: the baseline, EK-FAC, LiSSA

    def precondition(self, grads):
        return grads


class CovariancePass(SumPass):
    """Sums ``ā āᵀ`` and ``g gᵀ`` over tokens (padding contributes zeros). ``A/<module>`` and
    ``S/<module>`` hold the sums' upper triangles, packed (:func:`inflq.linalg.pack_upper`: half the
    memory of the squares, 1.3 GB instead of 2.6 GB for GPT-2 small); read them with
    :func:`symmetric` or :func:`inflq.linalg.unpack_upper`. ``modules``: only these modules' sums (a fit
    by module), else all."""

    phase = "covariance"
    labels = "sampled"

    def __init__(self, labels: str = "sampled", modules: tuple[str, ...] | None = None) -> None:
        self.labels = labels
        self.modules = modules

    def _parts(self, batch, captures):
        """This batch's sums one by one (float32 Gram matrices' upper triangles, summed in float64)."""
        import torch

        from inflq._builtins_api import gram, pack_upper

        yield "tokens", batch.attention_mask.sum().to(torch.float64).reshape(1)
        yield "sequences", torch.tensor([float(batch.size)], dtype=torch.float64, device=batch.input_ids.device)
        for name, cap in self.selected(captures):
            yield f"A/{name}", pack_upper(gram(cap.activations.reshape(-1, cap.activations.shape[-1]), symmetric=False))
            yield f"S/{name}", pack_upper(gram(cap.gradients.reshape(-1, cap.gradients.shape[-1]), symmetric=False))

    def accumulate(self, engine, batch, captures, sums):
        """The sums of :meth:`_parts`, bitwise, with each Gram matrix written into one of the
        engine's buffers and its upper triangle added straight into the packed sum (no fresh
        square, no packed copy per batch; a running sum of squares, from a fit resumed from
        before the packing, is packed first)."""
        import torch

        from inflq import add_into
        from inflq._builtins_api import gram

        add_into(sums, {"tokens": batch.attention_mask.sum().to(torch.float64).reshape(1)}, torch.float64)
        add_into(sums, {"sequences": torch.tensor([float(batch.size)], dtype=torch.float64)}, torch.float64)
        for name, cap in self.selected(captures):
            for key, x in (("A", cap.activations), ("S", cap.gradients)):
                x = x.reshape(-1, x.shape[-1])
                d = x.shape[1]
                square = gram(x, symmetric=False, out=engine.buffer(("gram", d), (d, d), x.dtype, x.device))
                add_into(sums, {f"{key}/{name}": square}, torch.float64, packed=True)


def covariance_bytes(tm) -> int:
    """What one module adds to the covariance pass's float64 sums: ``A`` and ``S``, packed upper
    triangles (:func:`inflq.linalg.pack_upper`)."""
    return 8 * (tm.in_dim * (tm.in_dim + 1) // 2 + tm.out_features * (tm.out_features + 1) // 2)


def correction_bytes(tm) -> int:
    """What one module costs the eigenvalue-correction pass: its float64 ``Λ`` sums and the float32
    eigenvectors the pass carries."""
    return 8 * tm.out_features * tm.in_dim + 4 * (tm.in_dim**2 + tm.out_features**2)


def symmetric(upper: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper triangle is ``upper``'s (a square matrix, or one packed by
    :func:`inflq.linalg.pack_upper`)."""
    import torch

    from inflq._builtins_api import unpack_upper

    upper = unpack_upper(upper)
    return torch.triu(upper) + torch.triu(upper, 1).T


def eigendecompose_sum(packed: torch.Tensor, tokens: float, device: torch.device | str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 eigenvalues and float32 eigenvectors of the covariance whose float64 sum over
    ``tokens`` tokens has the upper triangle ``packed`` (:func:`inflq.linalg.pack_upper`), computed on
    ``device`` through :func:`inflq.linalg.eigh` (float64; CUDA where ``device`` is a CUDA device);
    ``None``: this process's own device, its CUDA device if it has one (a Ray worker's GPU), else
    the CPU. Pass ``packed`` as the only reference to it: it is dropped once unpacked, so memory
    holds one square at a time."""
    import torch

    from inflq._builtins_api import eigh, unpack_upper

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    m = unpack_upper(packed)
    del packed
    m /= tokens
    values, vectors = eigh(m, device)
    del m
    return values, vectors.to(torch.float32)


def eigendecompose_task(task: dict, monitor) -> tuple[torch.Tensor, torch.Tensor]:
    """One eigendecomposition as an executor's task (``FitContext.run_tasks``): ``task`` holds the
    packed ``sum``, its ``tokens`` and the ``device`` (:func:`eigendecompose_sum`). The sum leaves
    the task as it is decomposed."""
    return eigendecompose_sum(task.pop("sum"), task["tokens"], task["device"])


def rotate_first_is_cheaper(tokens: int, out: int, inn: int) -> bool:
    """Rotating each token costs T(in² + out²) + T·in·out; forming DW then rotating costs
    T·in·out + in·out·(in + out). Per sequence."""
    return tokens * (inn * inn + out * out) < out * inn * (inn + out)


_CHUNK_BYTES = 4 << 20  # rotated per-sequence gradients squared and summed this many bytes at a time


class EigenCorrectionPass(SumPass):
    """Sums ``(Q_Sᵀ DW_i Q_A)²`` over sequences, contracting in whichever order is cheaper.
    ``modules``: only these modules (a fit by module; ``qa`` and ``qs`` then hold only theirs)."""

    phase = "eigenvalue correction"
    labels = "sampled"

    def __init__(self, qa: dict[str, torch.Tensor], qs: dict[str, torch.Tensor], labels: str = "sampled",
                 modules: tuple[str, ...] | None = None) -> None:
        self.qa = qa
        self.qs = qs
        self.labels = labels
        self.modules = modules
        self._on_device: dict = {}

    def __getstate__(self):
        return {**self.__dict__, "_on_device": {}}

    def _bases(self, name: str, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``Q_A``, ``Q_S`` of a module in float32 on ``device`` (copied there once per pass)."""
        import torch

        key = (name, str(device))
        got = self._on_device.get(key)
        if got is None:
            got = self._on_device[key] = (self.qa[name].to(device, torch.float32), self.qs[name].to(device, torch.float32))
        return got

    def accumulate(self, engine, batch, captures, sums):
        """The sums of :meth:`_parts`, computed in the engine's buffers: the tokens rotated into
        the eigenbasis once per batch (``G Q_S``, ``A Q_A``), then each group of sequences'
        ``(Q_Sᵀ DW Q_A)²``, small enough to stay in cache while it is squared, summed in float32
        and the batch's sum added once into the float64 sums. Equal to :meth:`_parts`' sums to
        float32 rounding (the float32 sum over the batch's sequences runs by group)."""
        import torch

        from inflq import add_into

        add_into(sums, {"sequences": torch.tensor([float(batch.size)], dtype=torch.float64)}, torch.float64)
        for name, cap in self.selected(captures):
            add_into(sums, {f"L/{name}": self._squares(engine, name, cap)}, torch.float64)

    def _squares(self, engine, name: str, cap) -> torch.Tensor:
        import torch

        qa, qs = self._bases(name, cap.activations.device)
        g, a = cap.gradients, cap.activations
        if g.shape[1] > 1 and not bool(g[:, -1].any()):
            # The batch's last position has no loss term (a sequence's last token, or padding), so
            # its output gradients are zero and it adds nothing to DW: a token less to rotate.
            g, a = g[:, :-1], a[:, :-1]
        B, T, o = g.shape
        i = a.shape[-1]
        dev = g.device
        chunk = max(1, min(B, _CHUNK_BYTES // (4 * o * i)))
        total = engine.buffer(("correction sum", o, i), (o, i), torch.float32, dev)
        part = engine.buffer(("correction part", o, i), (o, i), torch.float32, dev)
        rotated = engine.buffer(("correction rotated", o, i), (chunk, o, i), torch.float32, dev)
        if rotate_first_is_cheaper(T, o, i):
            gq = torch.mm(g.reshape(-1, o), qs, out=engine.buffer(("rotated gradients", o), (B * T, o), torch.float32, dev)).view(B, T, o)
            aq = torch.mm(a.reshape(-1, i), qa, out=engine.buffer(("rotated activations", i), (B * T, i), torch.float32, dev)).view(B, T, i)

            def rotate(s, e, out):
                return torch.bmm(gq[s:e].transpose(1, 2), aq[s:e], out=out)
        else:
            dw = engine.buffer(("correction dw", o, i), (chunk, o, i), torch.float32, dev)

            def rotate(s, e, out):
                d = torch.bmm(g[s:e].transpose(1, 2), a[s:e], out=dw[: e - s])
                half = torch.matmul(qs.T, d, out=engine.buffer(("correction half", o, i), (e - s, o, i), torch.float32, dev))
                return torch.matmul(half, qa, out=out)

        for s in range(0, B, chunk):
            e = min(B, s + chunk)
            r = rotate(s, e, rotated[: e - s]).square_()
            if s == 0:
                torch.sum(r, 0, out=total)
            else:
                total += torch.sum(r, 0, out=part)
        return total

    def _parts(self, batch, captures):
        """This batch's sums one module at a time (float32, summed in float64)."""
        import torch

        yield "sequences", torch.tensor([float(batch.size)], dtype=torch.float64)
        for name, cap in self.selected(captures):
            qa = self.qa[name].to(cap.activations.device, torch.float32)
            qs = self.qs[name].to(cap.activations.device, torch.float32)
            g, a = cap.gradients, cap.activations
            T = g.shape[1]
            if rotate_first_is_cheaper(T, g.shape[-1], a.shape[-1]):
                rot = torch.bmm((g @ qs).transpose(1, 2), a @ qa)
            else:
                rot = qs.T @ cap.sequence_gradients() @ qa
            yield f"L/{name}", rot.square_().sum(0)


class DiagonalPass(SumPass):
    """Sums ``DW_i²`` over sequences: the diagonal of the Fisher."""

    phase = "diagonal"
    labels = "sampled"

    def __init__(self, labels: str = "sampled", modules: tuple[str, ...] | None = None) -> None:
        self.labels = labels
        self.modules = modules

    def _parts(self, batch, captures):
        import torch

        yield "sequences", torch.tensor([float(batch.size)], dtype=torch.float64)
        for name, cap in self.selected(captures):
            dw = cap.sequence_gradients()
            yield f"D/{name}", (dw * dw).sum(0)


_FISHER = Option(
    "fisher", str, "true", "true: labels sampled from the model (the Gauss-Newton matrix); empirical: the data's own labels",
    choices=("true", "empirical"),
)
_DAMPING = (
    Option("damping", float, None, "absolute damping λ added to every eigenvalue (default: damping_factor × mean eigenvalue, per module)"),
    Option("damping_factor", float, 0.1, "λ = damping_factor × mean(Λ) per module, when no absolute damping is given"),
    _FISHER,
)


def damping_summary(described: dict) -> str:
    """The damping a result was computed with, from ``describe()``: the rule and the mean λ over
    modules (``damping 0.1 × mean eigenvalue (λ mean 0.002)``); empty without per-module dampings."""
    per_module = described.get("damping_per_module")
    if not isinstance(per_module, dict) or not per_module:
        return ""
    mean = sum(per_module.values()) / len(per_module)
    how = f"{described['damping']:.3g}" if described.get("damping") is not None else f"{described.get('damping_factor', 0.1):g} × mean eigenvalue"
    return f"damping {how} (λ mean {mean:.3g})"


class _FisherEstimator(Estimator):
    """Shared by the fitted estimators: the Fisher's labels and the damping rule."""

    fits_factors = True
    options = _DAMPING

    def __init__(self, **options):
        super().__init__(**options)
        self.factors: dict[str, torch.Tensor] = {}
        self.dampings: dict[str, float] = {}

    def factor_settings(self):
        if self.settings["fisher"] != "true":
            return {"fisher": self.settings["fisher"]}
        from inflq._builtins_api import SAMPLED_AT

        # Where the labels were sampled changes the factors: part of the cache key, recorded with them.
        return {"fisher": "true", "sampled_at": SAMPLED_AT}

    @property
    def _labels(self) -> str:
        return "sampled" if self.settings["fisher"] == "true" else "data"

    def _damping(self, eigenvalues: torch.Tensor) -> float:
        import torch

        if self.settings["damping"] is not None:
            return float(self.settings["damping"])
        return float(self.settings["damping_factor"]) * float(eigenvalues.to(torch.float64).mean())

    def describe(self):
        d = dict(self.settings)
        if self.dampings:
            d["damping_per_module"] = self.dampings
        return d

    @classmethod
    def summarize(cls, described):
        return damping_summary(described)


class _Eigenbasis(_FisherEstimator):
    """Shared by EK-FAC and K-FAC: factors are ``Q_A``, ``Q_S`` and eigenvalues ``Λ`` per module."""

    def _eigendecompose(self, ctx: FitContext) -> tuple[dict, dict, dict, dict, dict]:
        """Eigenvectors (float32: all that the factors keep) and float64 eigenvalues of A and S
        per module, one task each (:func:`eigendecompose_task`) on the executor's workers
        (``ctx.run_tasks``): in this process, in order, on the local executor. Each covariance sum
        leaves the driver's dict as its task is sent (packed: half a square's bytes), so memory
        holds one set of sums, shrinking as the eigenvectors arrive. Fitting by module
        (``ctx.memory``), one covariance pass per group of modules, each group decomposed before
        the next is summed: memory holds one group's sums."""
        from inflq import InflqError

        qa, qs, la, ls = {}, {}, {}, {}
        counts: dict[str, float] = {}
        by_name = {tm.name: tm for tm in ctx.tracked}
        device = ctx.task_device
        for group in ctx.groups(covariance_bytes, "covariance sums"):
            cov = ctx.run_pass(CovariancePass(self._labels, group))
            counts = {"tokens": float(cov["tokens"].sum()), "sequences": float(cov["sequences"].sum())}
            if counts["tokens"] <= 0:
                raise ValueError("no fitting tokens")
            names = list(by_name) if group is None else list(group)
            order = [(name, key) for name in names for key in ("A", "S")]
            if ctx.remote_tasks:  # on several workers the largest first, so that none is left with a long one at the end
                sizes = {(name, key): cov[f"{key}/{name}"].numel() for name, key in order}
                order.sort(key=sizes.__getitem__, reverse=True)
            halves = dict.fromkeys(names, 0)
            ctx.monitor.start("eigendecomposition", len(names))

            def tasks(cov=cov, order=order, tokens=counts["tokens"]):
                for name, key in order:  # one sum out of the driver's dict per task sent
                    yield {"sum": cov.pop(f"{key}/{name}"), "tokens": tokens, "device": device}

            def on_result(i, out, order=order, halves=halves):
                name, key = order[i]
                values, vectors = (la, qa) if key == "A" else (ls, qs)
                values[name], vectors[name] = out
                halves[name] += 1
                if halves[name] == 2:
                    ctx.monitor.advance(1)

            ctx.run_tasks(eigendecompose_task, tasks(), on_result)
            missing = [n for n, h in halves.items() if h != 2]
            if missing:
                raise InflqError(f"the executor returned no eigendecomposition of {', '.join(missing)}; rerun the fit")
            del cov
        return qa, qs, la, ls, counts

    def load_factors(self, tensors):
        self.factors = tensors
        self.dampings = {k[len("lambda/") :]: self._damping(v) for k, v in tensors.items() if k.startswith("lambda/")}

    def _rotated(self, grads):
        """``(Q_Sᵀ V Q_A) ⊘ (Λ + λ)`` per module: the preconditioned gradients in the eigenbasis."""
        import torch

        out = {}
        factors = getattr(grads, "factors", None) or {}
        for name, v in grads.items():
            qa = self.factors[f"qa/{name}"].to(v.device, torch.float32)
            qs = self.factors[f"qs/{name}"].to(v.device, torch.float32)
            lam = self.factors[f"lambda/{name}"].to(v.device, torch.float32)
            if name in factors and rotate_first_is_cheaper(factors[name][0].shape[1], v.shape[1], v.shape[2]):
                g, a = factors[name]  # Q_Sᵀ (Gᵀ A) Q_A = (G Q_S)ᵀ (A Q_A): rotate the tokens
                rot = torch.bmm((g.to(torch.float32) @ qs).transpose(1, 2), a.to(torch.float32) @ qa)
            else:
                rot = qs.T @ v.to(torch.float32) @ qa
            out[name] = rot / (lam + self.dampings[name])
        return out

    def precondition(self, grads):
        import torch

        rotated = self._rotated(grads)
        return {
            n: self.factors[f"qs/{n}"].to(r.device, torch.float32) @ r @ self.factors[f"qa/{n}"].to(r.device, torch.float32).T
            for n, r in rotated.items()
        }

    def precondition_queries(self, grads, rank):
        from inflq import QueryGradients

        names = list(grads)
        return QueryGradients.from_eigenbasis(
            self._rotated(grads), {n: self.factors[f"qs/{n}"] for n in names}, {n: self.factors[f"qa/{n}"] for n in names}, rank
        )


class EKFAC(_Eigenbasis):
    """Eigenvalue-corrected K-FAC (George et al. 2018), the paper's estimator."""

    name = "ekfac"
    default = True
    compared = 1
    description = "EK-FAC: Kronecker-factored eigenbasis with refitted eigenvalues (the paper's estimator)"

    def fit(self, ctx):
        import torch

        qa, qs, _, _, counts = self._eigendecompose(ctx)
        lam = {}
        for group in ctx.groups(correction_bytes, "eigenvalue-correction sums"):  # a pass per group, as the covariance
            names = [tm.name for tm in ctx.tracked] if group is None else group
            corr = ctx.run_pass(EigenCorrectionPass({n: qa[n] for n in names}, {n: qs[n] for n in names}, self._labels, group))
            seqs = float(corr["sequences"].sum())
            for name in names:
                lam[name] = (corr.pop(f"L/{name}") / seqs).to(torch.float32)
            del corr
        out = {}
        for tm in ctx.tracked:
            out[f"qa/{tm.name}"] = qa[tm.name]
            out[f"qs/{tm.name}"] = qs[tm.name]
            out[f"lambda/{tm.name}"] = lam[tm.name]
        self.load_factors(out)
        return out


class KFAC(_Eigenbasis):
    """K-FAC: ``G ≈ A ⊗ S``. Eigenvalues ``λ_S λ_Aᵀ`` are scaled by the mean tokens per sequence, so
    that K-FAC approximates the same per-sequence Gauss-Newton matrix as EK-FAC."""

    name = "kfac"
    description = "K-FAC: Kronecker-factored Gauss-Newton (no eigenvalue correction)"

    def fit(self, ctx):
        import torch

        qa, qs, la, ls, counts = self._eigendecompose(ctx)
        scale = counts["tokens"] / counts["sequences"]
        out = {}
        for tm in ctx.tracked:
            lam = torch.outer(ls[tm.name].clamp_min(0), la[tm.name].clamp_min(0)) * scale
            out[f"qa/{tm.name}"] = qa[tm.name]
            out[f"qs/{tm.name}"] = qs[tm.name]
            out[f"lambda/{tm.name}"] = lam.to(torch.float32)
        self.load_factors(out)
        return out


class Diagonal(_FisherEstimator):
    """Diagonal Fisher: ``G ≈ diag(E_seq[DW²])``."""

    name = "diagonal"
    description = "diagonal Gauss-Newton (per-parameter)"

    def fit(self, ctx):
        import torch

        diag = {}
        for group in ctx.groups(lambda tm: 8 * tm.out_features * tm.in_dim, "diagonal sums"):
            d = ctx.run_pass(DiagonalPass(self._labels, group))
            seqs = float(d["sequences"].sum())
            for name in [tm.name for tm in ctx.tracked] if group is None else group:
                diag[name] = (d.pop(f"D/{name}") / seqs).to(torch.float32)
        out = {f"diag/{tm.name}": diag[tm.name] for tm in ctx.tracked}
        self.load_factors(out)
        return out

    def load_factors(self, tensors):
        self.factors = tensors
        self.dampings = {k[len("diag/") :]: self._damping(v) for k, v in tensors.items()}

    def precondition(self, grads):
        import torch

        return {
            n: v.to(torch.float32) / (self.factors[f"diag/{n}"].to(v.device) + self.dampings[n]) for n, v in grads.items()
        }
