"""Rich renderings shared by the screens: token heat maps, diverging layer bars, token views.

Colours are backgrounds with black text for strong values and plain text for weak ones, so
they read in light and dark themes. Red is positive (the sequence makes the completion more
likely), blue negative.
"""

from __future__ import annotations

import json

import numpy as np
from rich.table import Table
from rich.text import Text

SIGN_NOTE = "score > 0 (red): makes the completion more likely · < 0 (blue): less likely"


def sign_note(query: dict | None) -> str:
    """:data:`SIGN_NOTE` for a query that measures log p(completion) (or none chosen); for another
    measurement, what a positive score raises (a margin: log p(completion) - log p(alternative))."""
    from ..measuring import default_measurement, describe, formula, measurement_spec

    if query is None or measurement_spec(query) == default_measurement():
        return SIGN_NOTE
    return f"{describe(query)}: score > 0 (red) raises {formula(query)} · < 0 (blue) lowers it"


def _sep(tokens: list[str]) -> str:
    # BPE tokens carry their own leading spaces; word-level tokens do not.
    return "" if any(t[:1].isspace() for t in tokens) else " "


def _shade(value: float, scale: float) -> str | None:
    a = min(1.0, abs(value) / scale) if scale > 0 else 0.0
    if a < 0.05:
        return None
    fade = int(round(235 * (1.0 - a)))
    rgb = (255, fade, fade) if value > 0 else (fade, fade, 255)
    return f"black on rgb({rgb[0]},{rgb[1]},{rgb[2]})"


def heat_map(tokens: list[str], values: np.ndarray) -> Text:
    """The tokens of a sequence, each coloured by its share of the score."""
    values = np.asarray(values, dtype=np.float64)
    scale = float(np.abs(values).max()) if len(values) else 0.0
    sep = _sep(tokens)
    out = Text()
    for i, (tok, v) in enumerate(zip(tokens, values)):
        if i and sep:
            out.append(sep)
        out.append(tok.replace("\n", "⏎"), style=_shade(float(v), scale) or "")
    return out


def top_tokens(tokens: list[str], values: np.ndarray, n: int = 5) -> Table:
    """The tokens that carry most of the score, positive and negative."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(-values)
    t = Table(box=None, show_header=True, pad_edge=False)
    t.add_column("helps (+)", style="red")
    t.add_column("", justify="right")
    t.add_column("hurts (−)", style="blue")
    t.add_column("", justify="right")
    pos = [i for i in order if values[i] > 0][:n]
    neg = [i for i in order[::-1] if values[i] < 0][:n]
    for r in range(max(len(pos), len(neg), 1)):
        a = pos[r] if r < len(pos) else None
        b = neg[r] if r < len(neg) else None
        t.add_row(
            f"{tokens[a].strip()!s} @{a}" if a is not None else "",
            f"{values[a]:+.3g}" if a is not None else "",
            f"{tokens[b].strip()!s} @{b}" if b is not None else "",
            f"{values[b]:+.3g}" if b is not None else "",
        )
    return t


def layer_bars(layer_scores: dict[str, float] | str, width: int = 40) -> Text:
    """A diverging horizontal bar per layer: blue to the left of the axis, red to the right."""
    if isinstance(layer_scores, str):
        layer_scores = json.loads(layer_scores or "{}")
    if not layer_scores:
        return Text("(no per-layer scores stored)")
    items = list(layer_scores.items())
    scale = max(abs(v) for _, v in items) or 1.0
    half = max(4, width // 2)
    label_w = max(len(f"layer {k}" if k.isdigit() else k) for k, _ in items)
    out = Text()
    for k, v in items:
        label = f"layer {k}" if k.isdigit() else k
        n = int(round(abs(v) / scale * half))
        out.append(f"{label:>{label_w}} ")
        out.append(" " * (half - n if v < 0 else half))
        if v < 0:
            out.append("█" * n, style="blue")
        out.append("│")
        if v > 0:
            out.append("█" * n, style="red")
            out.append(" " * (half - n))
        else:
            out.append(" " * half)
        out.append(f" {v:+.3g}\n")
    return out


SPARK = "▁▂▃▄▅▆▇█"


def layer_spark(layer_scores: dict[str, float]) -> Text:
    """One character per layer, its height the layer's share of the largest magnitude: red where
    the layer raises the completion, blue where it lowers it (the layer chart in one line)."""
    values = list(layer_scores.values())
    scale = max((abs(v) for v in values), default=0.0) or 1.0
    out = Text()
    for v in values:
        out.append(SPARK[min(len(SPARK) - 1, int(abs(v) / scale * (len(SPARK) - 1) + 0.5))], style="red" if v > 0 else "blue")
    return out


def query_tokens(tokens: list[str], completion_start: int) -> Text:
    """A query's tokens, the measured (completion) ones highlighted."""
    sep = _sep(tokens)
    out = Text()
    for i, tok in enumerate(tokens):
        if i and sep:
            out.append(sep)
        out.append("[" + tok.replace("\n", "⏎") + "]", style="bold reverse" if i >= completion_start else "dim")
    return out


def snippet(text: str, n: int = 60) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= n else text[: n - 1] + "…"


def middle_snippet(text: str, n: int) -> str:
    """``text`` in at most ``n`` characters, elided in the middle (:func:`inflq.display.middle_ellipsis`)."""
    from ..display import middle_ellipsis

    return middle_ellipsis(text, n)


def eta(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(round(seconds))
    return f"ETA {seconds // 60}:{seconds % 60:02d}"
