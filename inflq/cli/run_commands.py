"""Running and fitting: ``run``, ``factors`` (list, fit, show, rm) and the ``runs`` listing."""

from __future__ import annotations

import json

import click

from .. import catalog
from ..display import plural
from ..errors import Cancelled, InflqError
from ..settings import DeviceSettings, RunSettings
from .common import make_console, progress_monitor, project_at


def _resume_target(p, project: str, investigation: str, resume: int | None, kind: str) -> int | None:
    """The run ``--resume`` names: its id, or (the bare flag, 0) the investigation's latest
    interrupted run of ``kind``."""
    if resume != 0:
        return resume
    from ..runs import interrupted_run

    row = interrupted_run(p, investigation, kind=kind)
    if row is None:
        what = "run" if kind == "scores" else "factor fit"
        raise InflqError(f"investigation {investigation!r} has no interrupted {what} to resume; see `inflq runs {project}`, or give a run id")
    return row["id"]


def _cancelled(p, what: str, resume: int | None, again: str) -> Cancelled:
    """The one line a stopped run or fit ends with (``stopped: ...``, exit status 3): what it kept
    and how to continue."""
    from ..runs import committed_work

    last = resume or catalog.latest_run_id(p.db)
    return Cancelled(f"{what} {last}; {committed_work(p, last)}: continue with `{again} --resume {last}` (or --resume alone)")


def _device(p, given: dict) -> None:
    from ..settings import DeviceSettings

    device = DeviceSettings.from_values(given)
    p.runtime.configure(device.device, device.dtype)


@click.command()
@click.argument("project")
@click.option("-i", "--investigation", default="default", show_default=True, help="Investigation whose queries are scored.")
@RunSettings.click_options("run", notes={"executor": "With --resume: the run's own unless given."})
@click.option("--address", help="Ray cluster address for --executor ray: auto, local or HOST:PORT (the same as ray:address=...).")
@DeviceSettings.click_options("run")
@click.option("--resume", "resume", type=int, is_flag=False, flag_value=0,
              help="Continue a cancelled or failed run: by id, or alone (after PROJECT) the investigation's latest interrupted run.")
def run(project, investigation, address, resume, **given):
    """Fit what is needed and score the investigation's queries."""
    from ..runs import run_investigation

    p = project_at(project)
    _device(p, given)
    executor = given["executor"]
    if address:
        executor = executor or "ray"
        if not executor.startswith("ray"):
            raise InflqError("--address is for --executor ray; drop it or use --executor ray")
        given["executor"] = executor = executor + ("," if ":" in executor else ":") + f"address={address}"
    settings = RunSettings.from_values(given, p)
    resume = _resume_target(p, project, investigation, resume, "scores")
    if resume:
        from ..runs import committed_work

        row = catalog.get_run(p.db, resume)
        if row is not None and row["kind"] == "scores" and row["status"] != "done":
            click.echo(f"resuming run {resume} ({row['status']}, {row['estimator']} / {row['filter']}); {committed_work(p, resume)}", err=True)
    with progress_monitor() as monitor:
        try:
            result = run_investigation(p, investigation, settings, monitor, resume=resume, executor=executor if resume else None)
        except Cancelled:
            raise _cancelled(p, "run", resume, f"inflq run {project}") from None
    phases = ", ".join(f"{k} {v:.1f}s" for k, v in result.phases.items())
    click.echo(f"run {result.run_id} done in {result.seconds:.1f}s ({phases}); result set {result.result_set_id}")
    click.echo(f"see the top sequences with: inflq top {project} -i {catalog.investigation(p.db, catalog.get_run(p.db, result.run_id)['investigation_id'])['name']}")


@click.group()
def factors():
    """Cached factor sets: list, fit ahead of a run, show spectra, remove."""


@factors.command("list")
@click.argument("project")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def factors_list(project, as_json):
    """The project's factor sets, reused by every investigation with the same settings."""
    from ..factor_sets import factor_sets

    p = project_at(project)
    rows = factor_sets(p)
    if as_json:
        click.echo(json.dumps(rows, default=str, indent=1))
        return
    if not rows:
        click.echo(f"no factor sets yet: `inflq factors fit {project}` or `inflq run {project}` fits them")
        return
    # One short block per set rather than an 11-column table: nothing is cut at 80 columns.
    for r in rows:
        size = f"{r['size_bytes'] / 2**20:.1f} MiB" if r["size_bytes"] is not None else "file missing"
        click.echo(f"factor set {r['id']}: {r['estimator']} {r['settings']}")
        click.echo(f"  {plural(r['num_modules'], 'module')} · {plural(r['num_sequences'], 'sequence')} · seed {r['seed']} · {size} · fit in {r['seconds'] or 0:.1f} s"
                   f" · used by {r['runs']} run{'s' if r['runs'] != 1 else ''} · {'current' if r['current_model'] else 'another'} model"
                   f" · {(r['created_at'] or '')[:16].replace('T', ' ')}")


@factors.command("fit")
@click.argument("project")
@RunSettings.click_options("factors fit", notes={"estimator": "Its factor settings (e.g. ekfac:fisher=empirical) name the factors fitted."})
@DeviceSettings.click_options("factors fit")
@click.option("--resume", type=int, is_flag=False, flag_value=0, help="Continue an interrupted fit: by run id, or alone (after PROJECT) the latest one.")
@click.option("-i", "--investigation", default="default", show_default=True, help="Investigation the fitting run is listed under.")
def factors_fit(project, resume, investigation, **given):
    """Fit factors now (e.g. on a GPU machine), for later runs to reuse; resumable."""
    from ..runs import fit_factors

    p = project_at(project)
    _device(p, given)
    settings = RunSettings.from_values(given, p)
    if resume == 0:
        resume = _resume_target(p, project, investigation, resume, "factors")
        row = catalog.get_run(p.db, resume)
        click.echo(f"resuming factor fit {resume} ({row['status']}, {row['estimator']})", err=True)
    with progress_monitor() as monitor:
        try:
            run_id, fs_id, seconds = fit_factors(p, settings, monitor, investigation, resume=resume)
        except Cancelled:
            raise _cancelled(p, "fit", resume, f"inflq factors fit {project}") from None
    if fs_id is None:
        click.echo(f"{settings.estimator} fits no factors; nothing to do")
    else:
        click.echo(f"factor set {fs_id} ready ({seconds:.1f}s, run {run_id}); see it with `inflq factors show {project} {fs_id}`")


@factors.command("show")
@click.argument("project")
@click.argument("factor_set", type=int)
@click.option("--damping", type=float, help="Absolute damping to compare the spectra with (default: --damping-factor × mean).")
@click.option("--damping-factor", default=0.1, show_default=True, help="Damping as this multiple of each module's mean eigenvalue, for the share of the spectrum shown under it.")
@click.option("--modules", help="Comma-separated globs of modules to show (default: all).")
@click.option("--plot/--no-plot", default=True, show_default=True, help="Draw the sorted spectra (log scale).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def factors_show(project, factor_set, damping, damping_factor, modules, plot, as_json):
    """Per module: the fitted eigenvalues, the damping a run would add, and how much it decides."""

    from ..factor_sets import spectra, spectrum_plot, spectrum_table

    p = project_at(project)
    items = spectra(p, factor_set, damping, damping_factor, modules)
    if as_json:
        click.echo(json.dumps([sp.summary() for sp in items], indent=1))
        return
    t = spectrum_table(items, factor_set)
    console = make_console()
    console.print(t)
    click.echo("eff. dim = Σ λ/(λ + damping): the directions the fitted curvature still tells apart at this damping")
    if plot:
        width = max(40, min(console.width, 110))
        click.echo(spectrum_plot(items, width=width, height=16, color=console.is_terminal))


@factors.command("rm")
@click.argument("project")
@click.argument("factor_set", type=int)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def factors_rm(project, factor_set, yes):
    """Remove a factor set (runs keep their scores; a later run refits what it needs)."""
    from ..factor_sets import factor_set as get_factor_set
    from ..factor_sets import remove_factor_set

    p = project_at(project)
    row = get_factor_set(p, factor_set)
    if not yes and not click.confirm(f"remove factor set {factor_set} ({row['estimator']}, {row['path']})?"):
        raise InflqError("not removed")
    click.echo(f"removed factor set {factor_set} ({remove_factor_set(p, factor_set)})")


COMMANDS = (run, factors)
