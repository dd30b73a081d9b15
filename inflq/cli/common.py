"""What every ``inflq`` command shares: the group, the one place errors become one line, opening a
project, the console and the progress display.

Every user error is one line on stderr and a non-zero exit status, never a traceback
(set ``INFLQ_DEBUG=1`` to see one for internal errors). The commands live in the modules beside
this one; ``inflq/cli/__init__.py`` adds them to :data:`cli` in one place, and :func:`main` lets
plugins add theirs (the ``register_commands`` hook) once, before it parses the command line.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import sys
from contextlib import contextmanager, suppress

import click

from ..errors import Cancelled, InflqError

# Exit statuses (README, "Exit status"): 0 done; 1 a user error (one line, "Error: ..."); 2 an
# internal error or a usage error; 3 stopped on request (Ctrl-C) with the committed work kept,
# to be resumed; 130 aborted at once (a second Ctrl-C).
EXIT_ERROR = 1
EXIT_STOPPED = 3
EXIT_ABORTED = 130


def make_console(stderr: bool = False, width: int | None = None):
    """A rich console on stdout (or stderr) that leaves long lines and numbers as they are
    (``width``: lay out at this width whatever the terminal's)."""
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=False, width=width)


def project_at(path: str):
    """Open the project at ``path`` with its local plugins if the user trusted them (else a note)."""
    from ..project import Project
    from ..trust import load_project_plugins, untrusted_notice

    project = Project.open(path)
    untrusted = load_project_plugins(project)  # only if the user trusted this folder
    if untrusted:
        click.echo(f"note: {untrusted_notice(project, untrusted)}", err=True)
    return project


@contextmanager
def progress_monitor():
    """A rich progress display bound to a Monitor; Ctrl-C cancels within one batch."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    from ..progress import LineProgress, Monitor

    err = make_console(stderr=True)
    # A terminal gets rich bars; a pipe or a log gets plain lines every few seconds (INFLQ_PROGRESS:
    # "bar" or "lines" to choose, "0" for none; INFLQ_PROGRESS_INTERVAL seconds between lines).
    mode = os.environ.get("INFLQ_PROGRESS", "").lower() or ("bar" if err.is_terminal else "lines")
    mode = {"1": "bar"}.get(mode, mode)
    stopping = [False]

    class Eta(ProgressColumn):
        """The time left, until a cancel: a stopped bar has none."""

        remaining = TimeRemainingColumn()

        def render(self, task):
            if stopping[0] and not task.finished:
                return Text("stopped", style="yellow")
            return Text("eta ") + self.remaining.render(task)

    bar = Progress(TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), Eta(), console=err, transient=False, disable=mode != "bar")
    tasks: dict[str, int] = {}

    def on_bar(ev):
        if ev.phase not in tasks:
            tasks[ev.phase] = bar.add_task(ev.phase, total=max(ev.total, 1))
        bar.update(tasks[ev.phase], completed=ev.done, total=max(ev.total, 1))

    def write_line(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    lines = LineProgress(write_line, interval=float(os.environ.get("INFLQ_PROGRESS_INTERVAL", "5")))
    on_progress, on_note = {"bar": (on_bar, lambda m: err.print(f"[dim]{m}[/]")), "lines": (lines, lines.note)}.get(mode, (None, None))
    monitor = Monitor(on_progress=on_progress, on_warning=lambda m: err.print(f"[yellow]warning:[/] {m}"), on_note=on_note)
    previous = signal.getsignal(signal.SIGINT)

    def on_sigint(signum, frame):
        if monitor.cancelled:  # a second Ctrl-C stops at once
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        err.print("[yellow]stopping after this batch (Ctrl-C again to abort)…[/]")
        stopping[0] = True
        monitor.cancel()

    with suppress(ValueError):  # not the main thread: no Ctrl-C handling
        signal.signal(signal.SIGINT, on_sigint)
    try:
        with bar:
            yield monitor
    finally:
        with suppress(ValueError):
            signal.signal(signal.SIGINT, previous)


class DefaultToTUI(click.Group):
    """``inflq`` alone, or ``inflq PROJECT``, opens the terminal UI."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["ui", *args]
        return super().parse_args(ctx, args)


@click.group(cls=DefaultToTUI, invoke_without_command=True)
@click.version_option(package_name="inflq")
@click.pass_context
def cli(ctx):
    """inflq: which training sequences made the model say this?

    Influence functions (EK-FAC, after Grosse et al. 2023) for causal language models.
    Run `inflq PROJECT` (or just `inflq` for the demo) to open the terminal UI.
    Scores are positive when a training sequence makes the completion MORE likely.
    """
    if ctx.invoked_subcommand is None:
        ctx.invoke(ctx.command.get_command(ctx, "ui"), project=None)


def text_room(widths: list[int]) -> int:
    """The width left for a last (text) column beside columns of ``widths`` in a rich Table:
    ids and scores are shown whole, the text gives way."""
    return max(10, make_console().width - sum(widths) - 3 * len(widths) - 4)


def heat_text(tokens, values):
    """Tokens coloured by their share of a score: red raises the completion, blue lowers it."""
    import numpy as np
    from rich.text import Text

    values = np.asarray(values, dtype=float)
    scale = float(np.abs(values).max()) or 1.0
    text = Text()
    for tok, v in zip(tokens, values, strict=False):
        strength = min(1.0, abs(v) / scale)
        level = int(55 + 200 * strength)
        color = f"rgb({level},60,60)" if v > 0 else f"rgb(60,60,{level})"
        text.append(tok, style=("bold " if strength > 0.5 else "") + color)
        text.append(" ")
    return text


_plugin_commands_added = False


def add_plugin_commands() -> None:
    """Let every loaded plugin add its commands to :data:`cli` (the ``register_commands`` hook), once
    per process; :func:`main` calls it before parsing. A plugin whose commands fail is reported on
    stderr and skipped."""
    global _plugin_commands_added
    if _plugin_commands_added:
        return
    _plugin_commands_added = True
    from ..plugins import get_registry

    try:
        get_registry().pm.hook.register_commands(cli=cli)
    except Exception as exc:  # a plugin's commands must not break the CLI
        print(f"warning: a plugin failed to add commands: {exc}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line and exit status 1; work stopped on request says
    "stopped: ..." with what was kept, and exits with status 3 (:data:`EXIT_STOPPED`)."""
    add_plugin_commands()
    try:
        cli.main(args=argv, standalone_mode=False)
    except Cancelled as exc:  # stopped on request: not an error, and said so
        click.echo(f"stopped: {exc}", err=True)
        sys.exit(EXIT_STOPPED)
    except InflqError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(EXIT_ERROR)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(EXIT_ABORTED)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(EXIT_ABORTED)
    except sqlite3.OperationalError as exc:
        msg = str(exc)
        if "locked" in msg or "busy" in msg:
            click.echo("Error: the project's catalog is locked by another process; wait for it to finish, then retry", err=True)
        elif "readonly" in msg:
            click.echo("Error: the project is read-only here and this command writes to it; copy the project somewhere writable "
                       "(commands that only read work as they are: top, show, runs, export, query list, pack)", err=True)
        else:
            click.echo(f"Error: catalog error ({msg}); check the project folder", err=True)
        sys.exit(1)
    except Exception as exc:
        if os.environ.get("INFLQ_DEBUG"):
            raise
        click.echo(f"Error: internal error ({type(exc).__name__}: {exc}); rerun with INFLQ_DEBUG=1 for details and report it", err=True)
        sys.exit(2)
