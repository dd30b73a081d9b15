"""Form fields generated from the core's declared settings (``inflq/settings.py``), as the
command line's options are: a setting added there appears in its forms with the same default.

A field is a label (the setting's name) and one compact widget with id ``{prefix}-{name}``: a
checkbox for a flag, a select for a setting with choices, else an input holding the default
(blank for ``None`` and for advanced settings, whose placeholder says what blank means)."""

from __future__ import annotations

from typing import Any

from textual.containers import Horizontal
from textual.dom import DOMNode
from textual.widgets import Checkbox, Label, Select

from ..settings import Setting
from .compact import CCheckbox, CInput, CSelect


def setting_field(s: Setting, prefix: str) -> Horizontal:
    """The row offering ``s``: its label and its widget (``#{prefix}-{name}``)."""
    wid = f"{prefix}-{s.name}"
    widget: Any
    if s.type is bool and not s.many:
        widget = CCheckbox(s.name, value=bool(s.default), id=wid)
    elif s.choices:
        widget = CSelect([(c, c) for c in s.choices], value=s.default if s.default in s.choices else Select.BLANK, id=wid)
    else:
        widget = CInput("" if s.advanced else s.shown(), placeholder=s.form_hint(), id=wid)
    widget.tooltip = s.help
    return Horizontal(Label(s.name, classes="field-label"), widget, classes="field")


def setting_value(root: DOMNode, s: Setting, prefix: str) -> Any:
    """The value of ``s``'s field under ``root``, parsed as the command line parses it (blank: the
    default); a bad value raises an ``InflqError`` naming the field."""
    widget = root.query_one(f"#{prefix}-{s.name}")
    if isinstance(widget, Checkbox):
        return widget.value
    if isinstance(widget, Select):
        return s.default if widget.is_blank() else widget.value
    return s.parse(widget.value, s.name)
