"""Progress reporting and cancellation shared by every long loop (CLI, TUI, notebooks).

Long work takes a :class:`Monitor`. The loop calls ``monitor.start(phase, total)``, then
``monitor.advance(n)`` between batches; ``advance`` raises :class:`inflq.errors.Cancelled` as soon
as the user asked to stop, so cancellation lands within one batch.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .errors import Cancelled


@dataclass(frozen=True)
class ProgressEvent:
    """Where a phase stands: ``done`` of ``total`` units (sequences, batches or modules)."""

    phase: str
    done: int
    total: int
    elapsed: float
    message: str = ""

    @property
    def eta(self) -> float | None:
        if self.done <= 0 or self.total <= 0 or self.done >= self.total:
            return None
        return self.elapsed / self.done * (self.total - self.done)


class Monitor:
    """Carries progress out of, and a cancel request into, a long computation.

    ``on_progress`` is called from the computing thread; UIs must hand events to their own thread.
    """

    def __init__(
        self,
        on_progress: Callable[[ProgressEvent], None] | None = None,
        cancel_event: threading.Event | None = None,
        on_warning: Callable[[str], None] | None = None,
        on_note: Callable[[str], None] | None = None,
    ) -> None:
        self.on_progress = on_progress
        self.on_warning = on_warning
        self.on_note = on_note
        self.warnings: list[str] = []
        self.notes: list[str] = []
        self.cancel_event = cancel_event or threading.Event()
        self.phase = ""
        self.total = 0
        self.done = 0
        self._started = time.perf_counter()

    def warn(self, message: str) -> None:
        """Something the user should know that does not stop the work (shown and recorded)."""
        self.warnings.append(message)
        if self.on_warning is not None:
            self.on_warning(message)

    def note(self, message: str) -> None:
        """A fact about the work worth a line in a log (e.g. the batching chosen); not a warning."""
        self.notes.append(message)
        if self.on_note is not None:
            self.on_note(message)

    def cancel(self) -> None:
        self.cancel_event.set()

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def check(self) -> None:
        """Raise :class:`Cancelled` if a stop was requested."""
        if self.cancel_event.is_set():
            raise Cancelled()

    def start(self, phase: str, total: int, message: str = "") -> None:
        self.phase, self.total, self.done = phase, int(total), 0
        self._started = time.perf_counter()
        self._emit(message)
        self.check()

    def advance(self, n: int = 1, message: str = "") -> None:
        self.done += int(n)
        self._emit(message)
        self.check()

    def _emit(self, message: str) -> None:
        if self.on_progress is not None:
            self.on_progress(
                ProgressEvent(self.phase, self.done, self.total, time.perf_counter() - self._started, message)
            )




class LineProgress:
    """Plain progress lines, for output that is not a terminal (a pipe, a log file, CI).

    Bound to ``Monitor.on_progress``: writes ``phase n/N (p%), rate/s, elapsed, eta`` once a phase
    has run ``interval`` seconds since its last line, and a closing line for phases that took that
    long, so quick commands print nothing and a long run shows it is alive every few seconds.
    Notes (``Monitor.note``) wait for the first line, so they appear only in logs of long work.
    """

    def __init__(self, write: Callable[[str], None], interval: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.write = write
        self.interval = float(interval)
        self.clock = clock
        self.pending_notes: list[str] = []
        self._phase: str | None = None
        self._last = 0.0
        self._written = False  # a line for the current phase

    def note(self, message: str) -> None:
        self.pending_notes.append(message)

    def _emit(self, line: str) -> None:
        for n in self.pending_notes:
            self.write(f"inflq: {n}")
        self.pending_notes.clear()
        self.write(f"inflq: {line}")

    def __call__(self, ev: ProgressEvent) -> None:
        now = self.clock()
        if ev.phase != self._phase:
            self._phase, self._last, self._written = ev.phase, now, False
        rate = ev.done / ev.elapsed if ev.elapsed > 0 else 0.0
        if ev.total > 0 and ev.done >= ev.total:
            if self._written or ev.elapsed >= self.interval:
                self._emit(f"{ev.phase} done: {ev.done:,} in {_duration(ev.elapsed)} ({rate:,.1f}/s)")
            self._phase = None  # a later event of the same phase starts a new one
            return
        if now - self._last < self.interval:
            return
        self._last, self._written = now, True
        share = f" ({100 * ev.done / ev.total:.0f}%)" if ev.total > 0 else ""
        eta = f", eta {_duration(ev.eta)}" if ev.eta is not None else ""
        self._emit(f"{ev.phase} {ev.done:,}/{ev.total:,}{share}, {rate:,.1f}/s, {_duration(ev.elapsed)} elapsed{eta}")


def _duration(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    minutes, s = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {s:02d} s"
    hours, m = divmod(minutes, 60)
    return f"{hours} h {m:02d} min"
