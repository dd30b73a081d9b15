"""Terminal plots (plotext), drawn as text for the CLI, the TUI's panes and exported reports.

plotext draws on one global figure, so every plot goes through :func:`figure`, which holds the one
lock around it: a TUI worker and the main thread may draw at once."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_LOCK = threading.Lock()


@contextmanager
def figure(width: int, height: int, color: bool = False) -> Iterator[Any]:
    """plotext's figure, cleared and sized ``width`` x ``height`` characters (whatever the process's
    terminal is: a TUI pane or a file), themed with ANSI colours when ``color``; held under the lock."""
    import plotext as plt

    with _LOCK:
        f = plt.figure
        f.clear.all()
        plt.terminal.limit(False, False)
        f.plot_size(width, height)
        f.theme("default" if color else "colorless")
        yield f
