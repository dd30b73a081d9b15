"""``inflq plugins``: what the loaded plugins provide."""

from __future__ import annotations

import json

import click

from .common import make_console


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def plugins(as_json):
    """List loaded plugins, what they provide, and any that failed to load."""
    from rich.table import Table

    from ..plugins import get_registry

    reg = get_registry()
    kinds = tuple(reg.KINDS)
    if as_json:
        click.echo(json.dumps({
            "plugins": [lp.__dict__ for lp in reg.loaded],
            **{k: {n: {"plugin": reg.origin[(k, n)], "description": c.description, "options": [o.name for o in c.options]} for n, c in reg.all(k).items()} for k in kinds},
        }, indent=2))
        return
    t = Table("plugin", "module", "distribution", "status")
    for lp in reg.loaded:
        t.add_row(lp.name, lp.module, lp.distribution, "[red]failed: " + lp.error + "[/]" if lp.error else "ok")
    make_console().print(t)
    t = Table("kind", "name", "from", "description", "options")
    for k in kinds:
        for n, c in reg.all(k).items():
            t.add_row(k, n, reg.origin[(k, n)], c.description, ", ".join(f"{o.name}={o.default}" for o in c.options))
    make_console().print(t)


COMMANDS = (plugins,)
