"""Sharing and safety: ``pack``, ``unpack``, ``trust``, ``untrust`` and ``check``."""

from __future__ import annotations

from pathlib import Path

import click

from .. import catalog
from ..display import plural
from ..errors import InflqError
from ..layout import ARTIFACTS
from .common import progress_monitor, project_at


@click.command()
@click.argument("project")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--include-model", is_flag=True, help="Put the model's files in the archive (large).")
@click.option("--include-corpus", is_flag=True, help="Put the corpus file in the archive.")
@click.option("--exclude", "exclude", multiple=True, metavar="PATH",
              help=f"Leave out the files under PATH, a folder inside {ARTIFACTS}/ that no run or result set needs "
                   f"(e.g. {ARTIFACTS}/index: the gradient indexes, rebuilt with `inflq index build`). Repeatable.")
def pack(project, file, include_model, include_corpus, exclude):
    """Write PROJECT into one archive FILE (.tar, or .tar.gz to compress) with a checksum manifest."""
    from ..sharing import pack as do_pack

    with progress_monitor() as monitor:
        res = do_pack(project, file, include_model=include_model, include_corpus=include_corpus, exclude=exclude, monitor=monitor)
    left = [w for w, inc in (("model", include_model), ("corpus", include_corpus)) if not inc]
    click.echo(f"wrote {res.path}: {plural(res.files, 'file')}, {res.bytes / 1e6:.1f} MB" + (f" (without the {' and '.join(left)}: the recipient relinks local copies)" if left else ""))


@click.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.argument("directory", type=click.Path(file_okay=False))
def unpack(file, directory):
    """Verify the archive FILE and unpack it into the new folder DIRECTORY."""
    from ..project import Project
    from ..sharing import unpack as do_unpack

    with progress_monitor() as monitor:
        manifest = do_unpack(file, directory, monitor=monitor)
    click.echo(f"unpacked {plural(len(manifest['files']), 'verified file')} into {directory}")
    p = Project.open(directory)
    try:
        if p.model_status() != "ok":
            click.echo(f"the model is not here; results are browsable; to run, link a copy: inflq relink {directory} --model DIR")
        if not p.corpus_path.exists():
            click.echo(f"the corpus is not here; to rebuild its tokens later, link a copy: inflq relink {directory} --corpus FILE")
    finally:
        p.close()
    from ..trust import plugin_files

    if plugin_files(Path(directory)):
        click.echo(f"it has local plugins, which stay disabled until you read them and run: inflq trust {directory}")


@click.command()
@click.argument("project", type=click.Path(file_okay=False))
def trust(project):
    """Allow PROJECT's local plugins (PROJECT/plugins/*.py) to run, as they are now."""
    from ..trust import trust as do_trust

    names = do_trust(project)
    click.echo(f"trusted {plural(len(names), 'local plugin file')} of {project}: {', '.join(names)} (editing any of them withdraws trust)")


@click.command()
@click.argument("project", type=click.Path(file_okay=False))
def untrust(project):
    """Withdraw trust from PROJECT's local plugins."""
    from ..trust import untrust as do_untrust

    click.echo(f"{project} is no longer trusted" if do_untrust(project) else f"{project} was not trusted")


@click.command()
@click.argument("project")
@click.option("--repair", is_flag=True, help="Restore a damaged catalog from its newest good copy (backups/), recompute damaged or missing artifacts (needs the model) and remove orphaned files.")
def check(project, repair):
    """Verify the catalog and every artifact against its checksum, list the results that depend on
    damaged ones, and the orphaned files no catalog row names. With --repair: a damaged catalog is
    replaced by its newest good copy (saying what that copy lacks), damaged artifacts are recomputed
    and orphans removed."""
    from ..backups import restore_catalog
    from ..display import size_text
    from ..errors import CatalogDamaged
    from ..integrity import check as do_check
    from ..integrity import repair as do_repair
    from ..layout import CATALOG
    from ..removal import GRACE_SECONDS, collect_garbage, orphans

    root = Path(project)
    try:
        p = project_at(project)
        problem = catalog.integrity_problem(p.db)
    except CatalogDamaged as exc:
        p, problem = None, str(exc)
    if problem is not None:
        if not repair:
            raise InflqError(f"the catalog {root / CATALOG} is damaged ({problem}); `inflq check {project} --repair` restores its newest good copy and says what that copy lacks")
        if p is not None:
            p.close()
        for line in restore_catalog(root).lines():
            click.echo(line)
        p = project_at(project)
    with progress_monitor() as monitor:
        problems = do_check(p, monitor)
    found = orphans(p)
    if not problems and not found:
        click.echo("all artifacts verify; the catalog is consistent; no orphaned files")
        return
    for prob in problems:
        click.echo(prob.line())
    for o in found:
        click.echo(f"orphaned file {o.path} ({size_text(o.size)}): {o.why}"
                   + (f" (written in the last {GRACE_SECONDS / 60:.0f} minutes: kept, a process may be about to record it)" if o.recent else ""))
    old = [o for o in found if not o.recent]
    if not repair:
        parts = [plural(len(problems), "damaged or missing artifact")] if problems else []
        if old:
            parts.append(f"{plural(len(old), 'orphaned file')} ({size_text(sum(o.size for o in old))})")
        if parts:
            fix = f"`inflq check {project} --repair`" + (f" (the orphans alone: `inflq gc {project}`)" if old and not problems else "")
            raise InflqError(f"{' and '.join(parts)}; {'recompute and ' if problems else ''}remove them with {fix}")
        click.echo("all artifacts verify; the catalog is consistent")
        return
    if problems:
        with progress_monitor() as monitor:
            for note in do_repair(p, problems, monitor):
                click.echo(note)
    if old:
        got = collect_garbage(p)
        click.echo(f"removed {plural(len(got.removed), 'orphaned file')}, {size_text(got.bytes)}")
    left = do_check(p)
    if left:
        raise InflqError(f"{plural(len(left), 'artifact')} could not be recomputed: {left[0].line()}")
    click.echo("repaired: all artifacts verify" if problems else "all artifacts verify")


COMMANDS = (pack, unpack, trust, untrust, check)
