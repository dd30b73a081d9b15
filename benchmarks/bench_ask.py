"""`inflq ask` against a full exact run (issue 24, part 4): recall, exactness and time.

    python benchmarks/bench_ask.py PROJECT -i INVESTIGATION [--timed 3] [--tui] [--fit-sequences N] \
        [--exact scores.npy] [--json ask.json]

Works on a copy of PROJECT (under ``--work``, default a temporary folder) that keeps its catalog,
factors and result sets but none of its gradient indexes, then, all in one run:

* builds the index at the defaults, ``inflq index build COPY`` (a whole process, timed;
  ``--reuse-index`` keeps the project's index built at the default settings, which the build
  then reuses, when that time was measured before);
* **recall and exactness**, every query of the investigation (``--queries`` caps them): the
  question asked through :class:`inflq.ask.Asker` at the defaults (what ``inflq ask`` runs) against
  the exact answer, a full-rank EK-FAC run over every sequence (the investigation's latest
  ``ekfac``/``all`` result set at full rank, or ``--exact`` [queries, sequences] scores): the share
  of the full run's top 10 in ask's top 10 (median, mean, min over queries), and the largest
  difference between ask's scores and the full run's for the same sequences, relative to the
  query's largest score (goal <= 1e-3);
* **time, whole processes at default settings**: ``inflq ask COPY PROMPT COMPLETION`` for the first
  ``--timed`` queries, and ``inflq run COPY -i <one of them> --estimator ekfac`` with the cached
  factors (an investigation holding that one question); the ratio of the medians (goals: <= 0.5 at
  3,000 sequences, <= 0.1 at 20,000);
* ``--tui``: the terminal UI driven by Textual's Pilot, each timed question pasted into the Query
  tab: the seconds from the last keystroke until the list shows the exact top 10 of the index's
  candidates (goal: 3 s on the demo, CPU).

The load average is printed beside every time: on a shared machine only the ratios measured in
the same run mean much.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def load() -> str:
    return "load average " + ", ".join(f"{x:.1f}" for x in os.getloadavg())


def cpu_children() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def cpu_self() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def inflq_cmd(*args, env=None) -> tuple[float, float, str]:
    """Run ``inflq ARGS`` as its own process: ``(wall seconds, CPU seconds (user + system, all
    threads), stdout)``, failing loudly. On a machine others load, CPU time is the steadier figure."""
    exe = shutil.which("inflq") or str(Path(sys.executable).with_name("inflq"))
    c, t = cpu_children(), time.perf_counter()
    r = subprocess.run([exe, *map(str, args)], capture_output=True, text=True, env={**os.environ, "INFLQ_PROGRESS": "0", **(env or {})})
    s, cpu = time.perf_counter() - t, cpu_children() - c
    if r.returncode != 0:
        raise SystemExit(f"inflq {' '.join(map(str, args))} failed ({r.returncode}): {r.stderr.strip()}")
    return s, cpu, r.stdout


def copy_without_indexes(src: Path, dst: Path, keep_default: bool = False) -> Path:
    """A copy of the project folder with its catalog, factors and results but no gradient index
    (``keep_default``: but the one built at the default settings, if there is one)."""
    import inflq
    from inflq.catalog import files as catalog_files
    from inflq.index import IndexSettings
    from inflq_builtins import gradient_index

    if dst.exists():
        shutil.rmtree(dst)
    skip = ("budget-cache", "catalog.db*") if keep_default else ("index", "budget-cache", "catalog.db*")
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*skip))
    p = inflq.open_project(src)  # the catalog with what its write-ahead log holds, consistently
    catalog_files.snapshot(p.db, dst / "catalog.db")
    p.close()
    cfg = (dst / "inflq.toml").read_text()
    for key in ("model", "corpus"):  # relative paths outside the folder follow the copy
        import tomllib

        path = tomllib.loads(cfg)[key]["path"]
        if not Path(path).is_absolute() and not (dst / path).exists():
            cfg = cfg.replace(f'path = "{path}"', f'path = "{(src / path).resolve()}"')
    (dst / "inflq.toml").write_text(cfg)
    p = inflq.open_project(dst)
    default = json.loads(IndexSettings().to_json())
    for row in gradient_index.recorded_indexes(p):
        if not (keep_default and row["status"] == "complete" and json.loads(row["settings"]) == default):
            gradient_index.remove(p, row["key"])
    p.close()
    return dst


def exact_matrix(project, investigation: str, exact_file: str | None) -> np.ndarray:
    from inflq import catalog
    from inflq.reading import score_matrix

    if exact_file:
        return np.load(exact_file).astype(np.float64)
    inv = catalog.investigation(project.db, investigation)
    for rs in reversed(catalog.result_sets_scored_with(project.db, inv["id"], "ekfac", "all")):
        if json.loads(rs["settings"]).get("rank") is None:
            return score_matrix(project, investigation, rs["id"]).astype(np.float64)
    raise SystemExit(f"no full-rank ekfac run of {investigation!r} over every sequence: run `inflq run PROJECT -i {investigation} --estimator ekfac --rank full` "
                     "(benchmarks/bench_budget.py does) or give --exact")


def tui_times(root: Path, questions: list[dict]) -> list[tuple[float, float]]:
    """``(wall seconds, CPU seconds of this process)`` from the last keystroke (the completion
    pasted) to the exact top 10 in the TUI."""
    import asyncio

    from inflq.tui.app import InflqApp
    from inflq.tui.panes.query_pane import QueryPane

    done_at: dict[tuple[str, str], tuple[float, float]] = {}
    real = QueryPane._show_live

    def show(self, state):
        real(self, state)
        if state.done() and state.about not in done_at:
            done_at[state.about] = (time.perf_counter(), cpu_self())

    QueryPane._show_live = show
    out = []

    async def go():
        app = InflqApp(str(root))
        async with app.run_test(size=(140, 60)) as pilot:
            for _ in range(600):
                await pilot.pause(0.1)
                if not any(w.is_running for w in app.workers):
                    break
            await pilot.press("2")
            await pilot.pause(0.5)
            for q in [questions[0], *questions]:  # the first loads the model, the index and the factors: not timed
                app.screen.query_one("#prompt").value = q["prompt"]
                await pilot.pause(0.05)
                typed, cpu = time.perf_counter(), cpu_self()
                app.screen.query_one("#completion").value = q["completion"]
                key = (q["prompt"], q["completion"])
                while key not in done_at and time.perf_counter() - typed < 600:
                    await pilot.pause(0.02)
                at, at_cpu = done_at.get(key, (float("nan"), float("nan")))
                out.append((at - typed, at_cpu - cpu))
                done_at.pop(key, None)
                app.screen.query_one("#completion").value = ""
                await pilot.pause(0.5)

    try:
        asyncio.run(go())
    finally:
        QueryPane._show_live = real
    return out[1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("project")
    ap.add_argument("-i", "--investigation", default="default")
    ap.add_argument("--queries", type=int, default=None, help="at most this many of the investigation's queries for recall (default: all)")
    ap.add_argument("--timed", type=int, default=3, help="questions timed as whole processes (and in the TUI)")
    ap.add_argument("--runs", type=int, default=1, help="whole `inflq run` processes timed (the median is used)")
    ap.add_argument("--fit-sequences", type=int, default=None, help="the factors' fitting sample, as cached (passed to run and ask alike)")
    ap.add_argument("--exact", default=None, help="the full exact run's scores [queries, sequences] (.npy) instead of a result set")
    ap.add_argument("--tui", action="store_true", help="also time the TUI's converging live query")
    ap.add_argument("--work", default=None, help="where the copy goes (default: a temporary folder)")
    ap.add_argument("--reuse-index", action="store_true", help="keep the project's index built at the default settings (the build then reuses it: its time is not measured)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import inflq
    from inflq import catalog
    from inflq.ask import Asker, default_depth, query_dict

    src = Path(args.project).resolve()
    root = copy_without_indexes(src, Path(args.work or tempfile.mkdtemp(prefix="bench-ask-")) / src.name, args.reuse_index)
    out: dict = {"project": str(src), "copy": str(root)}
    fit = ["--fit-sequences", args.fit_sequences] if args.fit_sequences else []
    print(f"== inflq ask: {src} (copy {root}); {load()}", flush=True)
    s, cpu, text = inflq_cmd("index", "build", root, *fit)
    out["index_build_seconds"], out["index_build_cpu"] = s, cpu
    print(f"inflq index build (defaults): {s:.1f} s ({cpu:.1f} s CPU), {text.strip()}; {load()}", flush=True)

    project = inflq.open_project(root)
    queries = catalog.queries(project.db, args.investigation)[: args.queries or None]
    exact = exact_matrix(project, args.investigation, args.exact)[: len(queries)]
    n = exact.shape[1]
    asker = Asker(project, fit_sequences=args.fit_sequences)
    if not asker.factors_cached():
        raise SystemExit("the exact estimator's factors are not cached in the project: fit them first (inflq factors fit, with the same --fit-sequences)")
    recalls, errors, secs = [], [], []
    for q, row in zip(queries, exact, strict=True):
        t = time.perf_counter()
        answer = asker.ask(query_dict(q["prompt"], q["completion"], bool(q["chat"])))
        secs.append(time.perf_counter() - t)
        order = answer.order()[:10]
        mine = answer.indices[order]
        top = np.argsort(-row, kind="stable")[:10]
        recalls.append(len(set(mine.tolist()) & set(top.tolist())) / 10)
        errors.append(float(np.max(np.abs(answer.scores[order] - row[mine])) / np.max(np.abs(row))))
    r = np.array(recalls)
    out.update(depth=default_depth(n), sequences=n, queries=len(queries), recall={"median": float(np.median(r)), "mean": float(r.mean()), "min": float(r.min()), "per_query": recalls},
               max_relative_error=max(errors), in_process_seconds={"median": statistics.median(secs), "max": max(secs)})
    print(f"recall of the full run's top 10 in ask's top 10 ({len(queries)} queries, depth {default_depth(n):,} of {n:,}): median {np.median(r):.2f}, "
          f"mean {r.mean():.3f}, min {r.min():.1f} (goal: median >= 0.9); exactness: largest |ask - run| / max|run| {max(errors):.1e} (goal <= 1e-3); "
          f"in process {statistics.median(secs):.2f} s per question (median); {load()}", flush=True)

    timed = queries[: args.timed]
    ask_s, ask_cpu = [], []
    for q in timed:
        s, cpu, _ = inflq_cmd("ask", root, q["prompt"], q["completion"], *fit)
        ask_s.append(s)
        ask_cpu.append(cpu)
        print(f"  inflq ask {q['prompt']!r} {q['completion']!r}: {s:.1f} s ({cpu:.1f} s CPU); {load()}", flush=True)
    inv = "bench-ask-one"
    if not any(i["name"] == inv for i in catalog.investigations(project.db)):
        catalog.create_investigation(project.db, inv, "one question, for timing inflq run against inflq ask")
        from inflq.queries import add_query

        add_query(project, inv, timed[0]["prompt"], timed[0]["completion"], chat=bool(timed[0]["chat"]))
    project.close()
    run_s, run_cpu = [], []
    for _ in range(args.runs):
        s, cpu, _ = inflq_cmd("run", root, "-i", inv, "--estimator", "ekfac", *fit)
        run_s.append(s)
        run_cpu.append(cpu)
        print(f"  inflq run -i {inv} --estimator ekfac (cached factors, one query): {s:.1f} s ({cpu:.1f} s CPU); {load()}", flush=True)
    ratio = statistics.median(ask_s) / statistics.median(run_s)
    ratio_cpu = statistics.median(ask_cpu) / statistics.median(run_cpu)
    out.update(ask_seconds=ask_s, ask_cpu=ask_cpu, run_seconds=run_s, run_cpu=run_cpu, ratio=ratio, ratio_cpu=ratio_cpu)
    print(f"whole processes: inflq ask median {statistics.median(ask_s):.1f} s ({statistics.median(ask_cpu):.1f} s CPU), inflq run "
          f"{statistics.median(run_s):.1f} s ({statistics.median(run_cpu):.1f} s CPU): ratio {ratio:.3f} wall, {ratio_cpu:.3f} CPU", flush=True)
    if args.tui:
        t = tui_times(root, [dict(q) for q in timed])
        out["tui_seconds"], out["tui_cpu"] = [w for w, _ in t], [c for _, c in t]
        print(f"TUI: exact top 10 {', '.join(f'{w:.2f} s ({c:.2f} s CPU)' for w, c in t)} after the last keystroke "
              f"(median {statistics.median(w for w, _ in t):.2f} s; goal <= 3 s); {load()}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=float))


if __name__ == "__main__":
    main()
