"""``inflq validate``: estimators measured against the PBRF ground truth, or (``--lds``) against
retraining on random subsets (the linear datamodeling score)."""

from __future__ import annotations

import click

from ..display import plural
from .common import make_console, progress_monitor, project_at


@click.command()
@click.argument("project")
@click.option("-i", "--investigation", default="default", show_default=True, help="Investigation whose queries are used.")
@click.option("--estimators", default="identity,ekfac,lissa", show_default=True, help="Comma-separated estimator specs to compare.")
@click.option("--sample", default=20, show_default=True, help="Fitting sequences to solve the PBRF for (two solves each).")
@click.option("--dampings", help="EK-FAC dampings to sweep, e.g. 1e-8,1e-4,1e-2.")
@click.option("--queries", type=int, help="How many of the investigation's queries (default: 3; with --lds all).")
@click.option("--fit-sequences", default=128, show_default=True, help="Fitting sequences (N) for the estimators and the PBRF.")
@click.option("--epsilon", type=float, help="Up-weighting ε of the PBRF (default 1/N).")
@click.option("--pbrf-steps", default=300, show_default=True, help="Optimizer steps for each PBRF solve.")
@click.option("--pbrf-damping", type=float, help="The PBRF's damping λ (default: 0.1 × mean Gauss-Newton eigenvalue per module).")
@click.option("--max-minutes", default=30.0, show_default=True, help="Refuse a sample whose PBRF solves would take longer.")
@click.option("--seed", default=0, show_default=True, help="Seed for the sample and the sampled labels.")
@click.option("--batch-size", default=8, show_default=True, help="Sequences per batch.")
@click.option("--lds", is_flag=True, help="Linear datamodeling score: retrain on random subsets instead of the PBRF.")
@click.option("--subsets", default=32, show_default=True, help="--lds: how many subsets to retrain on.")
@click.option("--fraction", default=0.5, show_default=True, help="--lds: the share of the corpus in each subset.")
@click.option("--loo", type=int, help="Leave-one-out: retrain without each of this many seeded sequences (and once on all) instead of the PBRF.")
@click.option("--leave-out", "leave_out", help="Leave-one-out over these sequences instead of seeded ones: comma-separated ids (document id:chunk).")
@click.option("--trainer", "trainer_spec", help="--lds/--loo: the trainer spec, e.g. adamw:epochs=6 (default: the default trainer).")
@click.option("--executor", "executor_spec", help="--lds/--loo: where the retrainings run, e.g. ray:num_workers=4 (default: this process, one after another).")
def validate(project, investigation, estimators, sample, dampings, queries, fit_sequences, epsilon, pbrf_steps, pbrf_damping, max_minutes, seed, batch_size, lds, subsets, fraction, loo, leave_out, trainer_spec, executor_spec):
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
        v = run_validation(p, investigation, parse_list(estimators), sample=sample, dampings=parse_list(dampings, float), queries=queries or 3, fit_sequences=fit_sequences, epsilon=epsilon, pbrf_steps=pbrf_steps, pbrf_damping=pbrf_damping, seed=seed, batch_size=batch_size, max_minutes=max_minutes, monitor=monitor)
    t = Table("estimator", "pearson", "spearman", "fit s", "inverse-HVP s", title=f"validation {v.id}: {plural(len(v.settings['queries']), 'query')} × {plural(len(v.sample), 'sequence')} vs PBRF (ε={v.settings['epsilon']:.3g}, {v.settings['pbrf_seconds']:.0f} s)")
    for r in v.rows:
        t.add_row(r.estimator, f"{r.pearson:.3f}", f"{r.spearman:.3f}", f"{r.fit_seconds:.3f}", f"{r.ihvp_seconds:.4f}")
    make_console().print(t)
    by = {r.estimator.split(":")[0]: r for r in v.rows}
    if "ekfac" in by and "lissa" in by and by["ekfac"].ihvp_seconds > 0:
        click.echo(f"LiSSA / EK-FAC inverse-HVP time: {by['lissa'].ihvp_seconds / by['ekfac'].ihvp_seconds:.0f}x")
    if v.recommended_damping is not None:
        click.echo(f"recommended EK-FAC damping: {v.recommended_damping:g} (run with --estimator ekfac:damping={v.recommended_damping:g})")


COMMANDS = (validate,)
