"""The one way a failed worker is handled, wherever it was started.

Textual posts a worker's state changes only to the widget that started it (``Worker.StateChanged``
does not bubble), so the app, every pane and every screen that starts thread workers mixes in
:class:`WorkerFailures`. Its one handler lets the widget withdraw what the failed work was about to
replace (so no stale status stays on screen) and hands the error to the app's ``worker_failed``,
the one place that shows it."""

from __future__ import annotations

from textual.worker import Worker, WorkerState


class WorkerFailures:
    """Mixed into a widget (or the app) that starts workers: a failed worker's error reaches the
    app's ``worker_failed`` once, after the widget's :meth:`show_failed_work`."""

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state == WorkerState.ERROR:
            self.show_failed_work(event.worker)
            self.app.worker_failed(event.worker)  # type: ignore[attr-defined]

    def show_failed_work(self, worker: Worker) -> None:
        """Replace what the failed ``worker`` was to update (a "loading…", an earlier answer) with
        a note that it failed, so that nothing on screen pretends to be current. Default: nothing."""


def failure_note(worker: Worker, what: str) -> str:
    """A line saying that ``what`` failed and why, for the place the worker's answer would have gone."""
    from ..errors import InflqError

    error = worker.error
    why = str(error) if isinstance(error, InflqError) else f"{type(error).__name__}: {error}"
    return f"{what} failed ({why.splitlines()[0] if why else type(error).__name__})"
