"""A whole `inflq run`'s fixed costs and phases, timed from the process's start (issue 27).

    python benchmarks/bench_phases.py PROJECT [inflq run options...]       # e.g. --estimator ekfac --refit

Runs the real command (``inflq.cli.main``) in a fresh process whose clock starts when the kernel
started the process (``/proc/self/stat``), with a few functions wrapped to note when they return:
the imports of the CLI and of the run's code, the model's load, the corpus store's opening, each
phase's start (the progress monitor's), the first batch captured, and the end. Prints each mark in
seconds from the process's start with the step from the mark before (its wall, CPU and system
seconds and minor page faults: the last three do not depend much on the machine's load), then the
whole process's. Linux only (``/proc``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

PRELUDE = r"""
import json, os, resource, sys, time
def since_start():
    with open('/proc/self/stat') as f:
        start = int(f.read().rsplit(')', 1)[1].split()[19])
    with open('/proc/uptime') as f:
        up = float(f.read().split()[0])
    return up - start / os.sysconf('SC_CLK_TCK')
T0 = time.perf_counter() - since_start()
marks = []
def mark(what):
    r = resource.getrusage(resource.RUSAGE_SELF)
    marks.append((what, time.perf_counter() - T0, r.ru_utime + r.ru_stime, r.ru_stime, r.ru_minflt))
mark("interpreter up")
import inflq.cli
mark("import inflq.cli")
import inflq.runs
mark("import the run's code (torch, transformers' utilities)")
import inflq.progress as progress, inflq.runtime as runtime, inflq.engine as engine
start = progress.Monitor.start
def phase(self, name, total=None, *a, **k):
    mark(f"phase {name}")
    return start(self, name, total, *a, **k)
progress.Monitor.start = phase
model = runtime.Runtime.model
def loaded(self):
    first = self._model is None
    out = model.fget(self)
    if first:
        mark("model loaded (transformers' model classes imported, weights read)")
    return out
runtime.Runtime.model = property(loaded)
corpus = runtime.Runtime.corpus
def opened(self):
    first = self._store is None
    out = corpus.fget(self)
    if first:
        mark("corpus store open")
    return out
runtime.Runtime.corpus = property(opened)
capture = engine.GradientEngine._capture
seen = [0]
def captured(self, *a, **k):
    out = capture(self, *a, **k)
    seen[0] += 1
    if seen[0] == 1:
        mark("first batch captured")
    return out
engine.GradientEngine._capture = captured
try:
    inflq.cli.main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
else:
    code = 0
mark("end")
print("BENCH_PHASES " + json.dumps(marks), file=sys.stderr)
sys.exit(code)
"""


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        return
    cmd = [sys.executable, "-c", PRELUDE, "run", *sys.argv[1:]]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = "", ""
    import threading

    texts: dict[str, str] = {}
    readers = [threading.Thread(target=lambda k=k, f=f: texts.__setitem__(k, f.read())) for k, f in (("out", p.stdout), ("err", p.stderr))]
    for r in readers:
        r.start()
    _, status, usage = os.wait4(p.pid, 0)
    for r in readers:
        r.join()
    p.returncode = os.waitstatus_to_exitcode(status)
    out, err = texts["out"], texts["err"]
    lines = [x for x in err.splitlines() if x.startswith("BENCH_PHASES ")]
    if p.returncode != 0 or not lines:
        raise SystemExit(f"inflq run failed ({p.returncode}):\n{err[-3000:]}")
    marks = json.loads(lines[-1][len("BENCH_PHASES "):])
    print(f"inflq run {' '.join(sys.argv[1:])}: load average {os.getloadavg()[0]:.2f} at the end")
    print(f"{'from start':>10}  {'step':>7}  {'CPU':>7}  {'system':>7}  {'faults':>8}  mark (the step's wall, CPU and system seconds and minor page faults)")
    before = (0.0, 0.0, 0.0, 0)
    for what, t, cpu, system, faults in marks:
        print(f"{t:9.2f}s  {t - before[0]:6.2f}s  {cpu - before[1]:6.2f}s  {system - before[2]:6.2f}s  {faults - before[3]:8,d}  {what}")
        before = (t, cpu, system, faults)
    wall = marks[-1][1]
    print(f"CPU {usage.ru_utime + usage.ru_stime:.1f} s (system {usage.ru_stime:.1f} s, {usage.ru_stime / wall:.0%} of wall), "
          f"{usage.ru_minflt / 1e6:.2f} M minor page faults, peak RSS {usage.ru_maxrss / 1e6:.2f} GB")
    print(out.strip().splitlines()[-2] if out.strip() else "")


if __name__ == "__main__":
    main()
