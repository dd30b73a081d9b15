"""``plan``: predicted time and peak memory of a run, per phase, before running it."""

from __future__ import annotations

import json

import click

from ..display import plural
from ..errors import Cancelled, InflqError
from ..settings import DeviceSettings, RunSettings
from .common import make_console, progress_monitor, project_at


def _gb(n: int) -> str:
    return f"{n / (1 << 30):.2f} GB"


def _seconds(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


@click.command()
@click.argument("project")
@click.option("-i", "--investigation", default="default", show_default=True, help="Investigation whose queries the run would score.")
@RunSettings.click_options("plan", notes={"fit_memory": "The plan plans such a fit, as `inflq run --fit-memory` runs it."})
@DeviceSettings.click_options("plan", notes={"device": "Time is measured on it."})
@click.option("--memory", type=float, help="Memory to plan for, in GB (default: what the device has free).")
@click.option("--calibration", type=int, help="Sequences in the measured calibration (default: two batches' worth).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(project, investigation, memory, calibration, as_json, **given):
    """Predict a run's time and peak memory per phase, from a short measured calibration."""
    from ..plan import make_plan

    p = project_at(project)
    p.runtime.configure(DeviceSettings.from_values(given).device, None)
    if memory is not None and memory <= 0:
        raise InflqError(f"--memory must be a positive number of GB, not {memory:g}")
    settings = RunSettings.from_values(given, p)
    with progress_monitor() as monitor:
        try:
            result = make_plan(p, settings, investigation=investigation, calibration=calibration, monitor=monitor,
                               memory=None if memory is None else int(memory * (1 << 30)))
        except Cancelled:
            raise Cancelled("plan: nothing was written") from None
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    from rich.table import Table

    f = result.facts
    t = Table("phase", "time", "peak memory", "", title=(
        f"{f['estimator']} on {plural(f['sequences'], 'sequence')} ({plural(f['tokens'], 'token')}), {plural(f['queries'], 'query')}, "
        f"{plural(f['modules'], 'module')}, {f['device']}; {f['batch']}"))
    for ph in result.phases:
        t.add_row(ph.name, _seconds(ph.seconds), _gb(ph.peak_bytes), ph.note)
    t.add_row("total", _seconds(result.seconds), _gb(result.peak_bytes), "peak")
    console = make_console()
    console.print(t)
    console.print("artifacts: " + ", ".join(f"{k} {_gb(v)}" for k, v in result.artifacts.items()))
    console.print(f"calibrated on {plural(f['calibration_sequences'], 'sequence')} ({plural(f['calibration_tokens'], 'token')})"
                  + ("" if f["queries_measured"] else "; no queries yet, one stood in for them"))
    verdict = "fits" if result.fits else "does NOT fit"
    click.echo(f"{verdict} in {_gb(result.memory)}")
    for line in result.advice:
        click.echo(f"- {line}")


COMMANDS = (plan,)
