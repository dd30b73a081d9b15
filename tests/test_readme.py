"""The README's examples run as written on the demo (issue 25): every command of every shell block
of README.md, in order, in a folder holding a copy of projects/ (the demo and demo-lora), through
inflq's real entry point. A command is skipped only when it needs a terminal or the network; the
skips are listed here with their reason, and a README command that neither runs nor matches one
fails the test."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# (pattern a skipped command matches, why it cannot run here)
SKIPS = (
    (r"^pip install\b", "the network: it installs packages from an index"),
    (r"\bpytest\b", "the suite itself (this test is part of it)"),
    (r"^inflq( myproj)?$", "a terminal: it opens the terminal UI"),
    (r"^pip install .* && inflq$", "the network and a terminal: installs, then opens the UI"),
    (r"ray:address=auto", "the network: a running Ray cluster to connect to"),
)


def readme_commands() -> list[str]:
    """Every command of README.md's ```bash blocks, continuation lines joined, comments dropped."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    out = []
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            command = line.split(" #", 1)[0].strip() if not line.lstrip().startswith("#") else ""
            if command:
                out.append(command)
    return out


def skip_reason(command: str) -> str | None:
    return next((why for pattern, why in SKIPS if re.search(pattern, command)), None)


def test_the_readme_commands_are_found_and_each_skip_is_one_of_the_stated_kinds():
    commands = readme_commands()
    assert any(c.startswith("inflq init myproj") for c in commands) and len(commands) >= 20
    skipped = [c for c in commands if skip_reason(c)]
    assert all(c.startswith(("pip ", "inflq")) for c in skipped), skipped
    assert len(skipped) <= 7, skipped


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_every_readme_command_runs_as_written_on_the_demo(tmp_path):
    """Minutes: EK-FAC on the demo's 1,971 sequences, its index, a LoRA fine-tune (over 20 minutes
    under a load average of 20 on 2 cores)."""
    work = tmp_path / "repo"
    ignore = shutil.ignore_patterns("catalog.db*", "corpus", "artifacts", "backups", ".locks", "adapter", "checkpoints", "__pycache__", "exports")
    shutil.copytree(ROOT / "projects", work / "projects", ignore=ignore)
    env = {**os.environ, "INFLQ_PROGRESS": "0", "COLUMNS": "100", "INFLQ_DEMO": str(work / "projects" / "demo")}
    ran, skipped = [], []
    for command in readme_commands():
        why = skip_reason(command)
        if why:
            skipped.append((command, why))
            continue
        args = shlex.split(command)
        if args[0] == "inflq":
            argv = [sys.executable, "-m", "inflq.cli", *args[1:]]
        elif args[0] == "python":
            argv = [sys.executable, *args[1:]]
        else:
            pytest.fail(f"README command {command!r} is neither inflq nor python, and no stated skip covers it")
        started = time.perf_counter()
        got = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=1200)
        assert got.returncode == 0, f"{command}\n{got.stdout[-2000:]}\n{got.stderr[-3000:]}"
        ran.append(f"{time.perf_counter() - started:6.1f} s  {command}")
    print("\nran:", *ran, "\nskipped:", *(f"{c}  ({why})" for c, why in skipped), sep="\n  ")
    assert (work / "scores.npy").exists() and (work / "out.tar.gz").exists()
