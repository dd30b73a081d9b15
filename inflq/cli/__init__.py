"""The ``inflq`` command line: scriptable commands over the same core the TUI uses.

:mod:`.base` holds the group, the error handling and the helpers every command shares; each other
module holds one group of commands, and this file adds them all to the group, in this one place.
Plugins add theirs through the ``register_commands`` hook when :func:`main` starts.
"""

from __future__ import annotations

from . import demo, investigations, plan, plugins, project, results, runs, sharing, validate
from .base import add_plugin_commands, cli, main

for _module in (project, investigations, runs, plan, results, validate, sharing, plugins, demo):
    for _command in _module.COMMANDS:
        cli.add_command(_command)

__all__ = ["add_plugin_commands", "cli", "main"]
