#!/usr/bin/env bash
# Fetch, here, the wheels of inflq's dependencies that the lent GPU machines' image lacks
# (/work/.library/device/KINDS.md lists what it has: torch, transformers, scipy, scikit-learn,
# rich, click, pluggy, pytest and more), for its Python (3.12, x86-64 manylinux), into ./.whl,
# which git ignores (.git/info/exclude) and the device tool carries (`carry: [".whl"]`).
# benchmarks/bench_gpu.sh installs them there into a scratch folder. Versions: those of this
# environment where it has them. Ray (a 70 MB wheel) does not fit the 64 MiB a call carries: the
# Ray test of `pytest -m cuda` skips there.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-python3}"
EXCLUDE="$(git rev-parse --git-path info/exclude)"
grep -qx '/.whl/' "$EXCLUDE" 2>/dev/null || echo '/.whl/' >>"$EXCLUDE"
mkdir -p .whl
for name in sqlite-utils sqlite-fts4 click-default-group textual mdit-py-plugins platformdirs plotext tomli-w; do
  version="$("$PY" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$name${version:+==$version}"
done
ls -l .whl
du -sh .whl
