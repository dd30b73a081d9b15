"""``inflq validate``: estimators measured against the PBRF ground truth, or (``--lds``) against
retraining on random subsets (the linear datamodeling score)."""

from __future__ import annotations

import click

from ..settings import ValidationSettings
from .common import make_console, progress_monitor, project_at


@click.command()
@click.argument("project")
@click.option("-i", "--investigation", default="default", show_default=True, help="Investigation whose queries are used.")
@ValidationSettings.click_options("validate")
def validate(project, investigation, **given):
    """Measure estimators against the PBRF ground truth on a sample of fitting sequences, or with
    --lds (--loo N) against retraining on random subsets (without single sequences); each retrained
    model's measurements are committed: rerun to resume."""
    from rich.table import Table

    from ..errors import InflqError
    from ..lds import recommendation

    settings = ValidationSettings.from_values(given)
    method = settings.method_of()
    if (settings.trainer or settings.executor) and method == "pbrf":
        raise InflqError("--trainer and --executor are for retraining; add --lds or --loo N")
    p = project_at(project)
    if method in ("lds", "loo"):
        from ..lds import LDS_COLUMNS, lds_table_rows, lds_title, validate_lds, validate_loo

        with progress_monitor() as monitor:
            v = (validate_lds if method == "lds" else validate_loo)(p, investigation, monitor=monitor, **settings.values(method))
        t = Table(*LDS_COLUMNS, title=lds_title(v.id, v.settings))
        for cells in lds_table_rows(v.rows):
            t.add_row(*cells)
        make_console().print(t)
        if v.recommended_damping is not None:
            click.echo(recommendation(v.recommended_damping, v.settings["damping_sweep"]))
        return
    from ..validate import validate as run_validation

    with progress_monitor() as monitor:
        v = run_validation(p, investigation, monitor=monitor, **settings.values("pbrf"))
    t = Table("estimator", "pearson", "spearman", "fit s", "inverse-HVP s", title=f"validation {v.id}: {len(v.settings['queries'])} queries × {len(v.sample)} sequences vs PBRF (ε={v.settings['epsilon']:.3g}, {v.settings['pbrf_seconds']:.0f} s)")
    for r in v.rows:
        t.add_row(r.estimator, f"{r.pearson:.3f}", f"{r.spearman:.3f}", f"{r.fit_seconds:.3f}", f"{r.ihvp_seconds:.4f}")
    make_console().print(t)
    for line in ihvp_ratios(v.rows):
        click.echo(line)
    if v.recommended_damping is not None:
        click.echo(recommendation(v.recommended_damping, v.settings["damping_sweep"], "the PBRF"))


def ihvp_ratios(rows) -> list[str]:
    """Each compared estimator's inverse-HVP time against the default estimator's, for those slower
    (LiSSA's against EK-FAC's among the built-ins): the cost of their accuracy."""
    from ..plugins import get_registry

    default = get_registry().default("estimator", required=False)
    base = next((r for r in rows if r.estimator.split(":")[0] == default), None)
    if base is None or base.ihvp_seconds <= 0:
        return []
    return [f"{r.estimator} / {base.estimator} inverse-HVP time: {r.ihvp_seconds / base.ihvp_seconds:.0f}x"
            for r in rows if r.estimator.split(":")[0] != default and r.ihvp_seconds > base.ihvp_seconds]


COMMANDS = (validate,)
