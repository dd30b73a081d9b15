from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import make_model_dir, write_corpus  # noqa: E402


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("gpt2") / "model", "gpt2")


@pytest.fixture
def corpus_file(tmp_path) -> Path:
    return write_corpus(tmp_path / "corpus.jsonl")


@pytest.fixture
def project(tmp_path, gpt2_dir, corpus_file):
    from inflq.project import Project

    p = Project.init(tmp_path / "proj", gpt2_dir, corpus_file)
    yield p
    p.close()


@pytest.fixture
def cli_run(capsys):
    """Run the real entry point in-process; returns (exit code, stdout, stderr)."""
    from inflq.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        code = 0
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


from inflq.modeling import quiet_transformers  # noqa: E402

quiet_transformers()
