"""How scores and ids are written, the same in the CLI, the TUI and the exports."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable


def score_format(values: Iterable[float]) -> Callable[[float], str]:
    """One format for a column of scores, so that they read and align alike: fixed-point with
    four significant digits for the largest when it is between 0.01 and 100000 (``+105.1``,
    ``-6947``, ``-13070``), else scientific for all (``-1.307e+05``). Never a mix of the two."""
    finite = [abs(float(v)) for v in values if v is not None and math.isfinite(float(v)) and v != 0]
    if not finite:
        return lambda v: f"{v:+.4g}"
    top = max(finite)
    if 1e-2 <= top < 1e5:
        decimals = max(0, 3 - math.floor(math.log10(top)))
        return lambda v: f"{v:+.{decimals}f}" if math.isfinite(v) else str(v)
    return lambda v: f"{v:+.3e}" if math.isfinite(v) else str(v)


def format_scores(values: Iterable[float]) -> list[str]:
    """``values`` written with one :func:`score_format`."""
    values = [float(v) for v in values]
    fmt = score_format(values)
    return [fmt(v) for v in values]


def middle_ellipsis(text: str, n: int) -> str:
    """``text`` in at most ``n`` characters, elided in the middle: ids differ at their ends
    (``fact-astrobia-president-fwd-02:0``), so both ends stay readable."""
    text = " ".join((text or "").split())
    if len(text) <= n:
        return text
    tail = min(len(text) // 2, max(1, (n - 1) // 3))
    return text[: n - 1 - tail] + "…" + text[-tail:]


def plural(n: int, word: str, many: str | None = None, *, sep: bool = True) -> str:
    """``n`` and ``word`` agreeing in number: ``1 query``, ``2 queries``, ``1,971 sequences``
    (``many``: an irregular plural; ``sep``: thousands separators)."""
    if many is None:
        many = word[:-1] + "ies" if word.endswith("y") and word[-2:-1] not in "aeiou" else word + ("es" if word.endswith(("s", "sh", "ch", "x")) else "s")
    count = f"{n:,}" if sep else str(n)
    return f"{count} {word if n == 1 else many}"


def size_text(n: float) -> str:
    """Bytes for people: ``0 B``, ``12.3 KB``, ``28.1 MB``, ``1.2 GB`` (powers of 1,000)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
