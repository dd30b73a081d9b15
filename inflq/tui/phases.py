"""Per-phase progress bars (a run's, a validation's) and the message that carries a progress
event from a worker thread to them."""

from __future__ import annotations

from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Label, ProgressBar

from ..progress import ProgressEvent
from . import render


class RunProgress(Message):
    """A progress event from a worker (posted from its thread)."""

    def __init__(self, event: ProgressEvent) -> None:
        super().__init__()
        self.event = event

    def can_replace(self, message: Message) -> bool:
        # A newer event of the same phase supersedes a queued one: the bar shows the latest state
        # however fast batches go, and never a stale one while the worker is in a long batch.
        return isinstance(message, RunProgress) and message.event.phase == self.event.phase


class PhaseBars(Vertical):
    """A label and a bar per phase, added as the phases start. ``bars`` maps a phase to its
    (label, bar)."""

    def __init__(self, bar_classes: str = "", **kwargs) -> None:
        super().__init__(**kwargs)
        self.bar_classes = bar_classes
        self.bars: dict[str, tuple[Label, ProgressBar]] = {}
        self._last: dict[str, ProgressEvent] = {}

    def reset(self) -> None:
        """No bars: a new run starts."""
        self.remove_children()
        self.bars.clear()
        self._last.clear()

    def show(self, ev: ProgressEvent) -> None:
        if ev.phase not in self.bars:
            label, bar = Label(ev.phase, classes="phase-label"), ProgressBar(total=max(ev.total, 1), show_eta=False, classes=self.bar_classes)
            self.bars[ev.phase] = (label, bar)
            self.mount(Horizontal(label, bar, classes="phase"))
        label, bar = self.bars[ev.phase]
        bar.update(total=max(ev.total, 1), progress=ev.done)
        label.update(f"{ev.phase} {ev.done}/{ev.total} {render.eta(ev.eta)}")
        self._last[ev.phase] = ev

    def stop(self, how: str = "") -> None:
        """A finished or stopped run's bars keep their count but lose the ETA; an unfinished
        phase says ``how`` it ended (e.g. "(stopped)")."""
        for phase, (label, _bar) in self.bars.items():
            ev = self._last.get(phase)
            if ev is not None:
                label.update(f"{phase} {ev.done}/{ev.total}" + (f" {how}" if how and ev.done < ev.total else ""))
