"""Which of inflq's hooks the tests really call: every plugin manager the registry makes is
monitored (pluggy's hookcall monitoring), so a hook counts only when some test calls it."""

from __future__ import annotations

import inspect
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def hook_names() -> list[str]:
    from inflq import hookspecs

    return sorted(n for n, f in vars(hookspecs).items() if inspect.isfunction(f) and hasattr(f, "inflq_spec"))


class HookCalls:
    def __init__(self) -> None:
        self.called: set[str] = set()

    def record(self, pm) -> None:
        """Count every call of ``pm``'s hooks from now on."""
        pm.add_hookcall_monitoring(lambda name, impls, kwargs: self.called.add(name), lambda outcome, name, impls, kwargs: None)

    def install(self) -> None:
        """Record the hooks of every registry made from now on (tests reset it, and make their own)."""
        from inflq import plugins

        if getattr(plugins.Registry, "_calls_recorded", False):
            return
        real_init = plugins.Registry.__init__

        def init(registry, *args, **kwargs):
            real_init(registry, *args, **kwargs)
            self.record(registry.pm)

        plugins.Registry.__init__ = init
        plugins.Registry._calls_recorded = True

    def missing(self) -> list[str]:
        return [n for n in hook_names() if n not in self.called]

    @staticmethod
    def whole_suite(session) -> bool:
        """Whether this run ran every test file of tests/, unfiltered (a -k or -m run, or a single file, is not)."""
        opt = session.config.option
        if getattr(opt, "keyword", "") or getattr(opt, "markexpr", "") or getattr(opt, "lf", False):
            return False
        ran = {Path(str(item.path)).resolve() for item in session.items}
        return set(TESTS.glob("test_*.py")) <= ran and session.testscollected == len(session.items)
