"""Errors that reach the user as one line, never a traceback."""

from __future__ import annotations


class InflqError(Exception):
    """A problem the user can fix. The message names the problem and what to do about it."""


class Cancelled(InflqError):
    """Raised inside long work when the user asked it to stop."""

    def __init__(self, message: str = "cancelled by the user") -> None:
        super().__init__(message)


class CatalogDamaged(InflqError):
    """The catalog file cannot be read as a database: ``inflq check --repair`` restores a copy."""


class NumericalError(InflqError):
    """Non-finite gradients or scores: usually an overflow in low precision."""
