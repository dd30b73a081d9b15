"""Investigations, their queries and hand-written probes: ``investigation``, ``query``, ``probe``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .. import catalog
from ..errors import InflqError
from ..queries import add_queries, add_query
from ..settings import RunSettings
from .common import heat_text, make_console, progress_monitor, project_at


@click.group()
def investigation():
    """Create, list, rename and delete investigations."""


@investigation.command("add")
@click.argument("project")
@click.argument("name")
@click.option("--description", default="", help="What the investigation is about (shown in the UI).")
def investigation_add(project, name, description):
    """Create the investigation NAME."""
    catalog.create_investigation(project_at(project).db, name, description)
    click.echo(f"created investigation {name!r}")


@investigation.command("list")
@click.argument("project")
def investigation_list(project):
    """List the investigations with their query and result-set counts."""
    from rich.table import Table

    t = Table("name", "queries", "result sets", "created", "description")
    for inv in catalog.investigations(project_at(project).db):
        t.add_row(inv["name"], str(inv["num_queries"]), str(inv["num_result_sets"]), inv["created_at"], inv["description"] or "")
    make_console().print(t)


@investigation.command("rename")
@click.argument("project")
@click.argument("name")
@click.argument("new_name")
def investigation_rename(project, name, new_name):
    """Rename the investigation NAME to NEW_NAME."""
    catalog.rename_investigation(project_at(project).db, name, new_name)
    click.echo(f"renamed {name!r} to {new_name!r}")


@investigation.command("rm")
@click.argument("project")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--force", is_flag=True, help="Remove it even if one of its runs is still marked running (its process was killed).")
def investigation_rm(project, name, yes, force):
    """Delete the investigation NAME with its queries, probes, runs, results, validations and their files."""
    from ..display import size_text
    from ..removal import remove_investigation

    p = project_at(project)
    catalog.investigation(p.db, name)
    if not yes and not click.confirm(f"delete investigation {name!r} with its queries, runs and results?"):
        raise InflqError("not deleted")
    got = remove_investigation(p, name, force=force)
    runs = f"{len(got.runs)} run{'s' if len(got.runs) != 1 else ''}"
    click.echo(f"deleted {name!r} ({runs}, {got.files} file{'s' if got.files != 1 else ''}, {size_text(got.bytes)})")


@click.group()
def query():
    """Add, list, edit and remove queries (a prompt and the completion whose probability is measured)."""


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
    p = project_at(project)
    if file_:
        from ..corpus import iter_jsonl

        path = Path(file_)
        if not path.exists():
            raise InflqError(f"query file {path} does not exist")
        items = [obj for _, obj in iter_jsonl(path, "'prompt' and 'completion' fields")]
        try:
            ids = add_queries(p, investigation, items)
        except InflqError as exc:
            raise InflqError(f"{path}: {exc}") from None
    else:
        if prompt is None or completion is None:
            raise InflqError("give PROMPT and COMPLETION, or --file queries.jsonl")
        ids = [add_query(p, investigation, prompt, completion, chat=chat, tags=list(tags), notes=notes)]
    click.echo(f"added {len(ids)} quer{'y' if len(ids) == 1 else 'ies'} (id {', '.join(map(str, ids))})")


@query.command("list")
@click.argument("project")
@click.option("-i", "--investigation", default="default", show_default=True, help="The investigation whose queries to list.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (every field) instead of a table.")
def query_list(project, investigation, as_json):
    """List the investigation's queries: id, prompt, completion, tags."""
    rows = catalog.queries(project_at(project).db, investigation)
    if as_json:
        from ..reading import decoded

        click.echo(json.dumps([decoded(r) for r in rows], indent=2))
        return
    from rich.table import Table

    t = Table("id", "prompt", "completion", "tags")
    for q in rows:
        t.add_row(str(q["id"]), q["prompt"], q["completion"], ", ".join(json.loads(q["tags"] or "[]")))
    make_console().print(t)


@query.command("edit")
@click.argument("project")
@click.argument("query_id", type=int)
@click.option("--prompt", help="The new prompt.")
@click.option("--completion", help="The new completion.")
@click.option("--chat/--no-chat", default=None, help="Format the prompt with the tokenizer's chat template (or not).")
@click.option("--tag", "tags", multiple=True, help="The query's tags, replacing the old ones (repeatable).")
@click.option("--clear-tags", is_flag=True, help="Remove every tag.")
@click.option("--notes", help="The new free-text note.")
def query_edit(project, query_id, prompt, completion, chat, tags, clear_tags, notes):
    """Change a query. A new prompt or completion makes its earlier results stale (shown as such)."""
    from ..queries import edit_query

    if tags and clear_tags:
        raise InflqError("give --tag or --clear-tags, not both")
    p = project_at(project)
    stale = edit_query(p, query_id, prompt=prompt, completion=completion, chat=chat,
                       tags=[] if clear_tags else (list(tags) if tags else None), notes=notes)
    click.echo(f"edited query {query_id}")
    if stale:
        sets = ", ".join(map(str, stale))
        click.echo(f"result set{'s' if len(stale) > 1 else ''} {sets} scored it before the edit: "
                   f"{'their' if len(stale) > 1 else 'its'} rows for it are stale; run the investigation again for new ones")


@query.command("rm")
@click.argument("project")
@click.argument("query_id", type=int)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def query_rm(project, query_id, yes):
    """Remove a query with its probes and its rows in every result set."""
    from ..queries import remove_query

    p = project_at(project)
    row = catalog.query(p.db, query_id)
    if not yes and not click.confirm(f"remove query {query_id} ({row['prompt']!r} → {row['completion']!r}) with its probes and results?"):
        raise InflqError("not removed")
    remove_query(p, query_id)
    click.echo(f"removed query {query_id}")


@click.group()
def probe():
    """Hand-written probe sequences for a query, scored without a corpus run."""


@probe.command("add")
@click.argument("project")
@click.argument("text")
@click.option("--query", "query_id", type=int, required=True, help="The query id the probe is scored against (see `inflq query list`).")
@click.option("--label", default="", help="A short label, e.g. same-order or reversed.")
def probe_add(project, text, query_id, label):
    """Add TEXT as a hand-written probe sequence for a query."""
    pid = catalog.add_probe(project_at(project).db, query_id, text, label)
    click.echo(f"added probe {pid}")


@probe.command("score")
@click.argument("project")
@click.option("--query", "query_id", type=int, required=True, help="The query id whose probes to score.")
@RunSettings.click_options("probe score", notes={"estimator": "Its cached factors are reused."})
def probe_score(project, query_id, estimator):
    """Score the query's probes and show their most influential tokens."""
    from rich.table import Table

    from ..reading import ScoringSession

    p = project_at(project)
    probes = catalog.probes(p.db, query_id)
    if not probes:
        raise InflqError(f"query {query_id} has no probes; add one with `inflq probe add`")
    with progress_monitor() as monitor:
        session = ScoringSession.for_queries(p, [query_id], estimator=estimator, monitor=monitor)
        results = session.score_texts([pr["text"] for pr in probes], query_id)
    from ..display import score_format

    t = Table("probe", "label", "score", "text (most influential tokens in bold)")
    fmt = score_format(res.total for res in results)
    for pr, res in zip(probes, results, strict=False):
        t.add_row(str(pr["id"]), pr["label"], fmt(res.total), heat_text(res.labels, res.values))
    make_console().print(t)


COMMANDS = (investigation, query, probe)
