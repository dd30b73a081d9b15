"""Tab 5: the query's score distribution (a log-log CCDF) with power-law fits of both tails, and
each query's share of positive influence by a corpus metadata field. The score matrix is loaded
in workers."""

from __future__ import annotations

import math

import numpy as np
from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import Label, Select, Static
from textual.worker import get_current_worker

from ... import catalog, reading
from ...errors import InflqError
from ..compact import CSelect
from ..context import Context, ContextChanged
from ..worker_failures import failure_note
from .pane import Pane, blank


class DistributionPane(Pane):
    """The query's score distribution. The plot and the fits scroll together (they need more
    than 24 lines), and the plot is redrawn to the pane's size on every resize. The scroll area
    takes the focus, so the tab is reachable and keyboard-scrollable from any other tab."""

    FOCUS = "#dist-scroll"
    FIT_LINES = 4  # the two tails' fits, the method line and a blank line
    BY_QUERIES = 4  # queries shown side by side in the by-field table (the current one first)

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._values: np.ndarray | None = None
        self._drawn_for: tuple[int, int] = (0, 0)

    def compose(self) -> ComposeResult:
        yield Static("", id="dist-title", classes="hint")
        with VerticalScroll(id="dist-scroll", can_focus=True):
            yield Static("", id="dist-plot")
            yield Static("", id="dist-fit", classes="detail")
            with Horizontal(classes="field", id="dist-by-row"):
                yield Label("share of positive influence by", classes="by-label")
                yield CSelect([], id="dist-field", allow_blank=True, prompt="metadata field")
            yield Static("", id="dist-by", classes="detail")

    def reload(self) -> None:
        ctx = self.context
        self._values = None
        if self.project is None or ctx.result_set_id is None or ctx.query_id is None:
            self._say("no distribution: run the investigation and choose a query (Results tab)")
            self.query_one("#dist-by", Static).update("")
            return
        self._say(f"query {ctx.query_id}, result set {ctx.result_set_id}: loading the scores…")
        self.load(ctx)
        self._reload_fields()
        self._load_by_field()

    # -- the share of positive influence by a metadata field (inflq top --by FIELD) ----------------
    def _reload_fields(self) -> None:
        """The field select offers the corpus's metadata fields; it keeps its choice, else ``source``
        (else the first field)."""
        fields = catalog.metadata_fields(self.project.db)
        sel = self.query_one("#dist-field", Select)
        old = sel.value
        with self.prevent(Select.Changed):
            sel.set_options([(f, f) for f in fields])
            if old in fields:
                sel.value = old
            elif fields:
                sel.value = "source" if "source" in fields else fields[0]
        self.query_one("#dist-by-row").display = bool(fields)
        if not fields:
            self.query_one("#dist-by", Static).update(Text("the corpus has no metadata fields to group the influence by", style="dim"))

    @on(Select.Changed, "#dist-field")
    def _field_changed(self) -> None:
        if self.project is not None and self.context.result_set_id is not None:
            self._load_by_field()

    def _load_by_field(self) -> None:
        field = self.query_one("#dist-field", Select).value
        if blank(field):
            return
        self.query_one("#dist-by", Static).update(Text(f"grouping by {field}…", style="dim"))
        self.load_by_field(self.context, str(field))

    @work(thread=True, exclusive=True, exit_on_error=False, group="by-field")
    def load_by_field(self, ctx: Context, field: str) -> None:
        """Every query of the result set: its share of positive influence per value of ``field``."""
        try:
            rs = reading.result_set(ctx.project, ctx.investigation, ctx.result_set_id)
            shares = reading.influence_by(ctx.project, rs, field)
        except InflqError as exc:
            shown: Group | Text = Text(str(exc), style="italic")
        else:
            shown = by_field_table(shares, field, ctx.query_id, self.BY_QUERIES)
        if not get_current_worker().is_cancelled:
            self.app.call_from_thread(self._by_field_loaded, ctx, field, shown)

    def _by_field_loaded(self, ctx: Context, field: str, shown) -> None:
        if ctx is self.context and self.query_one("#dist-field", Select).value == field:
            self.query_one("#dist-by", Static).update(shown)

    def show_failed_work(self, worker) -> None:
        if worker.group == "by-field":
            self.query_one("#dist-by", Static).update(Text(failure_note(worker, "grouping the influence"), style="bold red"))
        elif worker.group == "load":
            self._say(failure_note(worker, "loading the scores"))

    def _say(self, title: str) -> None:
        self.query_one("#dist-title", Static).update(title)
        self.query_one("#dist-plot", Static).update("")
        self.query_one("#dist-fit", Static).update("")

    def context_changed(self, event: ContextChanged) -> None:
        self.workers.cancel_group(self, "load")  # a load for the old context is stale
        self.workers.cancel_group(self, "by-field")
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


def by_field_table(shares: list, field: str, current: int | None, most: int) -> Group:
    """Per value of ``field`` (largest share of the current query first): the share of the scored
    sequences it holds (what influence spread evenly would give it), then each query's share of
    its total positive influence, the current query's column first; at most ``most`` queries."""
    order = sorted(shares, key=lambda f: f.query_id != current)[:most]
    title = Text(f"each query's share of its positive influence, as inflq top --by {field} (* the current query):", style="dim")
    t = Table(box=None, pad_edge=False)
    t.add_column(field)
    t.add_column("sequences", justify="right")
    for f in order:
        t.add_column(f"query {f.query_id}" + (" *" if f.query_id == current else ""), justify="right",
                     style="bold" if f.query_id == current else None)
    first = order[0] if order else None
    values = [g.value for g in first.groups] if first else []
    per_query = [{g.value: g for g in f.groups} for f in order]

    def pct(x: float) -> str:
        return "—" if x is None or not math.isfinite(x) else f"{100 * x:.1f}%"

    for value in values:
        cells = [pct(q[value].share) if value in q else "—" for q in per_query]
        t.add_row(value or "(none)", pct(per_query[0][value].sequence_share), *cells)
    more = Text(f"{len(shares) - most} more queries: inflq top PROJECT --by {field}", style="dim") if len(shares) > most else Text("")
    return Group(title, t, more)
