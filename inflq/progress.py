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
    ) -> None:
        self.on_progress = on_progress
        self.on_warning = on_warning
        self.warnings: list[str] = []
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


