"""`inflq ask`'s recall for every query of an investigation, from the project's index alone.

    python benchmarks/bench_ask_recall.py PROJECT -i INVESTIGATION [--exact scores.npy] [--key KEY]

``inflq ask`` re-scores the index's top ``default_depth(n)`` sequences exactly and shows their exact
top 10, so the exact top 10's members among the candidates are all in its answer: its recall of
the full exact run's top 10 is the index's recall at that depth. This computes that for every
query from one scan of the index (``--estimator index:key=KEY``'s scores; default the newest
complete index) against the full exact run (``--exact`` [queries, sequences] scores, or the
investigation's latest full-rank ``ekfac`` run over every sequence), where ``bench_ask.py`` asks
each question (minutes each at 20,000 sequences). Its per-query values for the questions
``bench_ask.py`` asked must equal the recall it measured.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    from bench_ask import exact_matrix
    from bench_budget import index_scores, recall_at

    import inflq
    from inflq import catalog
    from inflq.ask import default_depth
    from inflq.progress import Monitor
    from inflq_builtins import gradient_index

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("project")
    ap.add_argument("-i", "--investigation", default="default")
    ap.add_argument("--exact", default=None, help="the full exact run's scores [queries, sequences] (.npy) instead of a result set")
    ap.add_argument("--key", default=None, help="the index (default: the newest complete one)")
    args = ap.parse_args()

    project = inflq.open_project(args.project)
    queries = catalog.queries(project.db, args.investigation)
    exact = exact_matrix(project, args.investigation, args.exact)
    row, _ = gradient_index.find_index(project, args.key)
    got, one_s = index_scores(project, row["key"], queries, Monitor())
    n = exact.shape[1]
    depth = default_depth(n)
    r = np.array([recall_at(a, b, depth) for a, b in zip(got, exact, strict=True)])
    print(f"index {row['key'][:12]}: inflq ask's recall of the full run's top 10, {len(queries)} queries, depth {depth:,} of {n:,}: "
          f"median {np.median(r):.2f}, mean {r.mean():.3f}, min {r.min():.1f} (goal: median >= 0.9); one query's scan {one_s:.2f} s; "
          f"load average {os.getloadavg()[0]:.1f}")
    print("per query:", " ".join(f"{x:.1f}" for x in r))
    project.close()


if __name__ == "__main__":
    main()
