"""The ``inflq`` command line: scriptable commands over the same core the TUI uses.

Every user error is one line on stderr and a non-zero exit status, never a traceback
(set ``INFLQ_DEBUG=1`` to see one for internal errors).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import sys
from contextlib import contextmanager, suppress
from pathlib import Path

import click

from .errors import Cancelled, InflqError

DEMO_INVESTIGATION = "word-order"


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=False)


def _open(path: str):
    from .project import Project
    from .trust import load_project_plugins, untrusted_notice

    project = Project.open(path)
    untrusted = load_project_plugins(project)  # only if the user trusted this folder
    if untrusted:
        click.echo(f"note: {untrusted_notice(project, untrusted)}", err=True)
    return project


@contextmanager
def _progress():
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

    from .progress import LineProgress, Monitor

    err = _console(stderr=True)
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
        ctx.invoke(ui, project=None)


@cli.command()
@click.argument("project", required=False)
def ui(project):
    """Open the terminal UI on PROJECT (default: the demo)."""
    if project is None:
        from .demo import ensure_demo

        project = str(ensure_demo(progress=lambda m: _console(True).print(m)))
    _open(project).close()  # a clear error (and the local-plugin notice) before the screen takes over
    from .tui.app import run_tui

    run_tui(project)


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--model", required=True, type=click.Path(), help="Local Hugging Face model folder (safetensors).")
@click.option("--corpus", required=True, type=click.Path(), help="Training corpus: JSONL with a text field, plain text, or a saved dataset folder.")
@click.option("--name", help="Project name (default: the folder name).")
@click.option("--max-length", type=int, help="Context length for training sequences (default: the model's, at most 2048).")
@click.option("--format", "corpus_format", default="auto", type=click.Choice(["auto", "jsonl", "text", "datasets"]),
              help="Corpus format; auto: a folder is a saved dataset, .jsonl/.json/.ndjson is JSONL, anything else plain text (documents separated by blank lines).")
@click.option("--text-field", default="text", show_default=True, help="The JSONL field or dataset column holding each document's text.")
@click.option("--id-field", default="id", show_default=True, help="The field holding each document's id (missing: line-N for JSONL, row-N for a dataset).")
@click.option("--modules", default="all", show_default=True, help="Tracked modules: all, mlp, attention, or name globs.")
@click.option("--add-bos/--no-add-bos", default=None, help="Start each sequence with BOS (default: as the tokenizer does).")
@click.option("--append-eos", is_flag=True, help="End each document with EOS (as in GPT-2 style training).")
def init(directory, model, corpus, name, max_length, corpus_format, text_field, id_field, modules, add_bos, append_eos):
    """Create a project folder for MODEL and CORPUS."""
    from .project import Project

    p = Project.init(Path(directory), Path(model), Path(corpus), name=name, max_length=max_length, corpus_format=corpus_format, text_field=text_field, id_field=id_field, modules=modules, add_bos=add_bos, append_eos=append_eos)
    n = len(p.corpus)
    click.echo(f"created {directory}: {n} training sequences, max length {p.config.max_length}, investigation 'default'")
    note = p.unknown_tokens_note()
    if note:
        click.echo(f"warning: {note}", err=True)


# -- investigations --------------------------------------------------------------------------------
@cli.group()
def investigation():
    """Create, list, rename and delete investigations."""


@investigation.command("add")
@click.argument("project")
@click.argument("name")
@click.option("--description", default="", help="What the investigation is about (shown in the UI).")
def investigation_add(project, name, description):
    """Create the investigation NAME."""
    _open(project).create_investigation(name, description)
    click.echo(f"created investigation {name!r}")


@investigation.command("list")
@click.argument("project")
def investigation_list(project):
    """List the investigations with their query and result-set counts."""
    from rich.table import Table

    t = Table("name", "queries", "result sets", "created", "description")
    for inv in _open(project).investigations():
        t.add_row(inv["name"], str(inv["num_queries"]), str(inv["num_result_sets"]), inv["created_at"], inv["description"] or "")
    _console().print(t)


@investigation.command("rename")
@click.argument("project")
@click.argument("name")
@click.argument("new_name")
def investigation_rename(project, name, new_name):
    """Rename the investigation NAME to NEW_NAME."""
    _open(project).rename_investigation(name, new_name)
    click.echo(f"renamed {name!r} to {new_name!r}")


@investigation.command("rm")
@click.argument("project")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def investigation_rm(project, name, yes):
    """Delete the investigation NAME with its queries, probes, runs and results."""
    p = _open(project)
    p.investigation(name)
    if not yes and not click.confirm(f"delete investigation {name!r} with its queries, runs and results?"):
        raise InflqError("not deleted")
    p.delete_investigation(name)
    click.echo(f"deleted {name!r}")


# -- queries and probes ----------------------------------------------------------------------------
@cli.group()
def query():
    """Add and list queries (a prompt and the completion whose probability is measured)."""


@query.command("add")
@click.argument("project")
@click.argument("prompt", required=False)
@click.argument("completion", required=False)
@click.option("-i", "--investigation", default="default", show_default=True, help="The investigation the queries belong to.")
@click.option("--file", "file_", type=click.Path(), help="JSONL file of {prompt, completion[, tags, notes, chat]} objects.")
@click.option("--chat", is_flag=True, help="Format the prompt with the tokenizer's chat template.")
@click.option("--tag", "tags", multiple=True, help="A tag for the query (repeatable).")
@click.option("--notes", default="", help="A free-text note kept with the query.")
def query_add(project, prompt, completion, investigation, file_, chat, tags, notes):
    """Add one query (PROMPT COMPLETION) or many (--file)."""
    p = _open(project)
    if file_:
        from .corpus import iter_jsonl

        path = Path(file_)
        if not path.exists():
            raise InflqError(f"query file {path} does not exist")
        items = [obj for _, obj in iter_jsonl(path, "'prompt' and 'completion' fields")]
        try:
            ids = p.add_queries(investigation, items)
        except InflqError as exc:
            raise InflqError(f"{path}: {exc}") from None
    else:
        if prompt is None or completion is None:
            raise InflqError("give PROMPT and COMPLETION, or --file queries.jsonl")
        ids = [p.add_query(investigation, prompt, completion, chat=chat, tags=list(tags), notes=notes)]
    click.echo(f"added {len(ids)} quer{'y' if len(ids) == 1 else 'ies'} (id {', '.join(map(str, ids))})")


@query.command("list")
@click.argument("project")
@click.option("-i", "--investigation", default="default", show_default=True, help="The investigation whose queries to list.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (every field) instead of a table.")
def query_list(project, investigation, as_json):
    """List the investigation's queries: id, prompt, completion, tags."""
    rows = _open(project).queries(investigation)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    t = Table("id", "prompt", "completion", "tags")
    for q in rows:
        t.add_row(str(q["id"]), q["prompt"], q["completion"], ", ".join(json.loads(q["tags"] or "[]")))
    _console().print(t)


@cli.group()
def probe():
    """Hand-written probe sequences for a query, scored without a corpus run."""


@probe.command("add")
@click.argument("project")
@click.argument("text")
@click.option("--query", "query_id", type=int, required=True, help="The query id the probe is scored against (see `inflq query list`).")
@click.option("--label", default="", help="A short label, e.g. same-order or reversed.")
def probe_add(project, text, query_id, label):
    """Add TEXT as a hand-written probe sequence for a query."""
    pid = _open(project).add_probe(query_id, text, label)
    click.echo(f"added probe {pid}")


@probe.command("score")
@click.argument("project")
@click.option("--query", "query_id", type=int, required=True, help="The query id whose probes to score.")
@click.option("--estimator", default="ekfac", show_default=True, help="Estimator spec (cached factors are reused).")
def probe_score(project, query_id, estimator):
    """Score the query's probes and show their most influential tokens."""
    from rich.table import Table

    from .results import ScoringSession

    p = _open(project)
    probes = p.probes(query_id)
    if not probes:
        raise InflqError(f"query {query_id} has no probes; add one with `inflq probe add`")
    with _progress() as monitor:
        session = ScoringSession.for_queries(p, [query_id], estimator=estimator, monitor=monitor)
        results = session.score_texts([pr["text"] for pr in probes], query_id)
    from .display import score_format

    t = Table("probe", "label", "score", "text (most influential tokens in bold)")
    fmt = score_format(res.total for res in results)
    for pr, res in zip(probes, results, strict=False):
        t.add_row(str(pr["id"]), pr["label"], fmt(res.total), _heat_text(res.labels, res.values))
    _console().print(t)


def _text_room(widths: list[int]) -> int:
    """The width left for a last (text) column beside columns of ``widths`` in a rich Table:
    ids and scores are shown whole, the text gives way."""
    return max(10, _console().width - sum(widths) - 3 * len(widths) - 4)


def _heat_text(tokens, values):
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


# -- runs and results ------------------------------------------------------------------------------
@cli.command()
@click.argument("project")
@click.option("-i", "--investigation", default="default", show_default=True, help="Investigation whose queries are scored.")
@click.option("--estimator", default="ekfac", show_default=True, help="Estimator spec, e.g. ekfac or ekfac:damping=1e-3.")
@click.option("--filter", "filter_", default="all", show_default=True, help="Candidate filter spec; join with + for a union (tfidf:k=1000+random:n=500).")
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
@click.option("--device", help="cpu, cuda, cuda:1, mps (default: the project's, auto).")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), help="Model dtype for this run (default: the project's).")
@click.option("--refit", is_flag=True, help="Recompute the estimator's factors even if cached.")
@click.option("--resume", "resume", type=int, is_flag=False, flag_value=0,
              help="Continue a cancelled or failed run: by id, or alone (after PROJECT) the investigation's latest interrupted run.")
def run(project, investigation, estimator, filter_, executor, address, modules, rank, full_rank_mb, top_k, fit_sequences, seed, batch_size, batch_tokens, shard_size, device, dtype, refit, resume):
    """Fit what is needed and score the investigation's queries."""
    from .runs import RunSettings, run_investigation

    p = _open(project)
    p.set_runtime(device, dtype)
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
    settings = RunSettings(estimator=estimator, filter=filter_, executor=executor or "local", modules=modules, rank=rank_v, full_rank_mb=full_rank_mb, top_k=top_k, fit_sequences=fit_sequences, seed=p.config.seed if seed is None else seed, batch_size=batch_size, batch_tokens=batch_tokens, shard_size=shard_size, refit=refit)
    if resume == 0:  # the bare flag: the investigation's latest interrupted run
        from .runs import interrupted_run

        row = interrupted_run(p, investigation)
        if row is None:
            raise InflqError(f"investigation {investigation!r} has no interrupted run to resume; see `inflq runs {project}`, or give a run id")
        resume = row["id"]
    if resume:
        from .runs import committed_work

        row = p.db["runs"].get(resume) if p.db["runs"].count_where("id = ?", [resume]) else None
        if row is not None and row["kind"] == "scores" and row["status"] != "done":
            click.echo(f"resuming run {resume} ({row['status']}, {row['estimator']} / {row['filter']}); {committed_work(p, resume)}", err=True)
    with _progress() as monitor:
        try:
            result = run_investigation(p, investigation, settings, monitor, resume=resume, executor=executor if resume else None)
        except Cancelled:
            from .runs import committed_work

            last = resume or p.db.execute("SELECT max(id) FROM runs").fetchone()[0]
            raise InflqError(f"run {last} cancelled; {committed_work(p, last)}: continue with `inflq run {project} --resume {last}` (or --resume alone)") from None
    phases = ", ".join(f"{k} {v:.1f}s" for k, v in result.phases.items())
    click.echo(f"run {result.run_id} done in {result.seconds:.1f}s ({phases}); result set {result.result_set_id}")
    click.echo(f"see the top sequences with: inflq top {project} -i {p.investigation(p.db['runs'].get(result.run_id)['investigation_id'])['name']}")


@cli.group()
def factors():
    """Cached factor sets: list, fit ahead of a run, show spectra, remove."""


@factors.command("list")
@click.argument("project")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def factors_list(project, as_json):
    """The project's factor sets, reused by every investigation with the same settings."""
    from .factors import factor_sets

    p = _open(project)
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
        click.echo(f"  {r['num_modules']} modules · {r['num_sequences']} sequences · seed {r['seed']} · {size} · fit in {r['seconds'] or 0:.1f} s"
                   f" · used by {r['runs']} run{'s' if r['runs'] != 1 else ''} · {'current' if r['current_model'] else 'another'} model"
                   f" · {(r['created_at'] or '')[:16].replace('T', ' ')}")


@factors.command("fit")
@click.argument("project")
@click.option("--estimator", default="ekfac", show_default=True, help="Estimator spec (its factor settings, e.g. ekfac:fisher=empirical).")
@click.option("--modules", help="Tracked modules: all, mlp, attention or name globs (default: the project's).")
@click.option("--fit-sequences", type=int, help="Fit on a seeded sample of this many sequences (default: all).")
@click.option("--seed", type=int, help="Seed for sampled labels and the sample (default: the project's).")
@click.option("--batch-size", type=int, help="Sequences per batch (default: as many as the token budget holds).")
@click.option("--batch-tokens", type=int, help="Padded tokens per batch (default: chosen from the model's size and the free memory; recorded with the run).")
@click.option("--shard-size", default=512, show_default=True, help="Sequences per committed fitting shard.")
@click.option("--executor", help="Executor spec: local (default) or ray[:...] (docs/executors.md).")
@click.option("--device", help="cpu, cuda, cuda:1, mps (default: the project's, auto).")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), help="Model dtype for the fit (default: the project's).")
@click.option("--refit", is_flag=True, help="Recompute even if these factors are cached.")
@click.option("--resume", type=int, is_flag=False, flag_value=0, help="Continue an interrupted fit: by run id, or alone (after PROJECT) the latest one.")
@click.option("-i", "--investigation", default="default", show_default=True, help="Investigation the fitting run is listed under.")
def factors_fit(project, estimator, modules, fit_sequences, seed, batch_size, batch_tokens, shard_size, executor, device, dtype, refit, resume, investigation):
    """Fit factors now (e.g. on a GPU machine), for later runs to reuse; resumable."""
    from .runs import RunSettings, fit_factors

    p = _open(project)
    p.set_runtime(device, dtype)
    settings = RunSettings(estimator=estimator, executor=executor or "local", modules=modules, fit_sequences=fit_sequences,
                           seed=p.config.seed if seed is None else seed, batch_size=batch_size, batch_tokens=batch_tokens, shard_size=shard_size, refit=refit)
    if resume == 0:  # the bare flag: the latest interrupted fit
        from .runs import interrupted_run

        row = interrupted_run(p, investigation, kind="factors")
        if row is None:
            raise InflqError(f"no interrupted factor fit to resume in investigation {investigation!r}; see `inflq runs {project}`")
        resume = row["id"]
        click.echo(f"resuming factor fit {resume} ({row['status']}, {row['estimator']})", err=True)
    with _progress() as monitor:
        try:
            run_id, fs_id, seconds = fit_factors(p, settings, monitor, investigation, resume=resume)
        except Cancelled:
            from .runs import committed_work

            last = resume or p.db.execute("SELECT max(id) FROM runs").fetchone()[0]
            raise InflqError(f"fit {last} cancelled; {committed_work(p, last)}: continue with `inflq factors fit {project} --resume {last}`") from None
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

    from .factors import spectra, spectrum_plot, spectrum_table

    p = _open(project)
    items = spectra(p, factor_set, damping, damping_factor, modules)
    if as_json:
        click.echo(json.dumps([sp.summary() for sp in items], indent=1))
        return
    t = spectrum_table(items, factor_set)
    console = _console()
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
    from .factors import factor_set as get_factor_set
    from .factors import remove_factor_set

    p = _open(project)
    row = get_factor_set(p, factor_set)
    if not yes and not click.confirm(f"remove factor set {factor_set} ({row['estimator']}, {row['path']})?"):
        raise InflqError("not removed")
    click.echo(f"removed factor set {factor_set} ({remove_factor_set(p, factor_set)})")


@cli.command()
@click.argument("project")
@click.option("-i", "--investigation", help="Only this investigation's runs (default: all).")
def runs(project, investigation):
    """List runs with their status and progress."""
    from rich.table import Table

    p = _open(project)
    where, args = ("investigation_id = ?", [p.investigation(investigation)["id"]]) if investigation else (None, None)
    t = Table("run", "status", "estimator", "filter", "phase", "progress", "seconds", "error")
    for r in p.db["runs"].rows_where(where, args, order_by="id"):
        t.add_row(str(r["id"]), r["status"], r["estimator"], r["filter"], r["phase"] or "", f"{r['done']}/{r['total']}", f"{r['seconds'] or 0:.1f}", (r["error"] or "")[:60])
    _console().print(t)


@cli.command()
@click.argument("project")
@click.option("-i", "--investigation", default="default", show_default=True, help="Investigation whose results are shown.")
@click.option("--query", "query_id", type=int, help="Query id (default: every query).")
@click.option("-k", default=10, show_default=True, help="Sequences per query.")
@click.option("--bottom", is_flag=True, help="Most negative (the sequences that make the completion less likely).")
@click.option("--result-set", type=int, help="Result set id (default: the latest).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def top(project, investigation, query_id, k, bottom, result_set, as_json):
    """Print the most influential training sequences of each query."""
    from rich.table import Table

    from .results import estimator_summary
    from .results import result_set as get_rs
    from .results import top as get_top

    p = _open(project)
    rs = get_rs(p, investigation, result_set)
    queries = [p.query(query_id)] if query_id else p.queries(investigation)
    side = "bottom" if bottom else "top"
    out = []
    for q in queries:
        rows = get_top(p, rs["id"], q["id"], side, k)
        if as_json:
            out.append({"query": q, "results": rows})
            continue
        title = (f"query {q['id']}: {q['prompt']!r} → {q['completion']!r}  ({rs['name']}; {estimator_summary(rs)}; "
                 "positive = makes the completion more likely)")
        from .display import score_format

        # Ids are whole (they differ at their ends: ...-fwd-00 and ...-fwd-02); the text gives way.
        fmt = score_format(r["score"] for r in rows)
        widths = [4, max([5] + [len(fmt(r["score"])) for r in rows]), max([8] + [len(r["seq_id"]) for r in rows])]
        t = Table(title=title, title_justify="left")
        for name, width in zip(("rank", "score", "sequence"), widths, strict=True):
            t.add_column(name, no_wrap=True, justify="left" if name == "sequence" else "right", min_width=width)
        t.add_column("text", overflow="ellipsis", no_wrap=True, max_width=_text_room(widths))
        for r in rows:
            t.add_row(str(r["rank"]), fmt(r["score"]), r["seq_id"], r["text"][:100])
        _console().print(t)
    if as_json:
        click.echo(json.dumps(out, indent=2))


@cli.command()
@click.argument("project")
@click.option("-i", "--investigation", default="default", show_default=True, help="Investigation whose results are exported.")
@click.option("--format", "fmt", type=click.Choice(["npy", "csv", "jsonl", "md"]), default="npy", show_default=True, help="npy: float32 [queries, sequences], NaN = not scored; csv, jsonl, md: the stored top and bottom sequences.")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False), help="File to write.")
@click.option("--result-set", type=int, help="Result set id (default: the latest).")
def export(project, investigation, fmt, output, result_set):
    """Export results. npy: float32 [queries, corpus sequences], NaN where not scored."""
    p = _open(project)
    if fmt == "npy":
        import numpy as np

        from .results import score_matrix

        m = score_matrix(p, investigation, result_set)
        tmp = Path(output).with_name(Path(output).name + ".tmp.npy")
        np.save(tmp, m, allow_pickle=False)
        os.replace(tmp, output)
        click.echo(f"wrote {output}: {m.shape[0]} queries x {m.shape[1]} sequences")
        return
    try:
        from . import export as exporters
    except ImportError:
        raise InflqError(f"--format {fmt} is not available in this build; use --format npy") from None
    writer = {"csv": exporters.export_csv, "jsonl": exporters.export_jsonl, "md": exporters.export_markdown}[fmt]
    writer(p, investigation, result_set, Path(output))
    click.echo(f"wrote {output}")


@cli.command("self-influence")
@click.argument("project")
@click.option("--estimator", default="ekfac", show_default=True, help="Estimator spec, as for inflq run.")
@click.option("-k", default=10, show_default=True, help="Sequences to show.")
def self_influence_cmd(project, estimator, k):
    """Rank training sequences by self-influence (outliers, memorised or mislabelled data)."""
    import numpy as np
    from rich.table import Table

    from .results import self_influence

    p = _open(project)
    with _progress() as monitor:
        idx, vals = self_influence(p, estimator, monitor=monitor)
    from .display import score_format

    order = np.argsort(-vals)[:k]
    rows = p.sequence_rows([int(idx[i]) for i in order])
    fmt = score_format(vals[i] for i in order)
    widths = [4, 14, max([8] + [len(rows[int(idx[i])]["seq_id"]) for i in order])]
    t = Table()
    for name, width in zip(("rank", "self-influence", "sequence"), widths, strict=True):
        t.add_column(name, no_wrap=True, justify="left" if name == "sequence" else "right", min_width=width)
    t.add_column("text", overflow="ellipsis", no_wrap=True, max_width=_text_room(widths))
    for r, i in enumerate(order, 1):
        seq = int(idx[i])
        t.add_row(str(r), fmt(vals[i]), rows[seq]["seq_id"], p.decode(p.corpus.get(seq))[:100])
    _console().print(t)


@cli.command()
@click.argument("project")
@click.option("-i", "--investigation", default="default", show_default=True, help="Investigation of the query.")
@click.option("--query", "query_id", type=int, required=True, help="Query id (see inflq query list).")
@click.option("--sequence", "seq_id", required=True, help="Training sequence id (document id:chunk).")
@click.option("--kind", type=click.Choice(["token", "layer"]), default="token", show_default=True, help="token: a heat map over the sequence's tokens; layer: a bar per layer.")
@click.option("--result-set", type=int, help="Result set id (default: the latest).")
def attribute(project, investigation, query_id, seq_id, kind, result_set):
    """Split one sequence's score over its tokens or the model's layers."""
    from rich.table import Table

    from .results import ScoringSession
    from .results import result_set as get_rs

    p = _open(project)
    rs = get_rs(p, investigation, result_set)
    row = next(p.db["sequences"].rows_where("seq_id = ?", [seq_id]), None)
    if row is None:
        raise InflqError(f"no training sequence {seq_id!r}; ids look like <document id>:<chunk>")
    res = ScoringSession.for_result_set(p, rs).attribute(p.corpus.get(row["idx"]), query_id, kind)
    if kind == "token":
        _console().print(_heat_text(res.labels, res.values))
    from .display import score_format

    # Tokens with their position in the sequence: the same word can occur more than once.
    t = Table("position", "token", "score") if kind == "token" else Table(kind, "score")
    ranked = sorted(enumerate(zip(res.labels, res.values, strict=False)), key=lambda x: -abs(x[1][1]))[:20]
    fmt = score_format(v for _, (_, v) in ranked)
    for pos, (lab, v) in ranked:
        t.add_row(*((str(pos), repr(lab)[1:-1]) if kind == "token" else (lab,)), fmt(v))
    _console().print(t)
    click.echo(f"total {res.total:+.6g}")


@cli.group()
def corpus():
    """The tokenized corpus."""


@corpus.command("rebuild")
@click.argument("project")
def corpus_rebuild(project):
    """Re-tokenize the corpus after it changed."""
    p = _open(project)
    p.rebuild_corpus()
    click.echo(f"tokenized {len(p.corpus)} training sequences")
    note = p.unknown_tokens_note()
    if note:
        click.echo(f"warning: {note}", err=True)


@cli.command()
@click.argument("project")
@click.option("--model", type=click.Path(), help="A local copy of the project's model.")
@click.option("--corpus", "corpus_path", type=click.Path(), help="A local copy of the project's corpus.")
def relink(project, model, corpus_path):
    """Point a project at local copies of its model or corpus (fingerprints are checked)."""
    p = _open(project)
    p.relink(Path(model) if model else None, Path(corpus_path) if corpus_path else None)
    click.echo("relinked")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def plugins(as_json):
    """List loaded plugins, what they provide, and any that failed to load."""
    from rich.table import Table

    from .plugins import get_registry

    reg = get_registry()
    kinds = ("estimator", "filter", "attribution", "executor")
    if as_json:
        click.echo(json.dumps({
            "plugins": [lp.__dict__ for lp in reg.loaded],
            **{k: {n: {"plugin": reg.origin[(k, n)], "description": c.description, "options": [o.name for o in c.options]} for n, c in reg.all(k).items()} for k in kinds},
        }, indent=2))
        return
    t = Table("plugin", "module", "distribution", "status")
    for lp in reg.loaded:
        t.add_row(lp.name, lp.module, lp.distribution, "[red]failed: " + lp.error + "[/]" if lp.error else "ok")
    _console().print(t)
    t = Table("kind", "name", "from", "description", "options")
    for k in kinds:
        for n, c in reg.all(k).items():
            t.add_row(k, n, reg.origin[(k, n)], c.description, ", ".join(f"{o.name}={o.default}" for o in c.options))
    _console().print(t)


@cli.command()
@click.option("--headless", is_flag=True, help="Run the demo investigation and print its top sequences instead of opening the UI.")
@click.option("--estimator", default="ekfac", show_default=True, help="Estimator spec of the result set to show (run if there is none).")
def demo(headless, estimator):
    """Prepare the demo project (projects/demo) and open it."""
    from .demo import ensure_demo, run_demo

    root = ensure_demo(progress=lambda m: _console(True).print(m))
    if not headless:
        from .tui.app import run_tui

        run_tui(str(root))
        return
    with _progress() as monitor:
        rs_id = run_demo(root, estimator, monitor)
    from .project import Project

    demo_project = Project.open(root)
    rs = demo_project.db["result_sets"].get(rs_id)
    demo_project.close()
    click.echo(f"result set {rs_id}: {rs['estimator']} / {rs['filter']} ({rs['created_at'][:19]}); see the others with `inflq demo` (Results tab)")
    ctx = click.get_current_context()
    ctx.invoke(top, project=str(root), investigation=DEMO_INVESTIGATION, query_id=None, k=5, bottom=False, result_set=rs_id, as_json=False)


@cli.command()
@click.argument("project")
@click.option("-i", "--investigation", default="default", show_default=True, help="Investigation whose queries are used.")
@click.option("--estimators", default="identity,ekfac,lissa", show_default=True, help="Comma-separated estimator specs to compare.")
@click.option("--sample", default=20, show_default=True, help="Fitting sequences to solve the PBRF for (two solves each).")
@click.option("--dampings", help="EK-FAC dampings to sweep, e.g. 1e-8,1e-4,1e-2.")
@click.option("--queries", default=3, show_default=True, help="How many of the investigation's queries.")
@click.option("--fit-sequences", default=128, show_default=True, help="Fitting sequences (N) for the estimators and the PBRF.")
@click.option("--epsilon", type=float, help="Up-weighting ε of the PBRF (default 1/N).")
@click.option("--pbrf-steps", default=300, show_default=True, help="Optimizer steps for each PBRF solve.")
@click.option("--pbrf-damping", type=float, help="The PBRF's damping λ (default: 0.1 × mean Gauss-Newton eigenvalue per module).")
@click.option("--max-minutes", default=30.0, show_default=True, help="Refuse a sample whose PBRF solves would take longer.")
@click.option("--seed", default=0, show_default=True, help="Seed for the sample and the sampled labels.")
@click.option("--batch-size", default=8, show_default=True, help="Sequences per batch.")
def validate(project, investigation, estimators, sample, dampings, queries, fit_sequences, epsilon, pbrf_steps, pbrf_damping, max_minutes, seed, batch_size):
    """Measure estimators against the PBRF ground truth on a sample of fitting sequences."""
    from rich.table import Table

    from .validate import parse_list
    from .validate import validate as run_validation

    p = _open(project)
    with _progress() as monitor:
        v = run_validation(p, investigation, parse_list(estimators), sample=sample, dampings=parse_list(dampings, float), queries=queries, fit_sequences=fit_sequences, epsilon=epsilon, pbrf_steps=pbrf_steps, pbrf_damping=pbrf_damping, seed=seed, batch_size=batch_size, max_minutes=max_minutes, monitor=monitor)
    t = Table("estimator", "pearson", "spearman", "fit s", "inverse-HVP s", title=f"validation {v.id}: {len(v.settings['queries'])} queries × {len(v.sample)} sequences vs PBRF (ε={v.settings['epsilon']:.3g}, {v.settings['pbrf_seconds']:.0f} s)")
    for r in v.rows:
        t.add_row(r.estimator, f"{r.pearson:.3f}", f"{r.spearman:.3f}", f"{r.fit_seconds:.3f}", f"{r.ihvp_seconds:.4f}")
    _console().print(t)
    by = {r.estimator.split(":")[0]: r for r in v.rows}
    if "ekfac" in by and "lissa" in by and by["ekfac"].ihvp_seconds > 0:
        click.echo(f"LiSSA / EK-FAC inverse-HVP time: {by['lissa'].ihvp_seconds / by['ekfac'].ihvp_seconds:.0f}x")
    if v.recommended_damping is not None:
        click.echo(f"recommended EK-FAC damping: {v.recommended_damping:g} (run with --estimator ekfac:damping={v.recommended_damping:g})")


def _load_plugin_commands() -> None:
    from .plugins import get_registry

    try:
        get_registry().pm.hook.register_commands(cli=cli)
    except Exception as exc:  # a plugin's commands must not break the CLI
        print(f"warning: a plugin failed to add commands: {exc}", file=sys.stderr)


from .sharing_cli import COMMANDS as _SHARING_COMMANDS  # noqa: E402 (pack, unpack, trust, untrust, check)

for _command in _SHARING_COMMANDS:
    cli.add_command(_command)

_load_plugin_commands()


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line and exit status 1."""
    try:
        cli.main(args=argv, standalone_mode=False)
    except InflqError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)
    except sqlite3.OperationalError as exc:
        msg = str(exc)
        if "locked" in msg or "busy" in msg:
            click.echo("Error: the project's catalog is locked by another process; wait for it to finish, then retry", err=True)
        elif "readonly" in msg:
            click.echo("Error: the project's catalog is read-only; copy the project somewhere writable", err=True)
        else:
            click.echo(f"Error: catalog error ({msg}); check the project folder", err=True)
        sys.exit(1)
    except Exception as exc:
        if os.environ.get("INFLQ_DEBUG"):
            raise
        click.echo(f"Error: internal error ({type(exc).__name__}: {exc}); rerun with INFLQ_DEBUG=1 for details and report it", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
