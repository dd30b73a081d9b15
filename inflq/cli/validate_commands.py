"""``inflq validate``: estimators measured against the PBRF ground truth, or (``--lds``) against
retraining on random subsets (the linear datamodeling score); ``inflq validate list`` and
``inflq validate show`` read the saved ones back."""

from __future__ import annotations

import click

from ..display import plural
from ..settings import ValidationSettings
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
@ValidationSettings.click_options("validate")
def validate_run(project, investigation, **given):
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
    from ..validations import PBRF_COLUMNS, pbrf_table_rows

    t = Table(box=None, pad_edge=False, header_style="bold", title_justify="left", title=f"validation {v.id}: {plural(len(v.settings['queries']), 'query')} × {plural(len(v.sample), 'sequence')} vs PBRF (ε={v.settings['epsilon']:.3g}, {v.settings['pbrf_seconds']:.0f} s)")
    _columns(t, PBRF_COLUMNS, [r.estimator for r in v.rows])
    for cells in pbrf_table_rows([{**r.__dict__, "num_queries": len(v.settings["queries"]), "num_sequences": len(v.sample)} for r in v.rows]):
        t.add_row(*cells)
    make_console().print(t)
    click.echo("each correlation: the mean over queries of a query's correlation over the sampled sequences; 95 % intervals by Fisher's z")
    for line in ihvp_ratios(v.rows):
        click.echo(line)
    if v.recommended_damping is not None:
        click.echo(recommendation(v.recommended_damping, v.settings["damping_sweep"], "the PBRF"))
    click.echo(f"saved as validation {v.id}: see it again with `inflq validate show {project} {v.id}`")


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
        from ..lds import swept_estimator

        click.echo(recommendation(v.recommended_damping, swept_estimator(v.settings, v.rows), "the PBRF" if v.method == "pbrf" else "retraining"))
    per = v.per_query()
    if per and per[0][1]:
        what = "Spearman with the PBRF" if v.method == "pbrf" else ("LDS" if v.method == "lds" else "Spearman with the measured effect")
        q = Table("estimator", *[f"q{qid}" for qid in v.queries], title=f"per query ({what})", title_justify="left")
        for name, values in per:
            q.add_row(name, *["—" if x != x else f"{x:.2f}" for x in values])
        console.print(q)


COMMANDS = (validate,)
