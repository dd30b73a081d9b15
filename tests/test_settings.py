"""Every core setting is declared once (inflq/settings.py): the command line's options and the TUI's
forms are generated from the declarations, with the same defaults, and the built-ins the core used
to name (validate's comparison set, the union filter) come from the registry."""

from __future__ import annotations

import inspect
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from inflq.errors import InflqError
from inflq.plugins import get_registry, reset_registry
from inflq.project import ProjectConfig
from inflq.settings import DeviceSettings, RunSettings, ValidationSettings

DECLARATIONS = (RunSettings, DeviceSettings, ValidationSettings, ProjectConfig)
# Every group a setting may name: a command (its path under `inflq`) or a TUI form.
COMMANDS = {
    "run": ("run",), "factors fit": ("factors", "fit"), "plan": ("plan",), "index build": ("index", "build"),
    "self-influence": ("self-influence",), "probe score": ("probe", "score"), "demo": ("demo",), "validate": ("validate", "run"), "ask": ("ask",), "init": ("init",),
}
FORMS = {"run form", "validate form"}
VALIDATIONS = {"pbrf", "lds", "loo"}  # the keyword arguments of validate, validate_lds, validate_loo
# What each command takes beside its declared settings: its own options, not settings of a run.
OWN = {
    "run": {"investigation", "address", "resume"},
    "factors fit": {"investigation", "resume"},
    "plan": {"investigation", "memory", "calibration", "as_json"},
    "index build": {"k_s", "k_a", "budget", "kind", "fit_estimator", "seed", "shard_size"},
    "self-influence": {"k", "recompute"},
    "probe score": {"query_id"},
    "demo": {"headless"},
    "validate": {"investigation"},
    "init": {"model", "adapter", "base", "corpus", "name", "max_length", "modules", "add_bos"},
    "ask": {"depth", "k", "bottom", "as_json", "save", "investigation", "no_index", "chat", "index_key", "rank"},
}


def command(group: str) -> click.Command:
    from inflq.cli import add_plugin_commands, cli

    add_plugin_commands()  # `index build` is the gradient index plugin's
    cmd: click.Command = cli
    for name in COMMANDS[group]:
        cmd = cmd.commands[name]  # type: ignore[attr-defined]
    return cmd


def test_every_group_is_a_command_a_form_or_a_validation():
    named = {g for cls in DECLARATIONS for s in cls.declared() for g in s.groups}
    assert named <= set(COMMANDS) | FORMS | VALIDATIONS, named - set(COMMANDS) - FORMS - VALIDATIONS
    assert set(COMMANDS) | FORMS <= named


@pytest.mark.parametrize("group", sorted(COMMANDS))
def test_each_command_offers_exactly_its_declared_settings_with_their_defaults(group):
    """The options a command has are its declared settings (flag, default, help, type) and its
    own, listed in OWN: a setting written into a command by hand, not declared, fails here."""
    cmd = command(group)
    options = {p.name: p for p in cmd.params if isinstance(p, click.Option)}
    declared = [s for cls in DECLARATIONS for s in cls.declared(group)]
    assert declared, group
    for s in declared:
        opt = options.pop(s.name, None)
        assert opt is not None, f"{group} does not offer {s.flags[0]}"
        assert tuple(opt.opts) == s.flags and opt.help.startswith(s.help), (group, s.name, opt.opts, opt.help)
        assert opt.default == (bool(s.default) if s.type is bool else s.cli_default), (group, s.name, opt.default)
    assert set(options) == OWN[group], f"{group}: options that are neither declared settings nor its own: {set(options) - OWN[group]}"
    help_text = CliRunner().invoke(cmd, ["--help"], terminal_width=400).output
    for s in declared:
        lines = help_text.splitlines()
        at = next((i for i, ln in enumerate(lines) if ln.strip().startswith(s.flags[0] + " ")), None)
        assert at is not None, (group, s.flags[0], help_text)
        # The option's entry: its line and the help that click wraps onto the next (a long metavar).
        wrapped = itertools.takewhile(lambda ln: ln.startswith(" " * 4) and not ln.strip().startswith("-"), lines[at + 1:])
        line = " ".join([lines[at], *(ln.strip() for ln in wrapped)])
        if s.type is not bool and s.cli_default is not None:
            assert f"[default: {s.cli_default}]" in line, (group, line)


@pytest.mark.parametrize("group", sorted(VALIDATIONS))
def test_the_validations_take_the_declared_settings_and_defaults(group):
    from inflq.lds import validate_lds, validate_loo
    from inflq.validate import validate

    fn = {"pbrf": validate, "lds": validate_lds, "loo": validate_loo}[group]
    params = inspect.signature(fn).parameters
    declared = {s.name: s.default for s in ValidationSettings.declared(group)}
    taken = {n: p.default for n, p in params.items() if n not in ("project", "investigation", "modules", "monitor", "save")}
    assert taken == declared


def test_a_setting_parses_as_declared_and_says_what_is_wrong():
    rank = RunSettings.declaration("rank")
    assert rank.parse("8") == 8 and rank.parse(" full ") is None and rank.parse("") == 32
    with pytest.raises(InflqError, match=r"^--rank must be at least 1, not 0$"):
        rank.parse("0", "--rank")
    with pytest.raises(InflqError, match=r"^rank must be a whole number or 'full', not 'lots'$"):
        rank.parse("lots")
    dampings = ValidationSettings.declaration("dampings")
    assert dampings.parse("1e-3, 1") == [1e-3, 1.0] and dampings.parse(" ") is None and dampings.shown([1e-3, 1.0]) == "0.001,1"
    with pytest.raises(InflqError, match=r"dampings must be a number, not 'x' in '1e-3,x'"):
        dampings.parse("1e-3,x")
    dtype = DeviceSettings.declaration("dtype")
    with pytest.raises(InflqError, match="dtype must be one of auto, float32, bfloat16, float16, not 'f8'"):
        dtype.parse("f8")


def test_a_bad_value_on_the_command_line_is_one_line(cli_run, tmp_path):
    code, out, err = cli_run("run", tmp_path / "nowhere", "--top-k", "0")
    assert code == 1 and err == "Error: --top-k must be at least 1, not 0\n", err
    code, out, err = cli_run("validate", tmp_path / "nowhere", "--dampings", "1e-3,lots")
    assert code == 1 and err == "Error: --dampings must be a number, not 'lots' in '1e-3,lots'\n", err
    code, out, err = cli_run("validate", tmp_path / "nowhere", "--lds", "--loo", "4")
    assert code == 1 and err == "Error: --lds and --loo are two validations; give one\n", err


def test_from_values_takes_the_project_seed_where_none_is_given(project):
    project.config.seed = 41
    assert RunSettings.from_values({"seed": None, "rank": None, "dtype": "float32"}, project) == RunSettings(seed=41, rank=None)
    assert RunSettings.from_values({"seed": 3}, project).seed == 3
    assert RunSettings.from_values({}, project).seed == 41  # the TUI's form offers no seed
    assert RunSettings.from_values({"seed": None}).seed == 0  # no project: the field's default


# -- the guard: a setting added to a declaration reaches the CLI and the TUI -------------------------
ADDED = """
import asyncio, dataclasses, json, sys
import inflq.settings as S

@dataclasses.dataclass
class Run(S.RunSettings):
    warmup_steps: int = S.setting(7, "Warm-up steps, added by the guard test.", type=int, minimum=1, groups=("run", "run form"))

@dataclasses.dataclass
class Validation(S.ValidationSettings):
    probes_per_query: float = S.setting(2.5, "Probes per query, added by the guard test.", type=float, groups=("validate", "validate form", "pbrf"))

S.RunSettings, S.ValidationSettings = Run, Validation  # before any front end is imported

from click.testing import CliRunner
import inflq.cli as c
from inflq.tui.app import InflqApp
from inflq.tui.screens.tools import ValidateScreen

found = {}
for cmd, args in (("run", ["run"]), ("validate", ["validate", "run"])):
    text = CliRunner().invoke(c.cli, [*args, "--help"], terminal_width=400).output
    found[cmd] = [" ".join(ln.split()) for ln in text.splitlines() if "added by the guard test" in ln]

async def go():
    app = InflqApp(sys.argv[1])
    async with app.run_test(size=(100, 40)) as pilot:
        await pilot.press("3")
        await pilot.pause()
        pane = app.screen.query_one("#pane-run")
        found["run form"] = app.screen.query_one("#run-warmup_steps").value
        found["run form settings"] = pane.settings().warmup_steps
        app.screen.query_one("#run-warmup_steps").value = "11"
        found["run form typed"] = pane.settings().warmup_steps
        app.push_screen(ValidateScreen())
        await pilot.pause()
        found["validate form"] = app.screen.query_one("#val-probes_per_query").value
        found["validate form arguments"] = app.screen._arguments()["probes_per_query"]

asyncio.run(go())
print(json.dumps(found))
"""


def test_a_setting_added_to_a_declaration_appears_in_the_cli_and_the_tui_with_its_default(project):
    """The guard the declaration exists for: add a field to RunSettings and to ValidationSettings
    (in a fresh process, before the front ends import them), and `inflq run --help`, `inflq
    validate --help`, the TUI's run form and its validate form all offer it, with its default;
    what is typed into the form reaches the settings."""
    pytest.importorskip("textual")
    project.close()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-c", ADDED, str(project.root)], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    found = json.loads(p.stdout.strip().splitlines()[-1])
    assert found["run"] == ["--warmup-steps INTEGER Warm-up steps, added by the guard test. [default: 7]"], found
    assert found["validate"] == ["--probes-per-query FLOAT Probes per query, added by the guard test. [default: 2.5]"], found
    assert (found["run form"], found["run form settings"], found["run form typed"]) == ("7", 7, 11)
    assert (found["validate form"], found["validate form arguments"]) == ("2.5", 2.5)


# -- built-ins come from the registry -----------------------------------------------------------------
@pytest.fixture
def registry():
    reset_registry()
    yield get_registry()
    reset_registry()


def test_validate_compares_the_registry_comparison_set_and_sweeps_the_default_estimator(registry, monkeypatch):
    from inflq import Estimator, hookimpl
    from inflq.lds import compared_specs

    assert compared_specs(None, None) == (["identity", "ekfac", "lissa"], None)
    assert compared_specs(["kfac"], [1e-3]) == (["kfac", "ekfac:damping=0.001"], "ekfac")

    class Mine(Estimator):
        name = "mine"
        compared = 1.5  # between ekfac and lissa

    class Plugin:
        @hookimpl
        def register_estimators(self, register):
            register(Mine)

    registry.register(Plugin(), name="mine")
    assert registry.comparison() == ["identity", "ekfac", "mine", "lissa"]
    assert compared_specs(None, None)[0] == ["identity", "ekfac", "mine", "lissa"]
    monkeypatch.setattr(Mine, "default", True)
    monkeypatch.setattr(registry.all("estimator")["ekfac"], "default", False)
    with pytest.raises(InflqError, match="--dampings sweeps the default estimator's damping, and mine has no damping option"):
        compared_specs(None, [1.0])


def test_a_filter_spec_joined_with_plus_is_made_by_the_registry_joining_filter(registry):
    from inflq import Filter, Option, hookimpl
    from inflq.runs import make_filter

    assert type(make_filter("all+random:n=3")).__name__ == "Union"

    class Both(Filter):
        name = "a-both"  # first by name: chosen over union
        joins = "parts"
        options = (Option("parts", str, None, "filters joined with +"),)

    class Plugin:
        @hookimpl
        def register_filters(self, register):
            register(Both)

    registry.register(Plugin(), name="both")
    made = make_filter("all+random:n=3")
    assert isinstance(made, Both) and made.settings["parts"] == "all+random:n=3"


def test_no_joining_filter_is_a_clear_error(registry, monkeypatch):
    from inflq.runs import make_filter

    monkeypatch.setattr(registry.all("filter")["union"], "joins", None)
    with pytest.raises(InflqError, match="no loaded filter combines filters joined with"):
        make_filter("all+random:n=3")


def test_the_core_names_no_built_in_as_a_default():
    """The literals the core used to default to (validate's comparison set, the union filter)
    are gone from inflq/: the registry names them (built-ins say so in their classes)."""
    root = Path(__file__).resolve().parents[1] / "inflq"
    offenders = []
    for path in root.rglob("*.py"):
        text = path.read_text()
        for needle in ('"identity", "ekfac", "lissa"', "identity,ekfac,lissa", '("filter", "union")', 'ekfac:damping={'):
            if needle in text:
                offenders.append(f"{path.relative_to(root)}: {needle}")
    assert offenders == []


def test_run_settings_round_trip_through_json():
    s = RunSettings(estimator="ekfac", rank=None, seed=5)
    assert RunSettings.from_json(s.to_json()) == s
    assert json.loads(s.to_json())["rank"] is None
