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
    from rich.text import Text

    from ..plugins import get_registry

    reg = get_registry()
    kinds = tuple(reg.KINDS)
    if as_json:
        click.echo(json.dumps({
            "plugins": [lp.__dict__ for lp in reg.loaded],
            **{k: {n: {"plugin": reg.origin[(k, n)], "description": c.description, "options": [o.name for o in c.options]} for n, c in reg.all(k).items()} for k in kinds},
        }, indent=2))
        return
    console = make_console()
    t = Table("plugin", "module", "distribution", "status")
    for lp in reg.loaded:
        t.add_row(lp.name, lp.module, lp.distribution, "[red]failed: " + lp.error + "[/]" if lp.error else "ok")
    console.print(t)
    # One block per kind, a row per plugin whose description and options wrap: nothing is cut at
    # 80 columns (a five-column table cut the options to "num_workers=No…").
    for k in kinds:
        items = reg.all(k)
        if not items:
            continue
        console.print(Text(f"\n{k}s", style="bold"))
        grid = Table.grid(padding=(0, 2))
        grid.add_column(no_wrap=True)
        grid.add_column(overflow="fold")
        for n, c in items.items():
            body = Text(c.description or "")
            body.append(f"  (from {reg.origin[(k, n)]})", style="dim")
            if c.options:
                body.append("\noptions: " + ", ".join(f"{o.name}={o.default}" for o in c.options))
            grid.add_row(Text(n, style="bold"), body)
        console.print(grid)


COMMANDS = (plugins,)
