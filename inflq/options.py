"""Declared plugin options, so that the CLI and the TUI can offer them without plugin-specific code.

Plugins are chosen by a *spec string*: ``name`` or ``name:key=value,key=value``. Filters may be
joined with ``+`` to take the union of their candidates (``tfidf:k=1000+random:n=500``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import InflqError


def parse_bool(raw: Any) -> bool:
    """A bool, or a word for one (1/true/yes/on, 0/false/no/off, any case); ValueError otherwise.
    Plugins' options and the core's settings parse booleans with it alike."""
    if isinstance(raw, bool):
        return raw
    word = str(raw).strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)

@dataclass(frozen=True)
class Option:
    """One setting a plugin accepts.

    ``type`` is one of ``int``, ``float``, ``str``, ``bool``; ``choices`` restricts a ``str``.
    A default of ``None`` means "not set" (the plugin decides, e.g. a heuristic).
    """

    name: str
    type: type = str
    default: Any = None
    help: str = ""
    choices: tuple[str, ...] | None = None

    def parse(self, raw: Any, owner: str) -> Any:
        if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("", "none", "auto")):
            if self.type is str and isinstance(raw, str) and raw.strip().lower() == "auto":
                return "auto"
            return None
        try:
            if self.type is bool:
                return parse_bool(raw)
            value = self.type(raw)
        except (TypeError, ValueError):
            raise InflqError(
                f"{owner}: option {self.name}={raw!r} is not a valid {self.type.__name__}; "
                f"give e.g. {self.name}={self.default if self.default is not None else '...'}"
            ) from None
        if self.choices and value not in self.choices:
            raise InflqError(
                f"{owner}: option {self.name}={value!r} is not one of {', '.join(self.choices)}"
            )
        return value


@dataclass
class PluginSpec:
    """A parsed ``name:key=value,...`` string."""

    name: str
    options: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        if not self.options:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in self.options.items())


def parse_spec(text: str) -> PluginSpec:
    """Parse ``name:key=value,key=value`` into a :class:`PluginSpec`."""
    text = text.strip()
    if not text:
        raise InflqError("empty plugin name; give e.g. --estimator ekfac")
    name, _, rest = text.partition(":")
    options: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise InflqError(f"bad option {part!r} in {text!r}; write key=value, e.g. {name}:k=100")
        options[key.strip()] = value.strip()
    return PluginSpec(name.strip(), options)


def parse_specs(text: str) -> list[PluginSpec]:
    """Parse ``a:k=v+b:k=v`` (a union of filters) into its parts."""
    return [parse_spec(part) for part in text.split("+")]


def resolve_options(owner: str, declared: tuple[Option, ...], given: dict[str, Any]) -> dict[str, Any]:
    """Check ``given`` against ``declared`` and return every option with its typed value."""
    by_name = {o.name: o for o in declared}
    unknown = sorted(set(given) - set(by_name))
    if unknown:
        known = ", ".join(by_name) or "none"
        raise InflqError(f"{owner}: unknown option {', '.join(unknown)} (its options: {known})")
    resolved = {o.name: o.default for o in declared}
    for key, raw in given.items():
        resolved[key] = by_name[key].parse(raw, owner)
    return resolved
