"""Benchmark: a 1M-row parquet corpus of instruction rows tokenized with bounded memory.

Target (issue 26): ``inflq init`` on a 1,000,000-row parquet file with peak RSS under 2 GB: the
file is read ``PARQUET_ROWS`` rows at a time (pyarrow), tokenized in batches, written to the
memory-mapped token store (with the response mask) and to the catalog as it goes.

    python benchmarks/bench_parquet.py                 # 1,000,000 rows
    python benchmarks/bench_parquet.py --rows 50000    # a quick run

The rows are ``{"id", "prompt", "completion", "source"}`` built from the demo's vocabulary (so the
demo's word-level tokenizer knows every word), written to parquet in row groups of 10,000 by a
first process. A second, fresh process runs ``Project.init`` on it (the demo model's folder, the
same as ``inflq init``) and reports its own peak RSS (``ru_maxrss``), so the writer's memory is not
counted; the figure includes Python, torch and transformers as imported by ``init``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEMO = HERE.parent / "projects" / "demo"


def write_parquet(path: Path, rows: int, seed: int = 0) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    vocab = json.loads((DEMO / "model" / "tokenizer.json").read_text())["model"]["vocab"]
    words = [w for w in vocab if w.isalpha()]
    rng = random.Random(seed)
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("completion", pa.string()), ("source", pa.string())])
    with pq.ParquetWriter(str(path), schema) as writer:
        for start in range(0, rows, 10_000):
            n = min(10_000, rows - start)
            batch = {
                "id": [f"row-{start + i}" for i in range(n)],
                "prompt": [" ".join(rng.choices(words, k=rng.randint(4, 16))) for _ in range(n)],
                "completion": [" ".join(rng.choices(words, k=rng.randint(2, 12))) + " ." for _ in range(n)],
                "source": ["synthetic"] * n,
            }
            writer.write_table(pa.Table.from_pydict(batch, schema=schema))


def tokenize(parquet: Path, root: Path) -> None:
    """The measured process: ``inflq init`` on the parquet file, then its own figures as JSON."""
    from inflq.project import Project

    started = time.perf_counter()
    project = Project.init(root, DEMO / "model", parquet, append_eos=True, max_length=64)
    seconds = time.perf_counter() - started
    info = project.runtime.corpus.info
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(json.dumps({"seconds": seconds, "peak_rss_bytes": peak, "sequences": info["num_sequences"], "tokens": info["num_tokens"],
                      "trained_tokens": info.get("trained_tokens"), "store_bytes": sum(f.stat().st_size for f in (root / "corpus").iterdir())}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--tokenize", nargs=2, help=argparse.SUPPRESS)  # the measured child process
    args = ap.parse_args()
    if args.tokenize:
        tokenize(Path(args.tokenize[0]), Path(args.tokenize[1]))
        return
    with tempfile.TemporaryDirectory(prefix="inflq-parquet-") as tmp:
        parquet = Path(tmp) / "train.parquet"
        t = time.perf_counter()
        write_parquet(parquet, args.rows)
        print(f"wrote {args.rows:,} instruction rows to parquet ({parquet.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t:.0f} s")
        proc = subprocess.run([sys.executable, __file__, "--tokenize", str(parquet), str(Path(tmp) / "project")],
                              capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"inflq init: {got['sequences']:,} sequences, {got['tokens']:,} tokens ({got['trained_tokens']:,} trained: the responses), "
              f"token store {got['store_bytes'] / 2**20:.0f} MiB, {got['seconds']:.0f} s")
        print(f"peak RSS of the tokenizing process: {got['peak_rss_bytes'] / 2**30:.2f} GB (target < 2 GB); load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
