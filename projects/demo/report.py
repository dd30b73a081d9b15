#!/usr/bin/env python3
"""The paper's claims, reproduced on the demo: one command anyone can re-run (issue 13, part 3).

    python projects/demo/report.py [PROJECT] [--out report.md] [--pbrf-sample 8] [--skip-pbrf]

PROJECT defaults to ``projects/demo`` (its catalog is made on first use, as `inflq` does). The
script runs what it needs through inflq's Python API (EK-FAC at rank 32 and at full rank, factors
cached and reused), then writes a Markdown report with:

(a) word order: for each fact query, the mean score of its fact's training sequences phrased in
    the query's order against those phrased the other way round, and how many of each are in the
    top 20 (Grosse et al. 2023, section 5.3); the name-deletion probes' scores;
(b) the power-law tail of each query's influence distribution: the fitted exponent (Hill MLE) with
    its standard error;
(c) layer-wise: the share of each query's top-20 influence by layer, per query kind;
(d) EK-FAC, LiSSA and the gradient dot product against the PBRF, with the 95 % confidence interval
    of each correlation (Fisher's z over the pairs used);
(e) rank-32 query batching against full rank: Spearman over all sequences, top-20 overlap.

The TUI shows the same per result set: the Distribution tab (a), the Layers view of a sequence (c),
the Compare tab (e) and the Validate screen (d).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def open_demo(path: Path):
    """The demo project at ``path`` with its catalog and investigation (made on first use)."""
    import os

    import inflq
    from inflq.demo import INVESTIGATION, ensure_demo

    os.environ["INFLQ_DEMO"] = str(path)
    return inflq.open_project(ensure_demo(print)), INVESTIGATION


def fisher_ci(r: float, n: int) -> tuple[float, float]:
    """The 95 % confidence interval of a correlation ``r`` over ``n`` pairs (Fisher's z)."""
    if not np.isfinite(r) or n <= 3:
        return float("nan"), float("nan")
    z, half = math.atanh(max(-0.999999, min(0.999999, r))), 1.96 / math.sqrt(n - 3)
    return math.tanh(z - half), math.tanh(z + half)


def fact_groups(project) -> dict[str, dict[str, list[int]]]:
    """Fact slug -> {"fwd": corpus indices, "rev": corpus indices}, from the demo's document ids
    (``fact-<slug>-fwd-NN``, ``fact-<slug>-rev-NN``, ``revonly-<slug>-rev-NN``)."""
    from inflq import catalog

    n = len(project.runtime.corpus)
    rows = catalog.sequence_rows(project.db, list(range(n)))
    out: dict[str, dict[str, list[int]]] = defaultdict(lambda: {"fwd": [], "rev": []})
    for idx, row in rows.items():
        m = re.match(r"(?:fact|revonly)-(.+)-(fwd|rev)-\d+", row["doc_id"] or row["seq_id"])
        if m:
            out[m.group(1)][m.group(2)].append(int(idx))
    return dict(out)


def texts(project, indices: list[int]) -> list[str]:
    return [project.runtime.decode(project.runtime.corpus.get(i)) for i in indices]


def word_order(project, queries, matrix, groups, k: int = 20) -> list[dict]:
    rows = []
    for qi, q in enumerate(queries):
        answer = q["completion"].strip()
        slug = next((s for s, g in groups.items() if g["fwd"] + g["rev"] and all(answer in t for t in texts(project, (g["fwd"] + g["rev"])[:3]))), None)
        if slug is None:
            continue
        tags = json.loads(q["tags"] or "[]")
        same, other = ("rev", "fwd") if "reverse-direction" in tags else ("fwd", "rev")
        s = matrix[qi]
        top = set(np.argsort(-np.nan_to_num(s, nan=-np.inf))[:k].tolist())
        g = groups[slug]
        rows.append({
            "query": q["prompt"] + " ->" + q["completion"], "kind": "reversed-only" if "reversed-only" in tags else "reverse-direction" if same == "rev" else "forward",
            "same_order": len(g[same]), "other_order": len(g[other]),
            "mean_same": float(np.nanmean(s[g[same]])) if g[same] else float("nan"),
            "mean_other": float(np.nanmean(s[g[other]])) if g[other] else float("nan"),
            "top_same": len(top & set(g[same])), "top_other": len(top & set(g[other])),
        })
    return rows


def layer_shares(project, rs_id: int, queries, k: int = 20) -> dict[str, np.ndarray]:
    """Query kind -> mean share of the top-k's summed positive influence by layer."""
    from inflq.reading import top

    by_kind: dict[str, list[np.ndarray]] = defaultdict(list)
    for q in queries:
        tags = json.loads(q["tags"] or "[]")
        kind = "reversed-only" if "reversed-only" in tags else "reverse-direction" if "reverse-direction" in tags else "forward"
        total = None
        for row in top(project, rs_id, q["id"], "top", k):
            layers = {int(a): float(b) for a, b in json.loads(row["layer_scores"] or "{}").items() if a.lstrip("-").isdigit()}
            v = np.zeros(max(layers) + 1 if layers else 0)
            for layer, val in layers.items():
                v[layer] = val
            total = v if total is None else total + v
        if total is not None and total.sum() != 0:
            by_kind[kind].append(total / np.abs(total).sum())
    return {kind: np.mean(v, axis=0) for kind, v in by_kind.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("project", nargs="?", default=str(HERE))
    ap.add_argument("--out", default="report.md")
    # (d)'s cost is two PBRF solves per sampled sequence (about 44 s each on the demo, 2 idle CPU
    # cores, at these settings); every query is evaluated against each solve for free, so all
    # 9 queries x 8 sequences give 72 pairs.
    ap.add_argument("--pbrf-queries", type=int, default=9)
    ap.add_argument("--pbrf-sample", type=int, default=8)
    ap.add_argument("--pbrf-fit-sequences", type=int, default=64)
    ap.add_argument("--pbrf-steps", type=int, default=100)
    ap.add_argument("--skip-pbrf", action="store_true", help="leave out (d), the slowest part")
    args = ap.parse_args()

    from inflq import catalog
    from inflq.reading import query_scores, result_set, score_matrix
    from inflq.runs import RunSettings, run_investigation
    from inflq.stats import compare_scores, powerlaw_tail

    t0 = time.perf_counter()
    project, inv = open_demo(Path(args.project))
    queries = catalog.queries(project.db, inv)
    if not queries:
        sys.exit(f"the investigation {inv!r} has no queries")
    lines = [f"# The paper's claims on the demo ({len(project.runtime.corpus)} sequences, {len(queries)} queries)", ""]

    # full_rank_mb=0: every module's queries at rank 32 (by default inflq keeps full rank where
    # scoring is cheaper that way, which on this small model is everywhere).
    r32 = run_investigation(project, inv, RunSettings(estimator="ekfac", rank=32, full_rank_mb=0))
    full = run_investigation(project, inv, RunSettings(estimator="ekfac", rank=None))
    matrix = score_matrix(project, inv, full.result_set_id)

    # (a) word order
    groups = fact_groups(project)
    lines += ["## (a) Word order", "",
              "| query | kind | mean score, same order | mean score, other order | in top 20: same / other |", "|---|---|---|---|---|"]
    for r in word_order(project, queries, matrix, groups):
        lines.append(f"| {r['query']} | {r['kind']} | {r['mean_same']:.3g} ({r['same_order']}) | {r['mean_other']:.3g} ({r['other_order']}) | {r['top_same']} / {r['top_other']} |")
    probes = [(q, p) for q in queries[:1] for p in catalog.probes(project.db, q["id"])]
    if probes:
        from inflq.reading import ScoringSession

        session = ScoringSession.for_result_set(project, result_set(project, inv, full.result_set_id))
        lines += ["", "Probes of query 1 (the name-deletion probes: `name-only`, `subject-only`), total scores:", "",
                  "| label | probe | score |", "|---|---|---|"]
        for q, p in probes:
            res = session.attribute(project.runtime.tokenize_sequence(p["text"]), q["id"], "token")
            lines.append(f"| {p['label']} | {p['text']} | {res.total:.3g} |")

    # (b) power-law tails
    lines += ["", "## (b) The influence distribution's tail", "", "| query | alpha (Hill) | tail size | xmin |", "|---|---|---|---|"]
    for q in queries:
        _, row = query_scores(project, result_set(project, inv, full.result_set_id), q["id"])
        fit = powerlaw_tail(row)
        lines.append(f"| {q['prompt']} ->{q['completion']} | " + (f"{fit.alpha:.2f} ± {fit.stderr:.2f} | {fit.n_tail} | {fit.xmin:.3g} |" if fit else "- | - | - |"))

    # (c) layers
    shares = layer_shares(project, full.result_set_id, queries)
    depth = max((len(v) for v in shares.values()), default=0)
    lines += ["", "## (c) Where in depth (share of the top-20's influence by layer)", "",
              "| query kind | " + " | ".join(f"layer {i}" for i in range(depth)) + " |", "|---" * (depth + 1) + "|"]
    for kind, share in shares.items():
        cells = [f"{v:.2f}" for v in share] + [""] * (depth - len(share))
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")

    # (d) against the PBRF
    if not args.skip_pbrf:
        from inflq.validate import validate

        v = validate(project, inv, estimators=["identity", "ekfac", "lissa"], queries=args.pbrf_queries, sample=args.pbrf_sample,
                     fit_sequences=args.pbrf_fit_sequences, pbrf_steps=args.pbrf_steps, epsilon=1e-3, max_minutes=120, save=True)
        pairs = min(args.pbrf_queries, len(queries)) * args.pbrf_sample
        lines += ["", f"## (d) Against the PBRF ({args.pbrf_queries} queries x {args.pbrf_sample} sequences = {pairs} pairs)", "",
                  "| estimator | Pearson | 95 % CI | Spearman | 95 % CI |", "|---|---|---|---|---|"]
        for r in v.rows:
            lo, hi = fisher_ci(r.pearson, pairs)
            slo, shi = fisher_ci(r.spearman, pairs)
            lines.append(f"| {r.estimator} | {r.pearson:.3f} | [{lo:.2f}, {hi:.2f}] | {r.spearman:.3f} | [{slo:.2f}, {shi:.2f}] |")

    # (e) rank 32 against full rank
    lines += ["", "## (e) Rank-32 query batching against full rank", "", "| query | Spearman | top-20 overlap |", "|---|---|---|"]
    a, b = result_set(project, inv, r32.result_set_id), result_set(project, inv, full.result_set_id)
    for q in queries:
        c = compare_scores(*query_scores(project, a, q["id"]), *query_scores(project, b, q["id"]), k=20)
        lines.append(f"| {q['prompt']} ->{q['completion']} | {c.spearman:.4f} | {c.overlap}/20 |")

    lines += ["", f"Made by `python projects/demo/report.py` in {time.perf_counter() - t0:.0f} s."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
