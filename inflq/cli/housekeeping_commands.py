"""Listing and removing runs, and reclaiming the files no record names: ``runs``, ``gc``."""

from __future__ import annotations

import click

from .. import catalog
from ..errors import InflqError
from .common import make_console, project_at


class ListByDefault(click.Group):
    """A group whose bare use lists: ``inflq runs PROJECT`` is ``inflq runs list PROJECT``."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["list", *args]
        return super().parse_args(ctx, args)


@click.group(cls=ListByDefault)
def runs():
    """List runs (`inflq runs PROJECT`) and remove them (`inflq runs rm PROJECT ID`)."""


@runs.command("list")
@click.argument("project")
@click.option("-i", "--investigation", help="Only this investigation's runs (default: all).")
def runs_list(project, investigation):
    """List runs with their status and progress."""
    from rich.table import Table

    p = project_at(project)
    t = Table("run", "status", "estimator", "filter", "phase", "progress", "seconds", "error")
    for r in catalog.runs_of(p.db, catalog.investigation(p.db, investigation)["id"] if investigation else None):
        t.add_row(str(r["id"]), r["status"], r["estimator"], r["filter"], r["phase"] or "", f"{r['done']}/{r['total']}", f"{r['seconds'] or 0:.1f}", (r["error"] or "")[:60])
    make_console().print(t)


@runs.command("rm")
@click.argument("project")
@click.argument("run_ids", nargs=-1, required=True, type=int, metavar="RUN...")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--force", is_flag=True, help="Remove a run that is still marked running (its process was killed).")
def runs_rm(project, run_ids, yes, force):
    """Remove runs with their result sets, stored sequences and files (factor sets stay: `inflq factors rm`)."""
    from ..display import plural, size_text
    from ..removal import remove_run

    p = project_at(project)
    rows = []
    for rid in dict.fromkeys(run_ids):
        row = catalog.get_run(p.db, rid)
        if row is None:
            raise InflqError(f"no run {rid} in this project; see `inflq runs {project}`")
        rows.append(row)
    what = ", ".join(f"run {r['id']} ({r['status']}, {r['estimator']} / {r['filter']})" for r in rows)
    if not yes and not click.confirm(f"remove {what} with its result set and files?"):
        raise InflqError("not removed")
    for r in rows:
        got = remove_run(p, r["id"], force=force)
        click.echo(f"removed run {r['id']}: {plural(got.files, 'file')}, {size_text(got.bytes)}")


@click.command()
@click.argument("project")
@click.option("--dry-run", is_flag=True, help="Only say what would be removed.")
def gc(project, dry_run):
    """Remove the files no catalog row names (those of removed runs, leftovers of interrupted writes) and say how much that frees."""
    from ..display import plural, size_text
    from ..layout import run_of
    from ..removal import GRACE_SECONDS, collect_garbage, orphans

    p = project_at(project)
    if dry_run:
        found = orphans(p)
        for o in found:
            click.echo(f"{o.path} ({size_text(o.size)}): {o.why}" + (" [written just now: kept]" if o.recent else ""))
        old = [o for o in found if not o.recent]
        click.echo(f"would free {size_text(sum(o.size for o in old))} in {plural(len(old), 'file')}")
        return
    got = collect_garbage(p)
    n = len(got.removed)
    of_runs = sorted({r for r in (run_of(o.path) for o in got.removed) if r is not None})
    detail = f" (of run{'s' if len(of_runs) != 1 else ''} {', '.join(map(str, of_runs))})" if of_runs else ""
    if not n and not got.kept and not got.folders:
        click.echo("no orphaned files: nothing to free")
    else:
        click.echo(f"freed {size_text(got.bytes)}: removed {plural(n, 'orphaned file')}{detail}"
                   + (f" and {got.folders} empty folder{'s' if got.folders != 1 else ''}" if got.folders else ""))
    if got.kept:
        click.echo(f"kept {len(got.kept)} orphaned file{'s' if len(got.kept) != 1 else ''} written in the last {GRACE_SECONDS / 60:.0f} minutes "
                   "(a process may be about to record it); run `inflq gc` again later")
    uses = catalog.factor_set_uses(p.db)
    unused = [f for f in catalog.factor_sets(p.db) if not uses.get(f["id"])]
    if unused:
        click.echo(f"note: {len(unused)} factor set{'s are' if len(unused) != 1 else ' is'} used by no run (cached for the next run); "
                   f"`inflq factors list {project}` shows them, `inflq factors rm` removes one")


COMMANDS = (runs, gc)
