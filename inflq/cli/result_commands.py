"""Reading results back: ``top``, ``export``, ``self-influence``, ``attribute``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from .. import catalog
from ..errors import InflqError
from .common import heat_text, make_console, progress_monitor, project_at, text_room


@click.command()
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

    from ..reading import decoded, estimator_summary
    from ..reading import result_set as get_rs
    from ..reading import top as get_top

    p = project_at(project)
    rs = get_rs(p, investigation, result_set)
    queries = [catalog.query(p.db, query_id)] if query_id else catalog.queries(p.db, investigation)
    side = "bottom" if bottom else "top"
    out = []
    for q in queries:
        rows = get_top(p, rs["id"], q["id"], side, k)
        if as_json:
            out.append({"query": decoded(q), "results": [decoded(r) for r in rows]})
            continue
        title = (f"query {q['id']}: {q['prompt']!r} → {q['completion']!r}  ({rs['name']}; {estimator_summary(rs)}; "
                 "positive = makes the completion more likely)")
        from ..display import score_format

        # Ids are whole (they differ at their ends: ...-fwd-00 and ...-fwd-02); the text gives way.
        fmt = score_format(r["score"] for r in rows)
        widths = [4, max([5] + [len(fmt(r["score"])) for r in rows]), max([8] + [len(r["seq_id"]) for r in rows])]
        t = Table(title=title, title_justify="left")
        for name, width in zip(("rank", "score", "sequence"), widths, strict=True):
            t.add_column(name, no_wrap=True, justify="left" if name == "sequence" else "right", min_width=width)
        t.add_column("text", overflow="ellipsis", no_wrap=True, max_width=text_room(widths))
        for r in rows:
            t.add_row(str(r["rank"]), fmt(r["score"]), r["seq_id"], r["text"][:100])
        make_console().print(t)
    if as_json:
        click.echo(json.dumps(out, indent=2))


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
        click.echo(f"wrote {output}: {m.shape[0]} queries x {m.shape[1]} sequences")
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
@click.option("--estimator", default=None, help="Estimator spec, as for inflq run (default: the registry's default estimator; ekfac among the built-ins).")
@click.option("-k", default=10, show_default=True, help="Sequences to show.")
def self_influence_cmd(project, estimator, k):
    """Rank training sequences by self-influence (outliers, memorised or mislabelled data)."""
    import numpy as np
    from rich.table import Table

    from ..reading import self_influence

    p = project_at(project)
    with progress_monitor() as monitor:
        idx, vals = self_influence(p, estimator, monitor=monitor)
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
    from rich.table import Table

    from ..reading import ScoringSession
    from ..reading import result_set as get_rs

    p = project_at(project)
    rs = get_rs(p, investigation, result_set)
    row = catalog.sequence_by_id(p.db, seq_id)
    if row is None:
        raise InflqError(f"no training sequence {seq_id!r}; ids look like <document id>:<chunk>")
    res = ScoringSession.for_result_set(p, rs).attribute(p.runtime.corpus.get(row["idx"]), query_id, kind)
    if kind == "token":
        make_console().print(heat_text(res.labels, res.values))
    from ..display import score_format

    # Tokens with their position in the sequence: the same word can occur more than once.
    t = Table("position", "token", "score") if kind == "token" else Table(kind, "score")
    ranked = sorted(enumerate(zip(res.labels, res.values, strict=False)), key=lambda x: -abs(x[1][1]))[:20]
    fmt = score_format(v for _, (_, v) in ranked)
    for pos, (lab, v) in ranked:
        t.add_row(*((str(pos), repr(lab)[1:-1]) if kind == "token" else (lab,)), fmt(v))
    make_console().print(t)
    click.echo(f"total {res.total:+.6g}")


COMMANDS = (top, export, self_influence_cmd, attribute)
