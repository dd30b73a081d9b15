"""Every hook has a docstring, a documented signature in docs/plugins.md, and a test that calls it."""

from __future__ import annotations

import inspect
from pathlib import Path

import click
import pytest

from inflq import hookspecs

ROOT = Path(__file__).resolve().parents[1]
HOOKS = sorted(n for n, f in vars(hookspecs).items() if inspect.isfunction(f) and hasattr(f, "inflq_spec"))


def test_there_are_hooks():
    assert {"register_estimators", "register_filters", "register_attributions", "register_executors", "register_commands"} <= set(HOOKS)


@pytest.mark.parametrize("name", HOOKS)
def test_hook_has_docstring_and_documented_signature(name):
    fn = getattr(hookspecs, name)
    assert (fn.__doc__ or "").strip(), f"{name} has no docstring"
    sig = f"{name}{inspect.signature(fn)}".replace("typing.", "").replace("'", "")
    doc = (ROOT / "docs" / "plugins.md").read_text()
    assert sig in doc, f"docs/plugins.md does not document `{sig}`"


def test_hook_calls_are_recorded_from_real_calls_only():
    """The suite counts a hook as tested only when a test calls it through a plugin manager
    (tests/hookcalls.py, checked at the end of a whole run in conftest.py): naming it in a comment
    or a string does not count, and a hook never called is reported."""
    from hookcalls import HookCalls

    from inflq.plugins import Registry

    # hook.register_trainers, in a comment, and "hook.register_commands" in a string: not calls
    calls = HookCalls()
    reg = Registry()
    calls.record(reg.pm)
    assert set(calls.missing()) == set(HOOKS)
    reg.pm.hook.register_estimators(register=lambda cls: None)
    assert calls.called == {"register_estimators"}
    assert "register_estimators" not in calls.missing() and "register_trainers" in calls.missing()


# -- the calls ------------------------------------------------------------------------------------------
def collect(hook) -> dict[str, type]:
    got: dict[str, type] = {}
    hook(register=lambda cls: got.__setitem__(cls.name, cls))
    return got


def test_register_estimators_reaches_builtins_and_plugins():
    from inflq import Estimator
    from inflq.plugins import get_registry

    got = collect(get_registry().pm.hook.register_estimators)
    assert {"identity", "ekfac", "kfac", "diagonal", "lissa", "tracin"} <= set(got)
    assert all(issubclass(c, Estimator) and c.description for c in got.values())


def test_register_filters_attributions_executors():
    from inflq import Attribution, Executor, Filter
    from inflq.plugins import get_registry

    hook = get_registry().pm.hook
    for call, base in ((hook.register_filters, Filter), (hook.register_attributions, Attribution), (hook.register_executors, Executor)):
        got = collect(call)
        assert got and all(issubclass(c, base) and c.name for c in got.values())
    assert "local" in collect(hook.register_executors)
    assert "all" in collect(hook.register_filters)


def test_register_trainers_reaches_the_builtin_trainer():
    from inflq import Trainer
    from inflq.plugins import get_registry

    got = collect(get_registry().pm.hook.register_trainers)
    assert "adamw" in got and all(issubclass(c, Trainer) and c.description for c in got.values())
    assert get_registry().default("trainer") == "adamw"


def test_register_measurements_reaches_the_builtin_measurements():
    from inflq import Measurement
    from inflq.plugins import get_registry

    got = collect(get_registry().pm.hook.register_measurements)
    assert {"logprob", "mean-logprob", "margin"} <= set(got) and all(issubclass(c, Measurement) and c.description for c in got.values())
    assert get_registry().default("measurement") == "logprob"


def test_register_commands_adds_commands_to_a_group():
    from inflq.plugins import get_registry

    @click.group()
    def group():
        pass

    get_registry().pm.hook.register_commands(cli=group)
    assert "checkpoint" in group.commands  # from the tracin plugin


def test_a_local_plugin_object_registers_through_the_same_hooks():
    from inflq import Estimator, hookimpl
    from inflq.plugins import Registry

    class Doubler(Estimator):
        name = "doubler"
        description = "2 × identity (test)"

        def precondition(self, grads):
            return {k: 2 * v for k, v in grads.items()}

    class Plugin:
        @hookimpl
        def register_estimators(self, register):
            register(Doubler)

    reg = Registry()
    reg.register(Plugin(), name="test-doubler")
    assert reg.names("estimator") == ["doubler"]
    assert reg.origin[("estimator", "doubler")] == "test-doubler"
