"""A plan before a run: predicted time and peak memory per phase, and the artifacts' sizes.

How the prediction is made (docs/plan.md has the arithmetic and its validation):

* **Time** comes from a short measured run, the *calibration*: the estimator fits its factors on a
  sample of the corpus (``calibration`` sequences, default 32) and the sample is scored against
  the queries, each pass timed. A pass's cost is linear in the tokens it reads, so its predicted
  time is its measured seconds per token times the tokens of the real run; the
  eigendecompositions do not depend on how many sequences were fitted, so their measured time is
  the prediction. Nothing is written to the project.
* **Memory** is measured too: each calibration phase's peak (on CUDA the allocator's; on Linux the
  process's resident high-water mark, reset between phases) at the run's own batching. What a
  phase holds is bounded by a batch plus what it keeps whole — covariance sums, factors, the
  queries — none of which grows with the corpus, so the calibration's peak is the run's; what does
  grow, the score matrix (4 bytes per query and sequence), is added by arithmetic. Where the
  high-water mark cannot be reset (not Linux), a phase's figure is the process's peak so far, an
  upper bound. The artifacts' sizes are exact: the factors' shapes do not depend on the data.

The plan says where a phase will not fit the memory given (``--memory``, default what the device
has free) and what to change.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from . import catalog
from .batching import available_memory, bytes_per_token
from .display import plural
from .errors import InflqError
from .progress import Monitor
from .settings import RunSettings

if TYPE_CHECKING:
    from .project import Project

GB = 1 << 30
_clock = time.perf_counter  # the plan's clock (a test replaces it)


def size(n: int) -> str:
    """Bytes for people: GB from one GB up, MB below."""
    return f"{n / GB:.1f} GB" if n >= GB else f"{n / (1 << 20):.0f} MB"


@dataclass
class Phase:
    name: str
    seconds: float | None  # None: not predicted (no calibration)
    peak_bytes: int
    note: str = ""


@dataclass
class Plan:
    phases: list[Phase]
    artifacts: dict[str, int]  # name -> bytes
    memory: int  # the budget the plan was checked against
    advice: list[str] = field(default_factory=list)
    facts: dict[str, float | int | str] = field(default_factory=dict)

    @property
    def fits(self) -> bool:
        return all(p.peak_bytes <= self.memory for p in self.phases)

    @property
    def seconds(self) -> float | None:
        times = [p.seconds for p in self.phases]
        return None if any(t is None for t in times) else float(sum(times))

    @property
    def peak_bytes(self) -> int:
        return max(p.peak_bytes for p in self.phases)

    def to_dict(self) -> dict:
        return {
            "phases": [p.__dict__ for p in self.phases], "artifacts": self.artifacts, "memory": self.memory,
            "fits": self.fits, "seconds": self.seconds, "peak_bytes": self.peak_bytes, "advice": self.advice, "facts": self.facts,
        }


class PeakMeter:
    """The peak memory of a stretch of work on ``device``: the CUDA allocator's peak there; on the
    CPU the process's resident high-water mark (Linux: ``VmHWM``, reset by writing 5 to
    ``/proc/self/clear_refs``), else its peak so far (``ru_maxrss``, never reset: an upper bound)."""

    def __init__(self, device) -> None:
        self.device = device
        self.cuda = getattr(device, "type", str(device)) == "cuda"
        self.resettable = self.cuda or self._linux_reset()

    @staticmethod
    def _linux_reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def reset(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.resettable:
            self._linux_reset()

    def peak(self) -> int:
        if self.cuda:
            import torch

            return int(torch.cuda.max_memory_allocated(self.device))
        if self.resettable:
            try:
                with open("/proc/self/status") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            return int(line.split()[1]) * 1024
            except OSError:
                pass
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)


def make_plan(
    project: Project,
    settings: RunSettings,
    *,
    investigation: str = "default",
    memory: int | None = None,
    calibration: int | None = None,
    monitor: Monitor | None = None,
) -> Plan:
    """Predict ``inflq run``'s phases for ``settings`` on this project (see the module docstring)."""
    import torch

    from .base import FitContext
    from .passes import ScorePass, Shard
    from .plugins import get_registry
    from .runs import (
        LocalWorker,
        fit_indices,
        fit_memory_bytes,
        make_estimator,
        preconditioned_query_gradients,
        query_compression,
    )

    monitor = monitor or Monitor()
    settings.resolve_defaults(get_registry())
    runtime = project.runtime
    engine = runtime.engine(settings.modules)
    settings.resolve_batching(engine, project)
    batching = settings.batching()
    lengths = runtime.corpus.lengths().astype(np.int64)
    n = len(lengths)
    if n == 0:
        raise InflqError("the corpus has no sequences; add some and run `inflq corpus rebuild`")
    rng = np.random.default_rng(settings.seed)
    fit_idx = fit_indices(n, settings.fit_sequences, settings.seed)  # the run's own fitting sample
    fit_tokens = int(lengths[fit_idx].sum())
    all_tokens = int(lengths.sum())
    queries = catalog.queries(project.db, investigation)
    nq = max(1, len(queries))
    if memory is None:  # what the device has free (available_memory keeps back a share for batches)
        memory = int(available_memory(engine.device) * (4 if engine.device.type == "cpu" else 1 / 0.6))

    # -- the calibration: fit and score a sample, timing each pass -----------------------------------
    estimator = make_estimator(settings.estimator)
    # Sequences whose tokens fill two of the run's batches (or ``calibration`` sequences): a pass's
    # time per token on a few small batches overstates it, as per-batch overheads dominate there.
    order = rng.permutation(n)
    if calibration is None:
        budget = 2 * (batching.tokens or (batching.sequences or 8) * int(np.median(lengths)))
        count = int(np.searchsorted(np.cumsum(lengths[order]), budget)) + 1
    else:
        count = int(calibration)
    sample = np.sort(order[: min(n, max(1, count))])
    sample_tokens = int(lengths[sample].sum())
    worker = LocalWorker(project, engine)
    quiet = Monitor(cancel_event=monitor.cancel_event)  # cancellable, without the passes' own progress
    pass_seconds: dict[str, float] = {}
    peaks: dict[str, int] = {}
    meter = PeakMeter(engine.device)

    def measured(name: str, work):
        """Run ``work()``, timing it and noting its peak memory under ``name``."""
        meter.reset()
        t0 = _clock()
        out = work()
        pass_seconds[name] = pass_seconds.get(name, 0.0) + _clock() - t0
        peaks[name] = max(peaks.get(name, 0), meter.peak())
        meter.reset()
        return out

    def run_pass(pass_):
        # What ran since the last pass (an estimator's eigendecompositions) peaked at:
        peaks["between"] = max(peaks.get("between", 0), meter.peak())
        return measured(pass_.phase, lambda: worker.run(pass_, Shard(0, sample), batching, quiet))

    # One untimed batch first: the first pass of a process also pays for thread pools and allocations.
    from .engine import make_batch

    warm = sample[: max(1, min(len(sample), seqs_per_batch_guess(batching, lengths, n)))]
    engine.capture(make_batch(runtime.corpus.many(warm), runtime.pad_id, engine.device), "data")
    monitor.start("plan: calibrating", 3)
    factors: dict[str, torch.Tensor] = {}
    fit_seconds = 0.0
    if estimator.fits_factors:
        # With --fit-memory the calibration fits by module as the run would: a pass per group of
        # modules, each timed under its phase (the times add up) and peaking at one group's sums.
        ctx = FitContext(engine, run_pass, len(sample), settings.seed, quiet, indices=sample,
                         sequences=runtime.corpus.many, pad_id=runtime.pad_id, project=project,
                         memory=fit_memory_bytes(settings.fit_memory))
        meter.reset()
        t0 = _clock()
        factors = estimator.fit(ctx)
        fit_seconds = _clock() - t0
        peaks["between"] = max(peaks.get("between", 0), meter.peak())
        estimator.load_factors(factors)
        estimator.prepare(ctx)
    monitor.advance(1)
    # Timed with the investigation's queries; without any, one stands in (say so in the plan).
    probe = queries or [{"prompt": runtime.decode(runtime.corpus.get(int(sample[0])))[:200], "completion": " the", "chat": 0}]
    compression = query_compression(settings, lengths)
    # As a run forms them: a few queries at a time (memory holds a few queries' dense gradients).
    qg = measured("query gradients", lambda: preconditioned_query_gradients(project, estimator, engine, probe, settings.batch_size, compression))
    query_seconds = pass_seconds.pop("query gradients") * nq / len(probe)
    monitor.advance(1)
    measured("scoring", lambda: worker.run(ScorePass(qg, keep_parts=True), Shard(0, sample), batching, quiet))
    score_rate = pass_seconds.pop("scoring") / sample_tokens  # seconds per token, all queries at once
    monitor.advance(1)

    # -- the prediction ---------------------------------------------------------------------------------
    model_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    batch_tok = batching.tokens or (batching.sequences or 8) * int(lengths.max())
    batch_bytes = batch_tok * bytes_per_token(engine, project.config.max_length)
    # float64 upper triangles, packed (CovariancePass): n(n+1)/2 entries for an n-wide factor
    cov_sums = sum(4 * (t.in_dim * (t.in_dim + 1) + t.out_features * (t.out_features + 1)) for t in engine.tracked)
    largest = max((max(t.in_dim, t.out_features) for t in engine.tracked), default=1)
    factor_bytes = sum(v.numel() * v.element_size() for v in factors.values())
    query_bytes = sum(v.numel() * v.element_size() for v in qg.tensors().values()) * nq // len(probe)
    score_bytes = 4 * nq * n

    phases: list[Phase] = []
    tokens_note = plural(fit_tokens, "token")
    for phase, secs in pass_seconds.items():
        phases.append(Phase(f"fit: {phase}", secs / sample_tokens * fit_tokens, peaks[phase], tokens_note))
    if estimator.fits_factors and "between" in peaks:
        eig = max(0.0, fit_seconds - sum(pass_seconds.values()))
        phases.insert(min(1, len(phases)), Phase("fit: eigendecompositions", eig, peaks["between"], f"largest {largest}x{largest}"))
    phases.append(Phase("query gradients", query_seconds, peaks["query gradients"] + query_bytes * (nq - len(probe)) // nq, plural(nq, "query")))
    phases.append(Phase("scoring", score_rate * all_tokens, peaks["scoring"] + 4 * nq * max(0, n - len(sample)),
                        f"{plural(n, 'sequence')}, {plural(all_tokens, 'token')}"))

    artifacts = {"factors": factor_bytes, "query gradients": query_bytes, "scores": score_bytes}
    plan = Plan(phases, artifacts, memory, facts={
        "sequences": n, "fit_sequences": len(fit_idx), "tokens": all_tokens, "queries": nq, "modules": len(engine.tracked),
        "model_bytes": model_bytes, "batch": batching.describe(), "peaks_reset": meter.resettable,
        "calibration_sequences": len(sample), "calibration_tokens": sample_tokens, "device": str(engine.device),
        "estimator": settings.estimator, "queries_measured": len(queries),
    })
    held = cov_sums if settings.fit_memory is None else min(cov_sums, fit_memory_bytes(settings.fit_memory))
    plan.advice = advise(plan, held, batch_bytes, score_bytes, factor_bytes)
    return plan


def advise(plan: Plan, cov_sums: int, batch_bytes: int, score_bytes: int, factor_bytes: int) -> list[str]:
    """What to change where a phase does not fit, or a run would be long. ``cov_sums``: the
    covariance sums one pass holds (one group's, fitting by module)."""
    out: list[str] = []
    generic: list[Phase] = []
    for p in (p for p in plan.phases if p.peak_bytes > plan.memory):
        if p.name == "fit: covariance" and cov_sums > plan.memory / 2:
            gb = max(0.1, int(plan.memory / 4 / 2**30 * 10) / 10)
            out.append(f"{p.name}: the covariance sums alone need {size(cov_sums)}: fit by module with --fit-memory {gb:g} "
                       f"(a covariance pass per group of modules whose sums fit {gb:g} GB; on Ray, --executor ray:memory=GB per worker), "
                       "or track fewer modules (--modules mlp, or name globs)")
        elif p.name.startswith("fit:") and factor_bytes > plan.memory / 2:
            out.append(f"{p.name}: the factors need {size(factor_bytes)}: track fewer modules, or use a diagonal estimator")
        elif p.name == "scoring" and score_bytes > plan.memory / 4:
            out.append(f"scoring: the score matrix needs {size(score_bytes)}: choose candidates with a filter (--filter tfidf:k=1000)")
        else:
            generic.append(p)
    if generic:
        need = max(p.peak_bytes for p in generic)
        what = f"one batch needs {size(batch_bytes)}: " if batch_bytes > plan.memory / 4 else ""
        out.append(f"{', '.join(p.name for p in generic)} need up to {size(need)} of {size(plan.memory)}; "
                   f"{what}lower --batch-tokens, or track fewer modules")
    fit = sum(p.seconds or 0.0 for p in plan.phases if p.name.startswith("fit:"))
    total = plan.seconds or 0.0
    if total > 3600 and fit > total / 2:
        out.append("fitting dominates: fit on a sample (--fit-sequences N) or across Ray workers (--executor ray)")
    elif total > 3600:
        out.append("scoring dominates: choose candidates with a filter (--filter tfidf:k=1000) or score across Ray workers")
    return out


def seqs_per_batch_guess(batching, lengths: np.ndarray, n: int) -> int:
    """Sequences in a typical batch: the token budget over the median length, within the cap."""
    tokens = batching.tokens or (batching.sequences or 8) * int(lengths.max())
    return max(1, min(batching.sequences or n, tokens // max(1, int(np.median(lengths)))))
