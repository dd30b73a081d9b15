#!/usr/bin/env bash
# The GPU check (issue 27): one script, at most 8 minutes, that a session lent a GPU runs as it is.
#
#   benchmarks/bench_gpu.sh                 # on the CUDA device: the tests, then the benchmarks
#   benchmarks/bench_gpu.sh --device cpu    # smoke mode: the same steps on the CPU at toy sizes
#
# 1. `pytest -m cuda`: every CUDA path on a small model against the CPU (tests/test_cuda.py; in
#    smoke mode INFLQ_DEVICE_TESTS=cpu runs them with the CPU standing in for the device);
# 2. bench_engine.py on a random GPT-2 of GPT-2 small's shape (12 x 768, vocabulary 50,257,
#    256-token sequences): FLOOR, the EK-FAC fit and scoring 1 and 64 queries, each x FLOOR;
# 3. bench_fit_parts.py at 768 wide (12 layers): capture, covariance and correction sums per batch,
#    each pass x FLOOR, the eigendecompositions on the device;
# 4. bench_memory_real.py at 768 wide (12 layers) at two corpus sizes: phases x FLOOR, peak device
#    memory and peak RSS, and their ratio between the sizes (bounded by a batch: <= 1.1).
# Each step prints its figures against FLOOR and the peak device memory; a summary of the lines
# that carry figures closes the log. Steps have time limits of their own (STEP_LIMITS below), so a
# slow step costs its own figures, not the rest.
#
# Python: $PYTHON, else `python` of an activated virtual environment, else `python3`; it needs
# torch (with CUDA for the device run) and transformers. Where inflq itself is not installed there,
# the script makes it importable from this checkout: the wheels in ./.whl (if any: inflq's
# dependencies that the machine lacks, fetched beforehand by benchmarks/gpu_wheels.sh) are
# installed into a scratch folder, and a generated dist-info declares inflq's plugin entry points
# from pyproject.toml. The log goes to stdout and, where $OUT is set, to $OUT/bench_gpu.log.
set -uo pipefail

DEVICE=cuda
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --device=*) DEVICE="${1#*=}"; shift ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "bench_gpu.sh: unknown argument $1 (use --device cuda|cpu)" >&2; exit 2 ;;
  esac
done
case "$DEVICE" in cuda|cuda:*|cpu) ;; *) echo "bench_gpu.sh: --device must be cuda or cpu, not $DEVICE" >&2; exit 2 ;; esac

REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO" || exit 2
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"; elif [ -n "${VIRTUAL_ENV:-}" ]; then PY="$VIRTUAL_ENV/bin/python"; else PY=python3; fi
LOG="${OUT:+$OUT/bench_gpu.log}"
LOG="${LOG:-$(mktemp -t bench_gpu.XXXXXX.log)}"
STARTED=$(date +%s)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

say() { echo "$*" | tee -a "$LOG"; }
elapsed() { echo $(( $(date +%s) - STARTED )); }

# -- make inflq importable -----------------------------------------------------------------------
if ! "$PY" -c "import inflq, inflq_builtins, sqlite_utils" >/dev/null 2>&1; then
  SITE="$(mktemp -d -t inflq-site.XXXXXX)"
  if compgen -G "$REPO/.whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$REPO"/.whl/*.whl \
      || { say "bench_gpu.sh: could not install the wheels in .whl"; exit 2; }
  fi
  # inflq's built-ins register through the `inflq` entry-point group: declare it from pyproject.toml.
  "$PY" - "$SITE" <<'EOF' || { echo "bench_gpu.sh: could not declare inflq's entry points" >&2; exit 2; }
import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

meta = tomllib.loads(Path("pyproject.toml").read_text())["project"]
info = Path(sys.argv[1]) / f"inflq-{meta['version']}.dist-info"
info.mkdir(parents=True, exist_ok=True)
(info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: inflq\nVersion: {meta['version']}\n")
groups = {"console_scripts": meta.get("scripts", {}), **meta.get("entry-points", {})}
(info / "entry_points.txt").write_text("".join(f"[{g}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) + "\n" for g, eps in groups.items()))
EOF
  export PYTHONPATH="$REPO:$REPO/plugins:$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PY" -c "import inflq, inflq_builtins, torch, transformers, sqlite_utils" 2>>"$LOG"; then
  say "bench_gpu.sh: $PY cannot import inflq and its dependencies (see $LOG); fetch the missing ones into .whl with benchmarks/gpu_wheels.sh"
  exit 2
fi
if [ "${DEVICE%%:*}" = cuda ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  say "bench_gpu.sh: no CUDA device visible to $PY (torch $("$PY" -c 'import torch; print(torch.__version__)')); --device cpu runs the smoke mode"
  exit 2
fi

say "== bench_gpu.sh --device $DEVICE: $(date -u +%FT%TZ), $("$PY" -c 'import torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__}")'), load average $(cut -d' ' -f1 /proc/loadavg 2>/dev/null)"
if [ "${DEVICE%%:*}" = cuda ]; then
  say "$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || "$PY" -c 'import torch; print(torch.cuda.get_device_name())')"
  # Step limits in seconds, 470 in all (8 minutes with the start): tests, engine, fit parts, memory.
  # Sized without a device to try them on (issue 27): a step stopped at its limit says so below.
  STEP_LIMITS=(150 110 60 150)
  SIZES=(--random-width 768 --random-layers 12 --random-vocab 50257 --random-length 256 --random-sequences 128)
  PARTS=(--widths 768 --layers 12 --tokens 256 --batch-size 8 --repeats 3)
  MEMORY=(--layers 12 --width 768 --tokens 256 --sequences 32 128 --batch-size 8 --floor)
  TESTS_ENV=()
else
  STEP_LIMITS=(900 300 120 300)
  SIZES=(--random-width 64 --random-layers 2 --random-vocab 500 --random-length 32 --random-sequences 48)
  PARTS=(--widths 64 --layers 2 --vocab 500 --tokens 32 --batch-size 8 --repeats 2)
  MEMORY=(--layers 2 --width 64 --vocab 500 --tokens 32 --sequences 16 32 --batch-size 8 --floor)
  TESTS_ENV=(INFLQ_DEVICE_TESTS=cpu)
fi

step() {  # step LIMIT NAME COMMAND...: run with a time limit, log everything, note how it ended
  local limit="$1" name="$2"; shift 2
  say ""
  say "== [$(elapsed) s] $name (limit ${limit} s): $*"
  timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  case "$rc" in
    0) say "-- $name: done at $(elapsed) s" ;;
    124|137) say "-- $name: stopped at its ${limit} s limit ($(elapsed) s in all); its figures above are partial" ;;
    *) say "-- $name: FAILED (exit $rc) at $(elapsed) s" ;;
  esac
  return 0
}

step "${STEP_LIMITS[0]}" "tests: pytest -m cuda" env "${TESTS_ENV[@]}" "$PY" -m pytest -q -p no:cacheprovider -m cuda -rs \
  tests/test_cuda.py tests/test_linalg.py
step "${STEP_LIMITS[1]}" "bench_engine (FLOOR, fit, scoring)" "$PY" benchmarks/bench_engine.py --only random "${SIZES[@]}" \
  --repeats 1 --skip-kronfluence --skip-memory --device "$DEVICE" --threads "$(nproc 2>/dev/null || echo 1)"
step "${STEP_LIMITS[2]}" "bench_fit_parts (per batch and per pass)" "$PY" benchmarks/bench_fit_parts.py "${PARTS[@]}" \
  --device "$DEVICE" --threads "$(nproc 2>/dev/null || echo 1)"
step "${STEP_LIMITS[3]}" "bench_memory_real (peak memory at two sizes)" "$PY" benchmarks/bench_memory_real.py "${MEMORY[@]}" \
  --device "$DEVICE" --threads "$(nproc 2>/dev/null || echo 1)"

say ""
say "== summary ($(elapsed) s in all; full log: $LOG)"
grep -E "passed|failed|skipped|x FLOOR|FLOOR \(|of FLOOR|^\| [0-9]|peak device memory|peak RSS|ratio|== bench_gpu|: done|FAILED|stopped at" "$LOG" \
  | grep -v "^== \[" | tail -n 60
