"""``inflq ask``: one new question from the command line, answered with exact scores (issue 24)."""

from __future__ import annotations

import json

import click

from ..errors import Cancelled, InflqError
from ..settings import DeviceSettings, RunSettings
from .common import make_console, progress_monitor, project_at, text_room


@click.command()
@click.argument("project")
@click.argument("prompt")
@click.argument("completion")
@click.option("--depth", type=click.IntRange(min=1), help="How many of the index's best sequences to re-score exactly (default: 5 % of the corpus, at least 100).")
@click.option("-k", default=10, show_default=True, type=click.IntRange(min=1), help="Sequences to show.")
@click.option("--bottom", is_flag=True, help="The most negative (the sequences that make the completion less likely): the index picks its lowest.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON in the shape of `inflq top --json`.")
@click.option("--save", is_flag=True, help="Record the question as a query of -i INVESTIGATION, with its result set (without it, nothing is written).")
@click.option("-i", "--investigation", default=None, help="With --save: the investigation that keeps the question (default: default).")
@click.option("--no-index", "no_index", is_flag=True, help="Score every sequence exactly instead of the index's candidates (a whole run's time).")
@click.option("--chat", is_flag=True, help="Format the prompt with the tokenizer's chat template (as `query add --chat`).")
@click.option("--measurement", default=None, metavar="NAME", help="What the question measures (as `query add --measurement`; default: log p(completion)).")
@click.option("--alternative", default=None, metavar="TEXT", help="The completion to compare with, for a measurement that compares two (margin).")
@RunSettings.click_options("ask", notes={"estimator": "The exact estimator, which scores the index's candidates.", "fit_sequences": "As the run that cached the factors.", "modules": "The index must cover the same."})
@DeviceSettings.click_options("ask")
@click.option("--index", "index_key", default=None, help="Which gradient index picks the candidates (a key or its first characters; default: the newest complete one).")
@click.option("--rank", default="full", show_default=True, help="Rank of the query's preconditioned gradient, or 'full' (exact).")
def ask(project, prompt, completion, depth, k, bottom, as_json, save, investigation, no_index, chat, measurement, alternative, estimator, index_key, rank, fit_sequences, modules, device):
    """Ask PROMPT -> COMPLETION: the gradient index picks the candidates, exact EK-FAC scores them.

    Prints the top K candidates with their exact scores (positive: the sequence makes the completion
    more likely), the same numbers `inflq run --estimator ekfac --rank full` gives those sequences.
    Cached factors are reused; with none cached they are fitted first (and cached, said on stderr)."""
    from ..ask import Asker, answer_rows, query_dict, save_answer

    if investigation is not None and not save:
        raise InflqError("-i names the investigation --save records the question in; add --save (without it, nothing is written)")
    if no_index and index_key:
        raise InflqError("--index chooses the index that picks the candidates; --no-index scores every sequence: give one")
    if no_index and depth:
        raise InflqError("--depth is how deep the index's ranking is re-scored; --no-index scores every sequence: give one")
    rank_v = None if rank in ("full", "none", "None") else _rank(rank)
    p = project_at(project)
    p.runtime.configure(device, None)
    investigation = investigation or "default"
    if save:
        from .. import catalog

        catalog.investigation(p.db, investigation)  # a missing investigation fails now, not after the scores
    asker = Asker(p, estimator, index_key, rank_v, fit_sequences, modules=modules)
    query = query_dict(prompt, completion, chat, measurement, alternative)
    asker.check_query(query)
    if not no_index:
        asker.prepare_index()  # no index: say how to build one before anything slow
    if not asker.factors_cached():
        click.echo(f"no cached {asker.estimator} factors for this project: fitting them first (a fitting run's time; "
                   "they are cached in the project for the next question)", err=True)
    with progress_monitor() as monitor:
        try:
            answer = asker.ask(query, depth=depth, bottom=bottom, use_index=not no_index, monitor=monitor)
        except Cancelled:
            raise Cancelled("nothing was written") from None
    if answer.fitted:
        click.echo(f"fitted {asker.estimator} factors in {asker.fit_seconds:.1f} s (cached for the next question)", err=True)
    side = "bottom" if bottom else "top"
    rs_id = None
    if save:
        qid, run_id, rs_id = save_answer(p, investigation, answer, asker, top_k=max(k, 20))
        from .. import catalog

        answer.query = catalog.query(p.db, qid)
        click.echo(f"saved as query {qid} of {investigation!r} with result set {rs_id} (run {run_id}); "
                   f"see it with: inflq top {project} -i {investigation} --query {qid}", err=True)
    rows = answer_rows(p, answer, k, side, rs_id)
    if as_json:
        from ..reading import decoded

        click.echo(json.dumps([{"query": decoded(answer.query), "stale": False, "results": rows}], indent=2))  # a new question is never stale
        return
    _print(answer, rows, side)


def _rank(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise InflqError(f"--rank must be a number or 'full', not {text!r}") from None
    if value < 1:
        raise InflqError("--rank must be at least 1 (or 'full')")
    return value


def _print(answer, rows: list[dict], side: str) -> None:
    from rich.table import Table

    from ..display import score_format
    from ..measuring import sign_note

    q = answer.query
    secs = answer.seconds
    if answer.index is None:
        how = f"every one of the {answer.num_sequences:,} sequences scored exactly ({answer.estimator}, {secs.get('exact', 0):.1f} s)"
    else:
        what = "lowest" if side == "bottom" else "best"
        how = (f"exact {answer.estimator} scores of the {answer.depth:,} {what} of {answer.num_sequences:,} sequences by {answer.index} "
               f"({secs.get('index', 0):.2f} s; exact {secs.get('exact', 0):.1f} s)")
    title = f"{q['prompt']!r} → {q['completion']!r}: {how}; {sign_note(q)}"
    fmt = score_format(r["score"] for r in rows)
    widths = [4, max([5] + [len(fmt(r["score"])) for r in rows]), max([8] + [len(r["seq_id"]) for r in rows])]
    t = Table(title=title, title_justify="left")
    for name, width in zip(("rank", "score", "sequence"), widths, strict=True):
        t.add_column(name, no_wrap=True, justify="left" if name == "sequence" else "right", min_width=width)
    t.add_column("text", overflow="ellipsis", no_wrap=True, max_width=text_room(widths))
    for r in rows:
        t.add_row(str(r["rank"]), fmt(r["score"]), r["seq_id"], r["text"][:100])
    make_console().print(t)


COMMANDS = (ask,)
