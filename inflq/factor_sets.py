"""Cached factor sets: list them, look at their spectra, fit them ahead of a run, remove them.

A factor set is what an estimator fitted (EK-FAC's eigenbases and eigenvalues, K-FAC's, the
diagonal's variances), stored once per project and reused by every investigation whose run asks for
the same estimator, settings, modules, model, fitting data, seed and dtype (``inflq.runs.ensure_factors``).

The spectrum of a factor set says how much the damping decides: EK-FAC's preconditioner divides
each eigen-direction by ``λ_i + δ``, so directions with ``λ_i ≪ δ`` are all treated alike. The
*effective dimension* ``Σ λ_i / (λ_i + δ)`` counts the directions the fitted curvature still
distinguishes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from . import catalog
from .artifacts import load_tensors
from .errors import InflqError

# Factor tensors that hold a module's eigenvalues (EK-FAC, K-FAC) or variances (diagonal).
_SPECTRUM_KEYS = ("lambda/", "diag/")


# The sampling rule of true-Fisher factor sets fitted before the rule was recorded (inflq sampled
# labels at every real token then, a sequence's last included). Their cache key lacks the
# current rule, so no run reuses them; listings say which rule they were fitted with.
OLD_SAMPLING_RULE = "every real token (older inflq; not reused)"


def recorded_settings(settings: str | None) -> dict:
    """A factor set's settings as recorded, with the sampling rule of the true Fisher made
    explicit for sets fitted before it was recorded."""
    out = json.loads(settings or "{}")
    if out.get("fisher") == "true" and "sampled_at" not in out:
        out["sampled_at"] = OLD_SAMPLING_RULE
    return out


def factor_sets(project) -> list[dict]:
    """Every cached factor set with its size on disk, whether it was fitted on the project's current
    model, and how many runs used it. ``settings`` names the true Fisher's sampling rule, for sets
    fitted before it was recorded too."""
    used = catalog.factor_set_uses(project.db)
    out = []
    for r in catalog.factor_sets(project.db):
        path = project.root / r["path"]
        out.append({
            **r,
            "settings": json.dumps(recorded_settings(r["settings"]), sort_keys=True),
            "size_bytes": path.stat().st_size if path.exists() else None,
            "current_model": r["model_fingerprint"] == project.model_fingerprint,
            "runs": used.get(r["id"], 0),
            "num_modules": len(json.loads(r["modules"] or "[]")),
        })
    return out


def factor_set(project, fs_id: int) -> dict:
    return catalog.factor_set(project.db, fs_id)


@dataclass
class ModuleSpectrum:
    """One module's fitted eigenvalues (or variances), sorted in decreasing order."""

    module: str
    eigenvalues: np.ndarray
    damping: float

    @property
    def effective_dimension(self) -> float:
        lam = np.clip(self.eigenvalues, 0, None)
        return float((lam / (lam + self.damping)).sum()) if self.damping > 0 else float((lam > 0).sum())

    @property
    def below_damping(self) -> float:
        """Fraction of eigen-directions whose eigenvalue is under the damping."""
        return float((self.eigenvalues < self.damping).mean())

    def summary(self) -> dict:
        lam = self.eigenvalues
        return {
            "module": self.module, "size": int(lam.size), "max": float(lam[0]), "mean": float(lam.mean()),
            "min": float(lam[-1]), "damping": self.damping, "below_damping": self.below_damping,
            "effective_dimension": self.effective_dimension,
        }


def spectra(project, fs_id: int, damping: float | None = None, damping_factor: float = 0.1, modules: str | None = None) -> list[ModuleSpectrum]:
    """Per module, the fitted spectrum and the damping a run would use with these settings
    (``damping`` absolute, else ``damping_factor`` × the module's mean eigenvalue). ``modules``:
    comma-separated globs to keep."""
    import fnmatch

    row = factor_set(project, fs_id)
    tensors = load_tensors(project.root, row["path"], row["checksum"], "factor artifact")
    patterns = [p.strip() for p in modules.split(",")] if modules else None
    out = []
    for name in json.loads(row["modules"] or "[]"):
        if patterns and not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        key = next((k + name for k in _SPECTRUM_KEYS if k + name in tensors), None)
        if key is None:
            continue
        lam = np.sort(tensors[key].double().flatten().numpy())[::-1].copy()
        d = float(damping) if damping is not None else float(damping_factor) * float(lam.mean())
        out.append(ModuleSpectrum(name, lam, d))
    if not out:
        what = f"no module matches {modules!r}" if modules else f"factor set {fs_id} ({row['estimator']}) holds no eigenvalues"
        raise InflqError(f"{what}; see the modules with `inflq factors list`")
    return out


def spectrum_table(items: list[ModuleSpectrum], fs_id: int, **table_options):
    """A rich table of the spectra, one row per module, names shortened by their common prefix."""
    import os

    from rich.table import Table

    prefix = os.path.commonprefix([sp.module for sp in items])
    prefix = prefix[: prefix.rfind(".") + 1]
    t = Table(title=f"factor set {fs_id}: eigenvalues λ per module" + (f" (under {prefix})" if prefix else ""),
              title_justify="left", **table_options)
    t.add_column("module", no_wrap=True)
    for col in ("size", "λ max", "λ mean", "damping", "< damping", "eff. dim"):
        t.add_column(col, justify="right", no_wrap=True)
    for sp in items:
        d = sp.summary()
        t.add_row(d["module"][len(prefix):], str(d["size"]), f"{d['max']:.2g}", f"{d['mean']:.2g}", f"{d['damping']:.2g}",
                  f"{100 * d['below_damping']:.0f}%", f"{d['effective_dimension']:.0f}")
    return t


def spectrum_plot(items: list[ModuleSpectrum], width: int = 72, height: int = 18, color: bool = False) -> str:
    """A histogram of ``log10(λ / damping)`` over the eigen-directions of ``items``, as text
    (plotext): ``░`` bars are directions under the damping (all treated alike by the
    preconditioner), ``█`` bars those the fitted curvature still tells apart."""
    from .plots import figure

    ratios = np.concatenate([sp.eigenvalues / sp.damping for sp in items if sp.damping > 0] or [np.zeros(0)])
    zero = int((ratios <= 0).sum())
    x = np.log10(ratios[ratios > 0])
    if not len(x):
        return "(no positive eigenvalues to plot)"
    floor = -6.0  # a millionth of the damping and less: no influence on the preconditioner
    clipped = int((x < floor).sum())
    x = np.maximum(x, floor)
    # Bin edges on a grid through 0, so no bar straddles the damping.
    step = 0.25
    while (np.ceil(x.max() / step) - np.floor(x.min() / step)) > max(10, (width - 12) // 2):
        step *= 2
    edges = np.arange(np.floor(x.min() / step), np.ceil(x.max() / step) + 1) * step
    if len(edges) < 2:
        edges = np.array([edges[0], edges[0] + step])
    counts, edges = np.histogram(x, bins=edges)
    centers = (edges[:-1] + edges[1:]) / 2
    with figure(max(30, width), max(8, height), color) as f:
        f.draw(f.bar(centers.tolist(), counts.tolist(), marker=["░" if c < 0 else "█" for c in centers], width=1))
        f.label("log10(eigenvalue / damping); ░ under the damping", "x")
        f.label("directions", "y")
        text = f.build().string(colorless=not color)
    notes = []
    if clipped:
        notes.append(f"{clipped} directions under 1e-6 × damping are counted at -6")
    if zero:
        notes.append(f"{zero} with a zero eigenvalue are not shown")
    return text + (f"\n({'; '.join(notes)})" if notes else "")


def remove_factor_set(project, fs_id: int) -> str:
    """Delete a factor set's catalog row, then its file. Results computed with it keep their scores
    (runs store them); a later run needing these factors fits them again. Returns the file's path."""
    row = catalog.remove_factor_set(project.db, fs_id)
    (project.root / row["path"]).unlink(missing_ok=True)
    return row["path"]
