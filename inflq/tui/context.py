"""What the user is working on (the open project, investigation, query and result set), and the
message the app posts to every pane when it changes. Panes read it through ``Pane.context`` and
change it through ``Pane.set_context``; they never import the app."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from textual.message import Message


@dataclass(frozen=True, eq=False)
class Context:
    """One immutable snapshot; the app holds the current one in its reactive ``context`` (every
    change is a new object)."""

    project: Any = None
    investigation: str | None = None
    query_id: int | None = None
    result_set_id: int | None = None

    def changed(self, other: Context) -> frozenset[str]:
        """The names of the fields that differ from ``other``'s (the project: another object)."""
        def same(name: str) -> bool:
            mine, theirs = getattr(self, name), getattr(other, name)
            return mine is theirs or (name != "project" and mine == theirs)

        return frozenset(f.name for f in fields(self) if not same(f.name))


class ContextChanged(Message, bubble=False):
    """Posted to every pane when the context changes. ``origin`` is the pane that changed it (it
    has already updated itself), None when the app did."""

    def __init__(self, old: Context, new: Context, origin: object = None) -> None:
        super().__init__()
        self.old, self.new, self.origin = old, new, origin
        self.changed = new.changed(old)
