"""``inflq validate``: estimators measured against the PBRF ground truth, or (``--lds``) against
retraining on random subsets (the linear datamodeling score); ``inflq validate list`` and
``inflq validate show`` read the saved ones back."""

from __future__ import annotations

import click

from ..display import plural
from ..validations import PBRF_DEFAULTS
from .common import make_console, progress_monitor, project_at


class RunByDefault(click.Group):
    """``inflq validate PROJECT ...`` runs a validation (the ``run`` subcommand); ``inflq validate
    list`` and ``show`` read saved ones."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group(cls=RunByDefault)
def validate():
    """How accurate each estimator is: `inflq validate PROJECT [options]` runs a validation against the
    PBRF ground truth (or, with --lds / --loo N, against retraining); `inflq validate list PROJECT`
    and `inflq validate show PROJECT [ID]` show the saved ones."""


@validate.command("run")
@click.argument("project")
@click.option("-i", "--investigation", default="default", show_default=True, help="Investigation whose queries are used.")
@click.option("--estimators", default=PBRF_DEFAULTS["estimators"], show_default=True, help="Comma-separated estimator specs to compare.")
@click.option("--sample", default=PBRF_DEFAULTS["sample"], show_default=True, help="Fitting sequences to solve the PBRF for (two solves each; at least 4, 8 or more to tell estimators apart).")
@click.option("--dampings", help="EK-FAC dampings to sweep, e.g. 1e-8,1e-4,1e-2.")
@click.option("--queries", type=int, help="How many of the investigation's queries (default: {PBRF_DEFAULTS['queries']}; with --lds all).")
@click.option("--fit-sequences", default=PBRF_DEFAULTS["fit_sequences"], show_default=True, help="Fitting sequences (N) for the estimators and the PBRF.")
@click.option("--epsilon", type=float, help="Up-weighting ε of the PBRF (default 1/N).")
@click.option("--pbrf-steps", default=PBRF_DEFAULTS["pbrf_steps"], show_default=True, help="Optimizer steps for each PBRF solve.")
@click.option("--pbrf-damping", type=float, help="The PBRF's damping λ (default: 0.1 × mean Gauss-Newton eigenvalue per module).")
@click.option("--max-minutes", default=PBRF_DEFAULTS["max_minutes"], show_default=True, help="Refuse a sample whose PBRF solves would take longer (timed on one step first).")
@click.option("--seed", default=0, show_default=True, help="Seed for the sample and the sampled labels.")
@click.option("--batch-size", default=8, show_default=True, help="Sequences per batch.")
@click.option("--lds", is_flag=True, help="Linear datamodeling score: retrain on random subsets instead of the PBRF.")
@click.option("--subsets", default=32, show_default=True, help="--lds: how many subsets to retrain on.")
@click.option("--fraction", default=0.5, show_default=True, help="--lds: the share of the corpus in each subset.")
@click.option("--loo", type=int, help="Leave-one-out: retrain without each of this many seeded sequences (and once on all) instead of the PBRF.")
@click.option("--leave-out", "leave_out", help="Leave-one-out over these sequences instead of seeded ones: comma-separated ids (document id:chunk).")
@click.option("--trainer", "trainer_spec", help="--lds/--loo: the trainer spec, e.g. adamw:epochs=6 (default: the default trainer).")
@click.option("--executor", "executor_spec", help="--lds/--loo: where the retrainings run, e.g. ray:num_workers=4 (default: this process, one after another).")
def validate_run(project, investigation, estimators, sample, dampings, queries, fit_sequences, epsilon, pbrf_steps, pbrf_damping, max_minutes, seed, batch_size, lds, subsets, fraction, loo, leave_out, trainer_spec, executor_spec):
    """Measure estimators against the PBRF ground truth on a sample of fitting sequences, or with
    --lds (--loo N) against retraining on random subsets (without single sequences); each retrained
    model's measurements are committed: rerun to resume."""
    from rich.table import Table

    from ..errors import InflqError
    from ..validate import parse_list
    from ..validate import validate as run_validation

    p = project_at(project)
    if lds and (loo is not None or leave_out):
        raise InflqError("--lds and --loo are two validations; give one")
    if (trainer_spec or executor_spec) and not (lds or loo is not None or leave_out):
        raise InflqError("--trainer and --executor are for retraining; add --lds or --loo N")
    if lds or loo is not None or leave_out:
        from ..lds import (
            LDS_COLUMNS,
            lds_table_rows,
            lds_title,
            recommendation,
            validate_lds,
            validate_loo,
        )

        common = {"trainer": trainer_spec, "dampings": parse_list(dampings, float), "queries": queries, "seed": seed, "batch_size": batch_size, "executor": executor_spec}
        with progress_monitor() as monitor:
            if lds:
                v = validate_lds(p, investigation, parse_list(estimators), subsets=subsets, fraction=fraction, monitor=monitor, **common)
            else:
                v = validate_loo(p, investigation, parse_list(estimators), count=loo or 0, sequences=parse_list(leave_out), monitor=monitor, **common)

        t = Table(*LDS_COLUMNS, title=lds_title(v.id, v.settings))
        for cells in lds_table_rows(v.rows):
            t.add_row(*cells)
        make_console().print(t)
        if v.recommended_damping is not None:
            click.echo(recommendation(v.recommended_damping))
        return
    with progress_monitor() as monitor:
        v = run_validation(p, investigation, parse_list(estimators), sample=sample, dampings=parse_list(dampings, float), queries=queries or PBRF_DEFAULTS["queries"], fit_sequences=fit_sequences, epsilon=epsilon, pbrf_steps=pbrf_steps, pbrf_damping=pbrf_damping, seed=seed, batch_size=batch_size, max_minutes=max_minutes, monitor=monitor)
    from ..validations import PBRF_COLUMNS, pbrf_table_rows

    t = Table(box=None, pad_edge=False, header_style="bold", title_justify="left", title=f"validation {v.id}: {plural(len(v.settings['queries']), 'query')} × {plural(len(v.sample), 'sequence')} vs PBRF (ε={v.settings['epsilon']:.3g}, {v.settings['pbrf_seconds']:.0f} s)")
    _columns(t, PBRF_COLUMNS, [r.estimator for r in v.rows])
    for cells in pbrf_table_rows([{**r.__dict__, "num_queries": len(v.settings["queries"]), "num_sequences": len(v.sample)} for r in v.rows]):
        t.add_row(*cells)
    make_console().print(t)
    click.echo("each correlation: the mean over queries of a query's correlation over the sampled sequences; 95 % intervals by Fisher's z")
    by = {r.estimator.split(":")[0]: r for r in v.rows}
    if "ekfac" in by and "lissa" in by and by["ekfac"].ihvp_seconds > 0:
        click.echo(f"LiSSA / EK-FAC inverse-HVP time: {by['lissa'].ihvp_seconds / by['ekfac'].ihvp_seconds:.0f}x")
    if v.recommended_damping is not None:
        click.echo(f"recommended EK-FAC damping: {v.recommended_damping:g} (run with --estimator ekfac:damping={v.recommended_damping:g})")
    click.echo(f"saved as validation {v.id}: see it again with `inflq validate show {project} {v.id}`")


def _columns(t, names, estimators: list[str]) -> None:
    """Columns whose numbers stay whole; the estimator's name folds past 20 characters."""
    for i, name in enumerate(names):
        if i == 0:
            t.add_column(name, overflow="fold", min_width=min(20, max([len(name)] + [len(e) for e in estimators])))
        else:
            t.add_column(name, no_wrap=True, justify="right")


@validate.command("list")
@click.argument("project")
@click.option("-i", "--investigation", help="Only this investigation's validations (default: all).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def validate_list(project, investigation, as_json):
    """The saved validations: id, method (pbrf, lds, loo), investigation, size, estimators."""
    import dataclasses
    import json

    from ..validations import list_validations

    items = list_validations(project_at(project), investigation)
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(v) for v in items], indent=1))
        return
    if not items:
        click.echo(f"no validation saved yet: `inflq validate {project} -i INVESTIGATION` runs one")
        return
    # Two short lines per validation rather than a six-column table: nothing wraps at 80 columns.
    what = {"pbrf": "against the PBRF", "lds": "LDS, against retraining", "loo": "leave-one-out retraining"}
    for v in items:
        click.echo(f"validation {v.id}: {what[v.method]}, {v.describe()} · investigation {v.investigation!r} · {v.created_at.replace('T', ' ')[:16]}")
        click.echo(f"  {', '.join(v.estimators)}")
    click.echo(f"see one with `inflq validate show {project} ID`")


@validate.command("show")
@click.argument("project")
@click.argument("validation_id", metavar="[ID]", type=int, required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (every saved row, settings decoded) instead of tables.")
def validate_show(project, validation_id, as_json):
    """One saved validation (default: the latest): its table, the recommended damping, and each
    query's correlation (PBRF: Spearman) or LDS per estimator."""
    import dataclasses
    import json

    from rich.table import Table

    from ..lds import recommendation
    from ..validations import get_validation

    v = get_validation(project_at(project), validation_id)
    if as_json:
        click.echo(json.dumps(dataclasses.asdict(v), indent=1, default=str))
        return
    console = make_console()
    t = Table(title=v.title(), title_justify="left", box=None, pad_edge=False, header_style="bold")
    _columns(t, v.columns(), [r["estimator"] for r in v.rows])
    for cells in v.table():
        t.add_row(*cells)
    console.print(t)
    if v.recommended_damping is not None:
        click.echo(recommendation(v.recommended_damping) if v.method != "pbrf" else
                   f"recommended EK-FAC damping: {v.recommended_damping:g} (run with --estimator ekfac:damping={v.recommended_damping:g})")
    per = v.per_query()
    if per and per[0][1]:
        what = "Spearman with the PBRF" if v.method == "pbrf" else ("LDS" if v.method == "lds" else "Spearman with the measured effect")
        q = Table("estimator", *[f"q{qid}" for qid in v.queries], title=f"per query ({what})", title_justify="left")
        for name, values in per:
            q.add_row(name, *["—" if x != x else f"{x:.2f}" for x in values])
        console.print(q)


COMMANDS = (validate,)
