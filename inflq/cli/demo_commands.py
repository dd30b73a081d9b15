"""The terminal UI and the demo project it opens by default: ``ui``, ``demo``."""

from __future__ import annotations

import click

from .. import catalog
from .common import make_console, progress_monitor, project_at
from .result_commands import top

DEMO_INVESTIGATION = "word-order"


@click.command()
@click.argument("project", required=False)
def ui(project):
    """Open the terminal UI on PROJECT (default: the demo)."""
    if project is None:
        from ..demo import ensure_demo

        project = str(ensure_demo(progress=lambda m: make_console(True).print(m)))
    project_at(project).close()  # a clear error (and the local-plugin notice) before the screen takes over
    from ..tui.app import run_tui

    run_tui(project)


@click.command()
@click.option("--headless", is_flag=True, help="Run the demo investigation and print its top sequences instead of opening the UI.")
@click.option("--estimator", default="ekfac", show_default=True, help="Estimator spec of the result set to show (run if there is none).")
def demo(headless, estimator):
    """Prepare the demo project (projects/demo) and open it."""
    from ..demo import ensure_demo, run_demo

    root = ensure_demo(progress=lambda m: make_console(True).print(m))
    if not headless:
        from ..tui.app import run_tui

        run_tui(str(root))
        return
    with progress_monitor() as monitor:
        rs_id = run_demo(root, estimator, monitor)
    from ..project import Project

    demo_project = Project.open(root)
    rs = catalog.get_result_set(demo_project.db, rs_id)
    demo_project.close()
    click.echo(f"result set {rs_id}: {rs['estimator']} / {rs['filter']} ({rs['created_at'][:19]}); see the others with `inflq demo` (Results tab)")
    ctx = click.get_current_context()
    ctx.invoke(top, project=str(root), investigation=DEMO_INVESTIGATION, query_id=None, k=5, bottom=False, result_set=rs_id, as_json=False)


COMMANDS = (ui, demo)
