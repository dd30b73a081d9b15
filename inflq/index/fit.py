"""The index's projections and its preconditioner: EK-FAC (or K-FAC) fitted in the projected space.

With ``ā' = P_A ā`` and ``g' = P_S g`` the projected model has covariances ``A' = E[ā' ā'ᵀ]``
(``k_a × k_a``) and ``S' = E[g' g'ᵀ]`` (``k_s × k_s``), eigenbases ``Q_A'``, ``Q_S'`` and, for
EK-FAC, the corrected eigenvalues ``Λ' = E_seq[(Q_S'ᵀ DW' Q_A')²]`` of the projected gradients
``DW' = P_S DW P_Aᵀ``. The damped inverse ``Q_S' [(Q_S'ᵀ V' Q_A') ⊘ (Λ' + λ)] Q_A'ᵀ`` is exact for the
projected model and applied to queries only. With orthogonal full-width projections
``Q_S'ᵀ DW' Q_A' = Q_Sᵀ DW Q_A``: the same ``Λ``, damping and scores as EK-FAC itself.

The two fitting passes have the same phases (hence the same sampled labels) as EK-FAC's own
covariance and eigenvalue-correction passes, and run through ``FitContext.run_pass`` like any
estimator's: executors, committed fitting shards and the factor cache serve them unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import torch

from ..base import FitContext, SumPass
from ..engine import TrackedModule
from ..errors import InflqError
from ..linalg import eigh, gram
from .projection import BUDGET_BYTES, KINDS, default_sizes, random_projections, top_eigenvectors

ESTIMATORS = ("ekfac", "kfac")


@dataclass
class IndexSettings:
    """What an index is built with. ``k_s``/``k_a``: projection sizes for every module (capped at
    its width, so a large number means full width); unset, ``budget_bytes`` per sequence decides
    them (:func:`default_sizes`). ``seed`` draws random projections; the Fisher's sampled labels
    use the fitting context's seed, as EK-FAC's do."""

    kind: str = "orthogonal"
    k_s: int | None = None
    k_a: int | None = None
    budget_bytes: int = BUDGET_BYTES
    estimator: str = "ekfac"
    fisher: str = "true"
    damping: float | None = None
    damping_factor: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InflqError(f"unknown projection kind {self.kind!r}; choose {', '.join(KINDS)}")
        if self.estimator not in ESTIMATORS:
            raise InflqError(f"the index fits {', '.join(ESTIMATORS)} in the projected space, not {self.estimator!r}")
        if self.fisher not in ("true", "empirical"):
            raise InflqError(f"fisher must be true or empirical, not {self.fisher!r}")

    @property
    def labels(self) -> str:
        return "sampled" if self.fisher == "true" else "data"

    def sizes(self, tracked: Sequence[TrackedModule]) -> dict[str, tuple[int, int]]:
        """``{module: (k_s, k_a)}``."""
        base = default_sizes(tracked, self.budget_bytes)
        return {
            t.name: (min(self.k_s or base[t.name][0], t.out_features), min(self.k_a or base[t.name][1], t.in_dim)) for t in tracked
        }

    def factor_settings(self) -> dict:
        """Everything that determines the fitted tensors (the damping does not)."""
        d = asdict(self)
        d.pop("damping")
        d.pop("damping_factor")
        if self.fisher == "true":
            from ..engine import SAMPLED_AT

            d["sampled_at"] = SAMPLED_AT
        return d

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> IndexSettings:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in json.loads(text).items() if k in known})


def _full(upper: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper triangle is ``upper``'s."""
    return torch.triu(upper) + torch.triu(upper, 1).T


class ProjectedCovariancePass(SumPass):
    """Sums of ``ā' ā'ᵀ`` and ``g' g'ᵀ`` over tokens (upper triangles), projected by
    ``projections`` (``{"pa/<m>", "ps/<m>"}``) or, where that is ``None``, full width."""

    phase = "covariance"  # EK-FAC's: the same sampled labels

    def __init__(self, projections: dict[str, torch.Tensor] | None, labels: str = "sampled") -> None:
        self.projections = projections
        self.labels = labels

    def _parts(self, batch, captures):
        yield "tokens", batch.attention_mask.sum().to(torch.float64).reshape(1)
        yield "sequences", torch.tensor([float(batch.size)], dtype=torch.float64)
        for name, cap in captures.items():
            a = cap.activations.reshape(-1, cap.activations.shape[-1])
            g = cap.gradients.reshape(-1, cap.gradients.shape[-1])
            if self.projections is not None:
                a = a @ self.projections[f"pa/{name}"].to(a.device).T
                g = g @ self.projections[f"ps/{name}"].to(g.device).T
            yield f"A/{name}", gram(a, symmetric=False)
            yield f"S/{name}", gram(g, symmetric=False)


class ProjectedCorrectionPass(SumPass):
    """Sums over sequences of ``(Q_S'ᵀ DW' Q_A')²``, rotated per token through
    ``R_A = P_Aᵀ Q_A'`` and ``R_S = P_Sᵀ Q_S'``: ``Σ_t (R_Sᵀ g_t)(R_Aᵀ ā_t)ᵀ``."""

    phase = "eigenvalue correction"  # EK-FAC's: the same sampled labels

    def __init__(self, ra: dict[str, torch.Tensor], rs: dict[str, torch.Tensor], labels: str = "sampled") -> None:
        self.ra = ra
        self.rs = rs
        self.labels = labels

    def _parts(self, batch, captures):
        yield "sequences", torch.tensor([float(batch.size)], dtype=torch.float64)
        for name, cap in captures.items():
            g = cap.gradients @ self.rs[name].to(cap.gradients.device)
            a = cap.activations @ self.ra[name].to(cap.activations.device)
            yield f"L/{name}", torch.bmm(g.transpose(1, 2), a).square_().sum(0)


class IndexModel:
    """Projections and the projected preconditioner of one index: tensors ``ps/``, ``pa/``
    (projections), ``qs/``, ``qa/`` (projected eigenbases) and ``lambda/`` (eigenvalues) per module.

    A *row* is a sequence's projected gradient, the modules' ``P_S DW P_Aᵀ`` (``[k_s, k_a]``, row
    major) side by side in ``names`` order: ``width`` values."""

    def __init__(self, tensors: dict[str, torch.Tensor], settings: IndexSettings, names: Sequence[str]) -> None:
        self.factors = {k: v.to("cpu", torch.float32) for k, v in tensors.items()}
        self.settings = settings
        self.names = list(names)
        self.sizes = {n: (int(self.factors[f"ps/{n}"].shape[0]), int(self.factors[f"pa/{n}"].shape[0])) for n in self.names}
        self.offsets: dict[str, int] = {}
        width = 0
        for n in self.names:
            self.offsets[n] = width
            width += self.sizes[n][0] * self.sizes[n][1]
        self.width = width
        self.dampings = {n: self._damping(self.factors[f"lambda/{n}"]) for n in self.names}
        self._device_cache: dict[str, dict[str, torch.Tensor]] = {}

    def _damping(self, lam: torch.Tensor) -> float:
        if self.settings.damping is not None:
            return float(self.settings.damping)
        return float(self.settings.damping_factor) * float(lam.to(torch.float64).mean())

    # -- storage ------------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.factors)

    def metadata(self) -> dict[str, str]:
        return {"settings": self.settings.to_json(), "modules": json.dumps(self.names)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str], **overrides) -> IndexModel:
        """Rebuild from :meth:`tensors` and :meth:`metadata`; ``overrides`` (e.g. ``damping``)
        change settings that do not touch the tensors."""
        settings = IndexSettings.from_json(metadata["settings"])
        for k, v in overrides.items():
            setattr(settings, k, v)
        return cls(tensors, settings, json.loads(metadata["modules"]))

    def __getstate__(self):  # shipped to workers with the rows pass: without copies on devices
        return {**self.__dict__, "_device_cache": {}}

    def _on(self, device: torch.device) -> dict[str, torch.Tensor]:
        key = str(device)
        if key not in self._device_cache:
            self._device_cache[key] = {k: v.to(device) for k, v in self.factors.items()}
        return self._device_cache[key]

    # -- rows -----------------------------------------------------------------------------------------
    def rows_from_tokens(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Rows ``[B, width]`` from per-token factors ``{module: (G [B, T, out], A [B, T, in_dim])}``:
        ``Σ_t (P_S g_t)(P_A ā_t)ᵀ`` per module, no ``DW`` formed."""
        parts = []
        for n in self.names:
            g, a = factors[n]
            f = self._on(g.device)
            gp = g.to(torch.float32) @ f[f"ps/{n}"].T
            ap = a.to(torch.float32) @ f[f"pa/{n}"].T
            parts.append(torch.bmm(gp.transpose(1, 2), ap).flatten(1))
        return torch.cat(parts, dim=1)

    def rows_from_captures(self, captures) -> torch.Tensor:
        """Rows ``[B, width]`` from the engine's captures (:class:`inflq.Captured` per module)."""
        return self.rows_from_tokens({n: (captures[n].gradients, captures[n].activations) for n in self.names})

    def rows_from_dense(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """Rows ``[B, width]`` from per-sequence gradients ``{module: DW [B, out, in_dim]}``
        (``P_S DW P_Aᵀ``); gradients that carry their token factors
        (:class:`inflq.SequenceGradients`) are projected token by token instead."""
        factors = getattr(grads, "factors", None)
        if factors:
            return self.rows_from_tokens(factors)
        parts = []
        for n in self.names:
            dw = grads[n].to(torch.float32)
            f = self._on(dw.device)
            parts.append((f[f"ps/{n}"] @ dw @ f[f"pa/{n}"].T).flatten(1))
        return torch.cat(parts, dim=1)

    # -- preconditioner -----------------------------------------------------------------------------
    def _blocks(self, rows: torch.Tensor):
        for n in self.names:
            ks, ka = self.sizes[n]
            o = self.offsets[n]
            yield n, rows[:, o : o + ks * ka].reshape(rows.shape[0], ks, ka)

    def _scaled_rotation(self, rows: torch.Tensor, power: float) -> list[torch.Tensor]:
        """Per module ``(Q_S'ᵀ X Q_A') ⊘ (Λ' + λ)^power`` for the rows' blocks ``X``."""
        rows = rows.to(torch.float32)
        f = self._on(rows.device)
        out = []
        for n, x in self._blocks(rows):
            rot = f[f"qs/{n}"].T @ x @ f[f"qa/{n}"]
            out.append(rot / (f[f"lambda/{n}"] + self.dampings[n]) ** power)
        return out

    def precondition(self, rows: torch.Tensor) -> torch.Tensor:
        """``(G' + λI)⁻¹`` applied to rows ``[n, width]`` (queries' projected gradients)."""
        f = self._on(rows.device)
        parts = [
            (f[f"qs/{n}"] @ r @ f[f"qa/{n}"].T).flatten(1) for n, r in zip(self.names, self._scaled_rotation(rows, 1.0), strict=True)
        ]
        return torch.cat(parts, dim=1)

    def self_influence(self, rows: torch.Tensor) -> torch.Tensor:
        """``rowᵀ (G' + λI)⁻¹ row`` for each row ``[n]``."""
        return sum(r.square().sum(dim=(1, 2)) for r in self._scaled_rotation(rows, 0.5))


def fit_index(ctx: FitContext, settings: IndexSettings) -> IndexModel:
    """Draw (or, for ``eigen``, fit) the projections, then fit EK-FAC or K-FAC in the projected
    space through ``ctx.run_pass``: a covariance pass and, for EK-FAC, an eigenvalue-correction
    pass, each over the fitting data and rotating tokens through ``k``-wide projections."""
    tracked = ctx.tracked
    sizes = settings.sizes(tracked)
    labels = settings.labels
    proj = None if settings.kind == "eigen" else random_projections(tracked, sizes, settings.seed, settings.kind)
    cov = ctx.run_pass(ProjectedCovariancePass(proj, labels))
    tokens = float(cov["tokens"].sum())
    seqs = float(cov["sequences"].sum())
    if tokens <= 0:
        raise InflqError("no fitting tokens for the index")
    out: dict[str, torch.Tensor] = {}
    ra, rs, eig = {}, {}, {}
    ctx.monitor.start("eigendecomposition", len(tracked))
    for t in tracked:
        n = t.name
        ks, ka = sizes[n]
        for side, k, key in (("a", ka, "A"), ("s", ks, "S")):
            m = cov.pop(f"{key}/{n}") / tokens
            if proj is None:  # eigen: the top eigenvectors of the full covariance, then project it
                p = top_eigenvectors(m, k, ctx.engine.device)
                full = _full(m)
                m = p.to(torch.float64) @ full @ p.to(torch.float64).T
            else:
                p = proj[f"p{side}/{n}"]
            vals, vecs = eigh(m, ctx.engine.device)
            out[f"p{side}/{n}"] = p
            out[f"q{side}/{n}"] = vecs.to(torch.float32)
            eig[f"{side}/{n}"] = vals
            (ra if side == "a" else rs)[n] = (p.to(torch.float64).T @ vecs).to(torch.float32)
        ctx.monitor.advance(1)
    if settings.estimator == "ekfac":
        corr = ctx.run_pass(ProjectedCorrectionPass(ra, rs, labels))
        cseqs = float(corr["sequences"].sum())
        for t in tracked:
            out[f"lambda/{t.name}"] = (corr.pop(f"L/{t.name}") / cseqs).to(torch.float32)
    else:  # K-FAC, scaled to the per-sequence Gauss-Newton matrix as inflq's K-FAC is
        for t in tracked:
            lam = torch.outer(eig[f"s/{t.name}"].clamp_min(0), eig[f"a/{t.name}"].clamp_min(0)) * (tokens / seqs)
            out[f"lambda/{t.name}"] = lam.to(torch.float32)
    return IndexModel(out, settings, [t.name for t in tracked])
