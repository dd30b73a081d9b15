"""Write a result set to CSV, JSONL or a Markdown report (the CLI's ``inflq export`` and the TUI
both call these). Scores follow the method's sign convention: positive means the sequence makes
the completion more likely."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from . import catalog
from .display import score_format
from .errors import InflqError
from .project import Project

SIGN_NOTE = "Sign convention: a positive score means the training sequence makes the completion more likely; negative, less likely."
FIELDS = ("result_set_id", "query_id", "prompt", "completion", "measurement", "alternative", "side", "rank", "seq_id", "seq_idx", "source", "score", "text")


def _rows(project: Project, investigation: str, result_set_id: int | None) -> tuple[dict, list[dict]]:
    from .reading import result_set

    rs = result_set(project, investigation, result_set_id)
    return rs, catalog.export_rows(project.db, rs["id"])


def _target(path: Path | str) -> Path:
    path = Path(path)
    if path.is_dir():
        raise InflqError(f"{path} is a folder; give a file name to export to")
    if not path.parent.exists():
        raise InflqError(f"the folder {path.parent} does not exist; create it first")
    return path


def export_csv(project: Project, investigation: str, result_set_id: int | None, path: Path | str) -> Path:
    """One row per stored (query, side, rank): the top and bottom sequences with their scores."""
    path = _target(path)
    _, rows = _rows(project, investigation, result_set_id)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    return path


def export_jsonl(project: Project, investigation: str, result_set_id: int | None, path: Path | str) -> Path:
    """Like the CSV, one JSON object a line, with the per-layer and per-module scores."""
    path = _target(path)
    _, rows = _rows(project, investigation, result_set_id)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            out = {k: r.get(k) for k in FIELDS}
            out["layer_scores"] = json.loads(r["layer_scores"] or "{}")
            out["module_scores"] = json.loads(r["module_scores"] or "{}")
            f.write(json.dumps(out) + "\n")
    return path


def ccdf_legend(values: np.ndarray) -> str:
    """What :func:`ccdf_plot`'s markers mean, with each tail's count, for a line beside the plot
    (plotext draws a legend inside the plot, over the points at its top left)."""
    v = np.asarray(values, dtype=np.float64)
    return f"• positive tail ({int((v > 0).sum())} scores), x negative tail ({int((v < 0).sum())})"


def ccdf_plot(values: np.ndarray, width: int = 72, height: int = 18, color: bool = False) -> str:
    """The complementary CDF of the positive and negative tails on log-log axes, as text
    (plotext; ANSI colours when ``color``). Positive tail ``•``, negative tail ``x``; no legend
    inside the plot, where it would cover the largest scores: :func:`ccdf_legend` says it beside."""
    from .plots import figure
    from .stats import ccdf

    with figure(max(20, width), max(8, height), color) as f:
        plotted = False
        for sign, marker in ((1, "dot"), (-1, "x")):
            x, y = ccdf(sign * np.asarray(values, dtype=np.float64))
            if len(x):
                f.draw(f.signal(x.tolist(), y.tolist(), marker=marker))
                plotted = True
        if not plotted:
            return "(no non-zero scores to plot)"
        f.ruler("x").scale("log")
        f.ruler("y").scale("log")
        f.label("|score|", "x")
        f.label("P(|s| >= x)", "y")
        return f.build().string(colorless=not color)


def _md_cell(text: str, n: int = 80) -> str:
    text = " ".join(str(text).split())
    text = text if len(text) <= n else text[: n - 1] + "…"
    return text.replace("|", "\\|")


def export_markdown(project: Project, investigation: str, result_set_id: int | None, path: Path | str, k: int = 10) -> Path:
    """A report: settings, per query the top and bottom ``k`` sequences, the tail plot and fit."""
    from .reading import query_scores
    from .stats import powerlaw_tail

    path = _target(path)
    rs, rows = _rows(project, investigation, result_set_id)
    settings = json.loads(rs["settings"])
    out = [
        f"# {project.config.name}: {investigation}, result set {rs['id']}",
        "",
        f"- estimator: `{rs['estimator']}` {json.dumps(settings.get('estimator_settings', {}), default=str)}",
        f"- filter: `{rs['filter']}`, candidates: {rs['num_candidates']}",
        f"- query rank: {'full' if settings.get('rank') is None else settings['rank']}, top K: {settings.get('top_k')}, created {rs['created_at']}",
        "",
        f"> {SIGN_NOTE}",
        "",
    ]
    by_query: dict[int, list[dict]] = {}
    for r in rows:
        by_query.setdefault(r["query_id"], []).append(r)
    for qid, qrows in by_query.items():
        q = qrows[0]
        out += [f"## Query {qid}", "", f"**Prompt:** {_md_cell(q['prompt'], 500)}  ", f"**Completion:** {_md_cell(q['completion'], 500)}", ""]
        for side, title in (("top", "Most positive (helps the completion)"), ("bottom", "Most negative (hurts the completion)")):
            out += [f"### {title}", "", "| rank | score | id | source | text |", "|---:|---:|---|---|---|"]
            picked = [r for r in qrows if r["side"] == side][:k]
            fmt = score_format(r["score"] for r in picked)
            for r in picked:  # ids whole: they differ at their ends (...-fwd-00, ...-fwd-02)
                out.append(f"| {r['rank']} | {fmt(r['score'])} | {_md_cell(r['seq_id'], 1000)} | {_md_cell(r['source'] or '', 20)} | {_md_cell(r['text'])} |")
            out.append("")
        try:
            _, sc = query_scores(project, rs, qid)
            sc = sc[np.isfinite(sc)]
        except InflqError:
            sc = np.zeros(0)
        if len(sc):
            out += ["### Distribution", "", ccdf_legend(sc) + ":", "", "```", ccdf_plot(sc), "```", ""]
            for sign, label in ((1, "positive"), (-1, "negative")):
                fit = powerlaw_tail(sign * sc)
                if fit is None:
                    out.append(f"- {label} tail: too few values to fit a power law")
                else:
                    out.append(f"- {label} tail: alpha = {fit.alpha:.2f} ± {fit.stderr:.2f} over the top {fit.n_tail} (x >= {fit.xmin:.3g}; {fit.method}); CCDF slope {fit.ccdf_slope:.2f}")
            out.append("")
    path.write_text("\n".join(out) + "\n", encoding="utf-8")
    return path
