"""Compact (one-line) form widgets, so forms fit an 80x24 terminal."""

from __future__ import annotations

from textual.widgets import Button, Checkbox, Input, Select


def CInput(*args, **kwargs) -> Input:
    return Input(*args, compact=True, **kwargs)


def CSelect(*args, **kwargs) -> Select:
    return Select(*args, compact=True, **kwargs)


def CButton(*args, **kwargs) -> Button:
    return Button(*args, compact=True, **kwargs)


def CCheckbox(*args, **kwargs) -> Checkbox:
    return Checkbox(*args, compact=True, **kwargs)
