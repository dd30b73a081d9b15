"""How close `inflq plan` comes to the run it predicts (issue 17).

    python benchmarks/bench_plan.py [--workloads demo,random128] [--sequences 1000]

For each workload (the same as bench_user.py's: the demo; a random 4x256 GPT-2 on 128-token
sequences), back to back in fresh processes at default settings: ``inflq plan PROJECT --json``,
then ``inflq run PROJECT --estimator ekfac --refit`` with its phases and peak resident memory
(the kernel's high-water mark of the process). Prints predicted / measured per phase: fit time,
scoring time, peak memory. Goal: each within +-30 % (docs/plan.md). Take it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_user import INFLQ, clean_env, init_project, make_workload  # noqa: E402

PARENT = (
    "import json, subprocess, sys, resource\n"
    "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
    "print(json.dumps({'rc': p.returncode, 'out': p.stdout + p.stderr, "
    "'rss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))\n"
)


def measured(cmd: list[str], env: dict) -> tuple[str, int]:
    """Output and peak resident bytes of ``cmd``, run under a parent of its own (whose children's
    ru_maxrss is then that process's peak, not a running maximum over several)."""
    p = subprocess.run([sys.executable, "-c", PARENT, *cmd], capture_output=True, text=True, env=env)
    d = json.loads(p.stdout)
    if d["rc"] != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{d['out'][-2000:]}")
    return d["out"], d["rss"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="demo,random128")
    ap.add_argument("--sequences", type=int, default=1000)
    args = ap.parse_args()
    env = clean_env()
    tmp = Path(tempfile.mkdtemp(prefix="inflq-plan-"))
    print(f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}", flush=True)
    for name in args.workloads.split(","):
        model, corpus, queries, max_length, eos = make_workload(name, tmp, args.sequences)
        root = tmp / f"{name}-project"
        init_project(root, model, corpus, queries, max_length, eos)
        out, rss = measured([*INFLQ, "run", str(root), "--estimator", "ekfac", "--refit"], env)
        m = re.search(r"done in ([\d.]+)s \(factors ([\d.]+)s, candidates [\d.]+s, query gradients ([\d.]+)s, scoring ([\d.]+)s", out)
        if not m:
            raise SystemExit(f"no phases in the run's output:\n{out[-1000:]}")
        fit_s, score_s = float(m.group(2)), float(m.group(4))
        plan_out, _ = measured([*INFLQ, "plan", str(root), "--estimator", "ekfac", "--json"], env)
        plan = json.loads(plan_out[plan_out.index("{"):plan_out.rindex("}") + 1])
        p_fit = sum(p["seconds"] for p in plan["phases"] if p["name"].startswith("fit:"))
        p_score = next(p["seconds"] for p in plan["phases"] if p["name"] == "scoring")
        print(f"\n{name}: {plan['facts']['sequences']} sequences, {plan['facts']['tokens']} tokens; {plan['facts']['batch']}")
        print(f"  fit      predicted {p_fit:7.1f} s  measured {fit_s:7.1f} s  ratio {p_fit / fit_s:.2f}")
        print(f"  scoring  predicted {p_score:7.1f} s  measured {score_s:7.1f} s  ratio {p_score / score_s:.2f}")
        print(f"  peak     predicted {plan['peak_bytes'] / 2**30:7.2f} GB measured {rss / 2**30:7.2f} GB ratio {plan['peak_bytes'] / rss:.2f}", flush=True)


if __name__ == "__main__":
    main()
