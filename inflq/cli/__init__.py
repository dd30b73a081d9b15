"""The ``inflq`` command line: scriptable commands over the same core the TUI uses.

:mod:`.common` holds the group, the error handling and the helpers every command shares; each other
module holds one group of commands, and this file adds them all to the group, in this one place.
Plugins add theirs through the ``register_commands`` hook when :func:`main` starts.
"""

from __future__ import annotations

from . import (
    ask_commands,
    demo_commands,
    housekeeping_commands,
    investigation_commands,
    plan_commands,
    plugin_commands,
    project_commands,
    result_commands,
    run_commands,
    sharing_commands,
    validate_commands,
)
from .common import add_plugin_commands, cli, main

for _module in (project_commands, investigation_commands, run_commands, ask_commands, housekeeping_commands, plan_commands, result_commands, validate_commands, sharing_commands, plugin_commands, demo_commands):
    for _command in _module.COMMANDS:
        cli.add_command(_command)

__all__ = ["add_plugin_commands", "cli", "main"]
