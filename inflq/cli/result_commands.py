"""Reading results back: ``top``, ``export``, ``self-influence``, ``attribute``."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import click

from .. import catalog
from ..display import plural
from ..errors import InflqError
from ..settings import RunSettings
from .common import heat_text, make_console, progress_monitor, project_at, text_room


@click.command()
@click.argument("project")
@click.option("-i", "--investigation", default="default", show_default=True, help="Investigation whose results are shown.")
@click.option("--query", "query_id", type=int, help="Query id (default: every query).")
@click.option("-k", default=10, show_default=True, help="Sequences per query.")
@click.option("--bottom", is_flag=True, help="Most negative (the sequences that make the completion less likely).")
@click.option("--result-set", type=int, help="Result set id (default: the latest).")
@click.option("--wide", is_flag=True, help="Do not fit the table to the terminal: each row as long as its text (for `less -S` or a file).")
@click.option("--full", is_flag=True, help="Each sequence's whole text, wrapped to the terminal, under its rank, score and id.")
@click.option("--by", "by_field", metavar="FIELD", help="Instead of sequences: each query's share of its total positive influence by a corpus metadata field (e.g. source).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def top(project, investigation, query_id, k, bottom, result_set, wide, full, by_field, as_json):
    """Print the most influential training sequences of each query."""
    from ..measuring import sign_note
    from ..reading import decoded, estimator_summary, query_of, require_scored, scored_by
    from ..reading import result_set as get_rs
    from ..reading import top as get_top

    if wide and full:
        raise InflqError("--wide and --full are two layouts; give one")
    p = project_at(project)
    if query_id is not None:
        queries = [query_of(p, investigation, query_id)]
    rs = get_rs(p, investigation, result_set)
    if query_id is not None:
        require_scored(rs, query_id, investigation)
    else:
        queries = catalog.queries(p.db, investigation)
    unscored = [q for q in queries if not scored_by(rs, q["id"])]
    queries = [q for q in queries if scored_by(rs, q["id"])]
    if by_field:
        _top_by(p, rs, by_field, queries, as_json)
    else:
        side = "bottom" if bottom else "top"
        stale = catalog.stale_queries(p.db, rs["id"])
        out = []
        for q in queries:
            rows = get_top(p, rs["id"], q["id"], side, k)
            if as_json:
                out.append({"query": decoded(q), "stale": q["id"] in stale, "results": [decoded(r) for r in rows]})
                continue
            title = f"query {q['id']}: {q['prompt']!r} → {q['completion']!r}  ({rs['name']}; {estimator_summary(rs)}; {sign_note(q)})"
            if q["id"] in stale:
                title += "\nSTALE: query edited after this result set scored it; run the investigation again"
            _print_sequences(title, rows, wide=wide, full=full)
        if as_json:
            click.echo(json.dumps(out, indent=2))
    for q in unscored:
        click.echo(f"query {q['id']} was added after run {rs['run_id']} and is not in result set {rs['id']}; "
                   f"score it with `inflq run {project} -i {investigation}`", err=True)


def _print_sequences(title: str, rows: list[dict], *, wide: bool = False, full: bool = False) -> None:
    """Rank, score, id and text of stored sequences: a table fitted to the terminal (ids and
    scores whole, the text cut), or as wide as the text (``wide``), or one block per sequence
    with its whole text wrapped (``full``)."""
    from rich.table import Table
    from rich.text import Text

    from ..display import score_format

    fmt = score_format(r["score"] for r in rows)
    console = make_console()
    if full:
        console.print(Text(title, style="bold"))
        for r in rows:
            console.print(Text(f"{r['rank']:>4}  {fmt(r['score'])}  {r['seq_id']}", style="bold"))
            console.print(Text(" ".join(r["text"].split()), overflow="fold"), soft_wrap=False, width=console.width)
            console.print()
        return
    # Ids are whole (they differ at their ends: ...-fwd-00 and ...-fwd-02); the text gives way.
    widths = [4, max([5] + [len(fmt(r["score"])) for r in rows]), max([8] + [len(r["seq_id"]) for r in rows])]
    t = Table(title=title, title_justify="left")
    for name, width in zip(("rank", "score", "sequence"), widths, strict=True):
        t.add_column(name, no_wrap=True, justify="left" if name == "sequence" else "right", min_width=width)
    texts = [" ".join(r["text"].split()) for r in rows]
    if wide:
        t.add_column("text", no_wrap=True)
        console = make_console(width=sum(widths) + 3 * len(widths) + 4 + max([4] + [len(x) for x in texts]))
    else:
        t.add_column("text", overflow="ellipsis", no_wrap=True, max_width=text_room(widths))
    for r, text in zip(rows, texts, strict=True):
        t.add_row(str(r["rank"]), fmt(r["score"]), r["seq_id"], text if wide else text[:200])
    console.print(t)


def _top_by(p, rs: dict, field_name: str, queries: list[dict], as_json: bool) -> None:
    from rich.table import Table

    from ..display import plural
    from ..reading import decoded, influence_by

    shares = influence_by(p, rs, field_name, [q["id"] for q in queries])
    if as_json:
        click.echo(json.dumps([{"query": decoded(q), **dataclasses.asdict(s)} for q, s in zip(queries, shares, strict=True)], indent=2))
        return
    for q, s in zip(queries, shares, strict=True):
        t = Table(title=f"query {q['id']}: {q['prompt']!r} → {q['completion']!r}: positive influence by {field_name} "
                        f"({plural(s.scored, 'sequence')} scored in result set {rs['id']})", title_justify="left")
        t.add_column(field_name)
        for name in ("share of positive influence", "sequences", "share of sequences"):
            t.add_column(name, justify="right")
        for g in s.groups:
            t.add_row(g.value or "(none)", "n/a" if g.share != g.share else f"{100 * g.share:.1f} %", f"{g.sequences:,}", f"{100 * g.sequence_share:.1f} %")
        make_console().print(t)
        if not s.total_positive > 0:
            click.echo(f"query {q['id']} has no positive scores in result set {rs['id']}: no share to split")


@click.command()
@click.argument("project")
@click.option("-i", "--investigation", default="default", show_default=True, help="Investigation whose results are exported.")
@click.option("--format", "fmt", type=click.Choice(["npy", "csv", "jsonl", "md"]), default="npy", show_default=True, help="npy: float32 [queries, sequences], NaN = not scored; csv, jsonl, md: the stored top and bottom sequences.")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False), help="File to write.")
@click.option("--result-set", type=int, help="Result set id (default: the latest).")
def export(project, investigation, fmt, output, result_set):
    """Export results. npy: float32 [queries, corpus sequences], NaN where not scored."""
    p = project_at(project)
    if fmt == "npy":
        import numpy as np

        from ..reading import score_matrix

        m = score_matrix(p, investigation, result_set)
        tmp = Path(output).with_name(Path(output).name + ".tmp.npy")
        np.save(tmp, m, allow_pickle=False)
        os.replace(tmp, output)
        click.echo(f"wrote {output}: {plural(m.shape[0], 'query', sep=False)} x {plural(m.shape[1], 'sequence', sep=False)}")
        return
    try:
        from .. import export as exporters
    except ImportError:
        raise InflqError(f"--format {fmt} is not available in this build; use --format npy") from None
    writer = {"csv": exporters.export_csv, "jsonl": exporters.export_jsonl, "md": exporters.export_markdown}[fmt]
    writer(p, investigation, result_set, Path(output))
    click.echo(f"wrote {output}")


@click.command("self-influence")
@click.argument("project")
@RunSettings.click_options("self-influence")
@click.option("-k", default=10, show_default=True, help="Sequences to show.")
@click.option("--recompute", is_flag=True, help="Compute again even if the project keeps these scores (they are kept after each computation).")
def self_influence_cmd(project, estimator, k, recompute):
    """Rank training sequences by self-influence (outliers, memorised or mislabelled data)."""
    import numpy as np
    from rich.table import Table

    from ..reading import self_influence

    p = project_at(project)
    with progress_monitor() as monitor:
        info: dict = {}
        idx, vals = self_influence(p, estimator, monitor=monitor, cache=not recompute, info=info)
    if info.get("cached"):
        click.echo(f"read back from {info['path']} (computed {info['created_at']}); --recompute to compute again", err=True)
    from ..display import score_format

    order = np.argsort(-vals)[:k]
    rows = catalog.sequence_rows(p.db, [int(idx[i]) for i in order])
    fmt = score_format(vals[i] for i in order)
    widths = [4, 14, max([8] + [len(rows[int(idx[i])]["seq_id"]) for i in order])]
    t = Table()
    for name, width in zip(("rank", "self-influence", "sequence"), widths, strict=True):
        t.add_column(name, no_wrap=True, justify="left" if name == "sequence" else "right", min_width=width)
    t.add_column("text", overflow="ellipsis", no_wrap=True, max_width=text_room(widths))
    for r, i in enumerate(order, 1):
        seq = int(idx[i])
        t.add_row(str(r), fmt(vals[i]), rows[seq]["seq_id"], p.runtime.decode(p.runtime.corpus.get(seq))[:100])
    make_console().print(t)


@click.command()
@click.argument("project")
@click.option("-i", "--investigation", default="default", show_default=True, help="Investigation of the query.")
@click.option("--query", "query_id", type=int, required=True, help="Query id (see inflq query list).")
@click.option("--sequence", "seq_id", required=True, help="Training sequence id (document id:chunk).")
@click.option("--kind", type=click.Choice(["token", "layer"]), default="token", show_default=True, help="token: a heat map over the sequence's tokens; layer: a bar per layer.")
@click.option("--result-set", type=int, help="Result set id (default: the latest).")
def attribute(project, investigation, query_id, seq_id, kind, result_set):
    """Split one sequence's score over its tokens or the model's layers."""
    from ..reading import find_sequence, query_of, require_scored
    from ..reading import result_set as get_rs

    p = project_at(project)
    query_of(p, investigation, query_id)
    rs = get_rs(p, investigation, result_set)
    require_scored(rs, query_id, investigation)
    row = find_sequence(p, seq_id)
    _print_attribution(p, rs, row, query_id, kind)


def _print_attribution(p, rs: dict, row: dict, query_id: int, kind: str) -> None:
    from rich.table import Table

    from ..display import score_format
    from ..reading import ScoringSession

    res = ScoringSession.for_result_set(p, rs).attribute(p.runtime.corpus.get(row["idx"]), query_id, kind)
    if kind == "token":
        make_console().print(heat_text(res.labels, res.values))
    # Tokens with their position in the sequence: the same word can occur more than once.
    t = Table("position", "token", "score") if kind == "token" else Table(kind, "score")
    ranked = sorted(enumerate(zip(res.labels, res.values, strict=False)), key=lambda x: -abs(x[1][1]))[:20]
    fmt = score_format(v for _, (_, v) in ranked)
    for pos, (lab, v) in ranked:
        t.add_row(*((str(pos), repr(lab)[1:-1]) if kind == "token" else (lab,)), fmt(v))
    make_console().print(t)
    click.echo(f"total {res.total:+.6g}")


@click.command()
@click.argument("project")
@click.argument("sequence")
@click.option("-i", "--investigation", help="Investigation whose scores are shown (default: the query's, else the one with the latest results).")
@click.option("--query", "query_id", type=int, help="Also the token heat map of the sequence's score for this query.")
@click.option("--result-set", type=int, help="Result set id (default: the investigation's latest).")
def show(project, sequence, investigation, query_id, result_set):
    """One training sequence: its whole text, its metadata, its scores and ranks in a result set, and
    (with --query) where in its tokens the score comes from. SEQUENCE is a sequence id
    (document id:chunk) or the id of a one-chunk document."""
    from rich.table import Table
    from rich.text import Text

    from ..display import plural, score_format
    from ..reading import (
        estimator_summary,
        find_sequence,
        query_of,
        require_scored,
        result_sets,
        sequence_scores,
    )
    from ..reading import result_set as get_rs

    p = project_at(project)
    row = find_sequence(p, sequence)
    if query_id is not None and investigation is None:
        investigation = catalog.investigation(p.db, catalog.query(p.db, query_id)["investigation_id"])["name"]
    if investigation is None:
        investigation = catalog.latest_investigation(p.db) or "default"
    console = make_console()
    meta = json.loads(row["meta"] or "{}")
    console.print(Text(f"{row['seq_id']}  (document {row['doc_id']}, chunk {row['chunk']}, {plural(row['n_tokens'], 'token')}, corpus index {row['idx']})", style="bold"))
    for key, value in meta.items():
        console.print(f"  {key}: {value}", highlight=False, markup=False)
    for tag in catalog.sequence_tags(p.db, investigation, row["seq_id"]):
        console.print(f"  tag ({investigation}): {tag['tag']}" + (f" — {tag['note']}" if tag["note"] else ""), markup=False)
    console.print()
    console.print(Text(p.runtime.decode(p.runtime.corpus.get(row["idx"])), overflow="fold"))
    console.print()
    if query_id is not None:
        query_of(p, investigation, query_id)
    if not result_sets(p, investigation):
        click.echo(f"investigation {investigation!r} has no results yet: no scores to show")
        return
    rs = get_rs(p, investigation, result_set)
    found = sequence_scores(p, rs, row["idx"])
    fmt = score_format(s.score for s in found if s.rank is not None)
    t = Table("query", "prompt → completion", "score", "rank", title=f"scores in result set {rs['id']} ({rs['name']}; {estimator_summary(rs)}; positive = makes the completion more likely)", title_justify="left")
    texts = {q["id"]: f"{q['prompt']!r} → {q['completion']!r}" for q in catalog.queries(p.db, investigation)}
    for s in found:
        t.add_row(str(s.query_id), texts.get(s.query_id, ""), fmt(s.score) if s.rank is not None else "not scored",
                  f"{s.rank:,} of {s.scored:,}" if s.rank is not None else "")
    console.print(t)
    if query_id is not None:
        require_scored(rs, query_id, investigation)
        if not any(s.query_id == query_id and s.rank is not None for s in found):
            raise InflqError(f"{row['seq_id']} was not a candidate of query {query_id} in result set {rs['id']}; no heat map to show")
        _print_attribution(p, rs, row, query_id, "token")


COMMANDS = (top, export, self_influence_cmd, attribute, show)
