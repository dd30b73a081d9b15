"""Tab 5: the query's score distribution (a log-log CCDF) with power-law fits of both tails.
The score matrix is loaded in a worker."""

from __future__ import annotations

import numpy as np
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import Static
from textual.worker import get_current_worker

from ... import reading
from ...errors import InflqError
from ..context import Context, ContextChanged
from .pane import Pane


class DistributionPane(Pane):
    """The query's score distribution. The plot and the fits scroll together (they need more
    than 24 lines), and the plot is redrawn to the pane's size on every resize. The scroll area
    takes the focus, so the tab is reachable and keyboard-scrollable from any other tab."""

    FOCUS = "#dist-scroll"
    FIT_LINES = 4  # the two tails' fits, the method line and a blank line

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._values: np.ndarray | None = None
        self._drawn_for: tuple[int, int] = (0, 0)

    def compose(self) -> ComposeResult:
        yield Static("", id="dist-title", classes="hint")
        with VerticalScroll(id="dist-scroll", can_focus=True):
            yield Static("", id="dist-plot")
            yield Static("", id="dist-fit", classes="detail")

    def reload(self) -> None:
        ctx = self.context
        self._values = None
        if self.project is None or ctx.result_set_id is None or ctx.query_id is None:
            self._say("no distribution: run the investigation and choose a query (Results tab)")
            return
        self._say(f"query {ctx.query_id}, result set {ctx.result_set_id}: loading the scores…")
        self.load(ctx)

    def _say(self, title: str) -> None:
        self.query_one("#dist-title", Static).update(title)
        self.query_one("#dist-plot", Static).update("")
        self.query_one("#dist-fit", Static).update("")

    def context_changed(self, event: ContextChanged) -> None:
        self.workers.cancel_group(self, "load")  # a load for the old context is stale
        super().context_changed(event)

    @work(thread=True, exclusive=True, exit_on_error=False, group="load")
    def load(self, ctx: Context) -> None:
        """The query's scores (the whole score matrix is read) and both tails' fits, off the UI thread."""
        from ...stats import powerlaw_tail

        try:
            values = reading.distribution(ctx.project, ctx.investigation, ctx.query_id, ctx.result_set_id)
        except InflqError as exc:
            if not get_current_worker().is_cancelled:
                self.app.call_from_thread(self._loaded, ctx, None, str(exc))
            return
        lines = Text()
        for sign, label in ((1, "positive"), (-1, "negative")):
            fit = powerlaw_tail(sign * values)
            lines.append(f"{label} tail: ", style="bold")
            if fit is None:
                lines.append("too few values to fit a power law\n")
            else:
                lines.append(f"alpha = {fit.alpha:.2f} ± {fit.stderr:.2f} (CCDF slope {fit.ccdf_slope:.2f}) over the top {fit.n_tail}, x >= {fit.xmin:.3g}\n")
        lines.append("fit: Hill / continuous maximum-likelihood estimator over the top 20% of each tail", style="dim")
        if not get_current_worker().is_cancelled:
            self.app.call_from_thread(self._loaded, ctx, values, lines)

    def _loaded(self, ctx: Context, values: np.ndarray | None, shown: Text | str) -> None:
        """On the UI thread: show what the load found, unless the context has moved on."""
        if ctx is not self.context:
            return
        if values is None:
            self._say(str(shown))
            return
        from ...export import ccdf_legend

        self._values = values
        # The legend is here, not in the plot, where it covered the largest scores.
        self.query_one("#dist-title", Static).update(
            f"query {ctx.query_id}, result set {ctx.result_set_id}: CCDF of |score| over {len(values)} scores, log-log: {ccdf_legend(values)}")
        self.draw()
        self.query_one("#dist-fit", Static).update(shown)

    def draw(self) -> None:
        """The plot at the scroll area's size, leaving room for the fit lines where it can."""
        from ...export import ccdf_plot

        if self._values is None:
            return
        area = self.query_one("#dist-scroll", VerticalScroll).size
        width = max(40, (area.width or self.app.size.width - 4) - 2)  # before the first layout: the pane's likely width
        height = max(10, (area.height or self.app.size.height - 8) - self.FIT_LINES)
        self._drawn_for = (area.width, area.height)
        self.query_one("#dist-plot", Static).update(Text.from_ansi(ccdf_plot(self._values, width, height, color=False)))

    def on_resize(self) -> None:
        self.call_after_refresh(self._redraw_if_resized)

    def _redraw_if_resized(self) -> None:
        size = self.query_one("#dist-scroll", VerticalScroll).size
        if self._values is not None and (size.width, size.height) != self._drawn_for:
            self.draw()
