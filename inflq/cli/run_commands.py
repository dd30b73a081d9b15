"""Running and fitting: ``run``, ``factors`` (list, fit, show, rm) and the ``runs`` listing."""

from __future__ import annotations

import json

import click

from .. import catalog
from ..display import plural
from ..errors import Cancelled, InflqError
from .common import make_console, progress_monitor, project_at


@click.command()
@click.argument("project")
@click.option("-i", "--investigation", default="default", show_default=True, help="Investigation whose queries are scored.")
@click.option("--estimator", default=None, help="Estimator spec, e.g. ekfac or ekfac:damping=1e-3 (default: the registry's default estimator; ekfac among the built-ins).")
@click.option("--filter", "filter_", default=None, help="Candidate filter spec; join with + for a union (tfidf:k=1000+random:n=500). Default: the registry's default filter (all: every sequence).")
@click.option("--executor", help="Executor spec: local (default), or ray / ray:num_gpus=1,num_workers=4 (docs/executors.md). With --resume: the run's own unless given.")
@click.option("--address", help="Ray cluster address for --executor ray: auto, local or HOST:PORT (the same as ray:address=...).")
@click.option("--modules", help="Tracked modules: all, mlp, attention or name globs (default: the project's).")
@click.option("--rank", default="32", show_default=True, help="Rank of the preconditioned query gradients, or 'full'.")
@click.option("--full-rank-memory", "full_rank_mb", type=click.IntRange(min=0), default=1024, show_default=True,
              help="MiB of query gradients kept at full rank where scoring is cheaper (and exact) that way; 0: always --rank.")
@click.option("--top-k", default=20, show_default=True, help="Top and bottom sequences stored per query.")
@click.option("--fit-sequences", type=int, help="Fit factors on a seeded sample of this many sequences (default: all).")
@click.option("--seed", type=int, help="Seed for sampled labels and samples (default: the project's).")
@click.option("--batch-size", type=int, help="Sequences per batch (default: as many as the token budget holds).")
@click.option("--batch-tokens", type=int, help="Padded tokens per batch (default: chosen from the model's size and the free memory; recorded with the run).")
@click.option("--shard-size", default=512, show_default=True, help="Sequences per committed shard.")
@click.option("--fit-memory", type=float, help="GB of sums one fitting pass may hold (per worker and on the driver): larger factors are fitted by module, a group of modules per pass (default: no limit, or ray:memory's half).")
@click.option("--device", help="cpu, cuda, cuda:1, mps (default: the project's, auto).")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), help="Model dtype for this run (default: the project's).")
@click.option("--refit", is_flag=True, help="Recompute the estimator's factors even if cached.")
@click.option("--resume", "resume", type=int, is_flag=False, flag_value=0,
              help="Continue a cancelled or failed run: by id, or alone (after PROJECT) the investigation's latest interrupted run.")
def run(project, investigation, estimator, filter_, executor, address, modules, rank, full_rank_mb, top_k, fit_sequences, seed, batch_size, batch_tokens, shard_size, fit_memory, device, dtype, refit, resume):
    """Fit what is needed and score the investigation's queries."""
    from ..runs import RunSettings, run_investigation

    p = project_at(project)
    p.runtime.configure(device, dtype)
    if rank in ("full", "none", "None"):
        rank_v = None
    else:
        try:
            rank_v = int(rank)
        except ValueError:
            raise InflqError(f"--rank must be a number or 'full', not {rank!r}") from None
    if address:
        executor = executor or "ray"
        if not executor.startswith("ray"):
            raise InflqError("--address is for --executor ray; drop it or use --executor ray")
        executor += ("," if ":" in executor else ":") + f"address={address}"
    settings = RunSettings(estimator=estimator, filter=filter_, executor=executor, modules=modules, rank=rank_v, full_rank_mb=full_rank_mb, top_k=top_k, fit_sequences=fit_sequences, seed=p.config.seed if seed is None else seed, batch_size=batch_size, batch_tokens=batch_tokens, shard_size=shard_size, refit=refit, fit_memory=fit_memory)
    if resume == 0:  # the bare flag: the investigation's latest interrupted run
        from ..runs import interrupted_run

        row = interrupted_run(p, investigation)
        if row is None:
            raise InflqError(f"investigation {investigation!r} has no interrupted run to resume; see `inflq runs {project}`, or give a run id")
        resume = row["id"]
    if resume:
        from ..runs import committed_work

        row = catalog.get_run(p.db, resume)
        if row is not None and row["kind"] == "scores" and row["status"] != "done":
            click.echo(f"resuming run {resume} ({row['status']}, {row['estimator']} / {row['filter']}); {committed_work(p, resume)}", err=True)
    with progress_monitor() as monitor:
        try:
            result = run_investigation(p, investigation, settings, monitor, resume=resume, executor=executor if resume else None)
        except Cancelled:
            from ..runs import committed_work

            last = resume or catalog.latest_run_id(p.db)
            raise Cancelled(f"run {last}; {committed_work(p, last)}: continue with `inflq run {project} --resume {last}` (or --resume alone)") from None
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
@click.option("--estimator", default=None, help="Estimator spec (its factor settings, e.g. ekfac:fisher=empirical) (default: the registry's default estimator; ekfac among the built-ins).")
@click.option("--modules", help="Tracked modules: all, mlp, attention or name globs (default: the project's).")
@click.option("--fit-sequences", type=int, help="Fit on a seeded sample of this many sequences (default: all).")
@click.option("--seed", type=int, help="Seed for sampled labels and the sample (default: the project's).")
@click.option("--batch-size", type=int, help="Sequences per batch (default: as many as the token budget holds).")
@click.option("--batch-tokens", type=int, help="Padded tokens per batch (default: chosen from the model's size and the free memory; recorded with the run).")
@click.option("--shard-size", default=512, show_default=True, help="Sequences per committed fitting shard.")
@click.option("--fit-memory", type=float, help="GB of sums one fitting pass may hold (per worker and on the driver): larger factors are fitted by module, a group of modules per pass (default: no limit, or ray:memory's half).")
@click.option("--executor", help="Executor spec: local (default) or ray[:...] (docs/executors.md).")
@click.option("--device", help="cpu, cuda, cuda:1, mps (default: the project's, auto).")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), help="Model dtype for the fit (default: the project's).")
@click.option("--refit", is_flag=True, help="Recompute even if these factors are cached.")
@click.option("--resume", type=int, is_flag=False, flag_value=0, help="Continue an interrupted fit: by run id, or alone (after PROJECT) the latest one.")
@click.option("-i", "--investigation", default="default", show_default=True, help="Investigation the fitting run is listed under.")
def factors_fit(project, estimator, modules, fit_sequences, seed, batch_size, batch_tokens, shard_size, fit_memory, executor, device, dtype, refit, resume, investigation):
    """Fit factors now (e.g. on a GPU machine), for later runs to reuse; resumable."""
    from ..runs import RunSettings, fit_factors

    p = project_at(project)
    p.runtime.configure(device, dtype)
    settings = RunSettings(estimator=estimator, executor=executor, modules=modules, fit_sequences=fit_sequences,
                           seed=p.config.seed if seed is None else seed, batch_size=batch_size, batch_tokens=batch_tokens, shard_size=shard_size, refit=refit, fit_memory=fit_memory)
    if resume == 0:  # the bare flag: the latest interrupted fit
        from ..runs import interrupted_run

        row = interrupted_run(p, investigation, kind="factors")
        if row is None:
            raise InflqError(f"no interrupted factor fit to resume in investigation {investigation!r}; see `inflq runs {project}`")
        resume = row["id"]
        click.echo(f"resuming factor fit {resume} ({row['status']}, {row['estimator']})", err=True)
    with progress_monitor() as monitor:
        try:
            run_id, fs_id, seconds = fit_factors(p, settings, monitor, investigation, resume=resume)
        except Cancelled:
            from ..runs import committed_work

            last = resume or catalog.latest_run_id(p.db)
            raise Cancelled(f"fit {last}; {committed_work(p, last)}: continue with `inflq factors fit {project} --resume {last}`") from None
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


@click.command()
@click.argument("project")
@click.option("-i", "--investigation", help="Only this investigation's runs (default: all).")
def runs(project, investigation):
    """List runs with their status and progress."""
    from rich.table import Table

    p = project_at(project)
    t = Table("run", "status", "estimator", "filter", "phase", "progress", "seconds", "error")
    for r in catalog.runs_of(p.db, catalog.investigation(p.db, investigation)["id"] if investigation else None):
        t.add_row(str(r["id"]), r["status"], r["estimator"], r["filter"], r["phase"] or "", f"{r['done']}/{r['total']}", f"{r['seconds'] or 0:.1f}", (r["error"] or "")[:60])
    make_console().print(t)


COMMANDS = (run, factors, runs)
