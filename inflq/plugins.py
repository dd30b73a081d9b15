"""The plugin manager: built-ins and third-party plugins load the same way, from the ``inflq``
entry-point group. ``INFLQ_LOAD_PLUGINS=name,name`` restricts which entry points load (an empty
value loads none); a plugin that fails to import is reported by ``inflq plugins`` and skipped."""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass
from importlib import metadata
from types import ModuleType

import pluggy

from . import hookspecs
from .base import Attribution, Estimator, Executor, Filter, Measurement, Plugin, Trainer
from .errors import InflqError


@dataclass
class LoadedPlugin:
    name: str
    module: str
    distribution: str
    error: str | None = None


class Registry:
    """The loaded plugins and the estimator, filter, attribution, executor, trainer and measurement classes they register."""

    KINDS = {"estimator": Estimator, "filter": Filter, "attribution": Attribution, "executor": Executor, "trainer": Trainer,
             "measurement": Measurement}

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("inflq")
        self.pm.add_hookspecs(hookspecs)
        self.loaded: list[LoadedPlugin] = []
        self.classes: dict[str, dict[str, type[Plugin]]] = {k: {} for k in self.KINDS}
        self.origin: dict[tuple[str, str], str] = {}
        self._collected = False

    def load_entry_points(self) -> None:
        allowed = os.environ.get("INFLQ_LOAD_PLUGINS")
        allow = None if allowed is None else {s.strip() for s in allowed.split(",") if s.strip()}
        for ep in metadata.entry_points(group="inflq"):
            dist = ep.dist.name if ep.dist is not None else "?"
            if allow is not None and ep.name not in allow and f"{dist}.{ep.name}" not in allow and dist not in allow:
                continue
            try:
                mod = ep.load()
                self.register(mod, name=f"{dist}.{ep.name}", distribution=dist)
            except Exception as exc:  # a broken plugin must not take inflq down
                self.loaded.append(LoadedPlugin(f"{dist}.{ep.name}", ep.value, dist, _one_line(exc)))

    def register(self, module: ModuleType | object, name: str | None = None, distribution: str = "(local)") -> None:
        """Register a plugin module or object (as entry points and tests do)."""
        name = name or getattr(module, "__name__", repr(module))
        if self.pm.get_plugin(name) is not None:
            return
        self.pm.register(module, name=name)
        self.loaded.append(LoadedPlugin(name, getattr(module, "__name__", type(module).__name__), distribution))
        self._collected = False

    def _collect(self) -> None:
        if self._collected:
            return
        self.classes = {k: {} for k in self.KINDS}
        hooks = {
            "estimator": self.pm.hook.register_estimators,
            "filter": self.pm.hook.register_filters,
            "attribution": self.pm.hook.register_attributions,
            "executor": self.pm.hook.register_executors,
            "trainer": self.pm.hook.register_trainers,
            "measurement": self.pm.hook.register_measurements,
        }
        for kind, hook in hooks.items():
            for impl in hook.get_hookimpls():
                plugin_name = self.pm.get_name(impl.plugin) or "?"

                def register(cls, kind=kind, plugin_name=plugin_name):
                    base = self.KINDS[kind]
                    if not (isinstance(cls, type) and issubclass(cls, base)) or not cls.name:
                        raise InflqError(f"plugin {plugin_name} registered {cls!r}, which is not a named {base.__name__} subclass")
                    self.classes[kind][cls.name] = cls
                    self.origin[(kind, cls.name)] = plugin_name

                try:
                    impl.function(register=register)
                except Exception as exc:
                    for lp in self.loaded:
                        if lp.name == plugin_name:
                            lp.error = _one_line(exc)
        self._collected = True

    def names(self, kind: str) -> list[str]:
        self._collect()
        return sorted(self.classes[kind])

    def get(self, kind: str, name: str) -> type[Plugin]:
        self._collect()
        try:
            return self.classes[kind][name]
        except KeyError:
            have = ", ".join(sorted(self.classes[kind])) or "none loaded"
            raise InflqError(f"no {kind} named {name!r} (available: {have}); see `inflq plugins`") from None

    def create(self, kind: str, name: str, options: dict | None = None) -> Plugin:
        return self.get(kind, name)(**(options or {}))

    def default(self, kind: str, required: bool = True) -> str | None:
        """The name of the ``kind`` registered with ``default = True`` (the first by name if several);
        None, or an error when ``required``, if no loaded plugin is the default."""
        names = [n for n, cls in sorted(self.all(kind).items()) if cls.default]
        if not names and not required:
            return None
        if not names:
            raise InflqError(f"no default {kind} is loaded; name one (see `inflq plugins`)")
        return names[0]

    def comparison(self, kind: str = "estimator") -> list[str]:
        """The names of the ``kind`` plugins compared when none are named (``inflq validate``):
        those with a ``compared`` place, in its order (then by name)."""
        ranked = [(cls.compared, name) for name, cls in self.all(kind).items() if getattr(cls, "compared", None) is not None]
        if not ranked:
            raise InflqError(f"no loaded {kind} is in the default comparison set; name the {kind}s to compare (see `inflq plugins`)")
        return [name for _, name in sorted(ranked)]

    def joining(self, kind: str = "filter") -> type[Plugin]:
        """The ``kind`` plugin that combines others (``joins``: the option holding their ``+``-joined
        specs), the first by name if several; an error if none is loaded."""
        names = [n for n, cls in sorted(self.all(kind).items()) if getattr(cls, "joins", None)]
        if not names:
            raise InflqError(f"no loaded {kind} combines {kind}s joined with +; name one {kind} (see `inflq plugins`)")
        return self.all(kind)[names[0]]

    def all(self, kind: str) -> dict[str, type[Plugin]]:
        self._collect()
        return dict(self.classes[kind])


def _one_line(exc: BaseException) -> str:
    last = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f" ({last[0].filename}:{last[0].lineno})" if last else ""
    return f"{type(exc).__name__}: {exc}{where}".replace("\n", " ")


_registry: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, loading entry points on first use."""
    global _registry
    if _registry is None:
        _registry = Registry()
        _registry.load_entry_points()
    return _registry


def reset_registry() -> None:
    """Forget loaded plugins (tests)."""
    global _registry
    _registry = None
