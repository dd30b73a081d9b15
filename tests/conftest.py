from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from hookcalls import HookCalls  # noqa: E402

from helpers import make_model_dir, write_corpus  # noqa: E402

HOOK_CALLS = HookCalls()


def pytest_configure(config):
    HOOK_CALLS.install()


def pytest_sessionfinish(session, exitstatus):
    """After a whole run of the suite, every hook must have been called by some test through a
    plugin manager (not merely named in a test's text): the meta-test test_hooks.py cannot see
    calls that other files make later, so the check runs here, once every test has run."""
    if exitstatus == 0 and HOOK_CALLS.whole_suite(session):
        missing = HOOK_CALLS.missing()
        if missing:
            session.config.get_terminal_writer().line(f"no test called the hooks: {', '.join(missing)}", red=True)
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("gpt2") / "model", "gpt2")


@pytest.fixture
def corpus_file(tmp_path) -> Path:
    return write_corpus(tmp_path / "corpus.jsonl")


@pytest.fixture(scope="session")
def project_template(tmp_path_factory, gpt2_dir) -> Path:
    """A project initialised once (tokenizing the corpus, fingerprinting the model): each test's
    ``project`` is a copy of it, which is 100x cheaper than ``Project.init``."""
    from inflq.project import Project

    d = tmp_path_factory.mktemp("template")
    Project.init(d / "proj", gpt2_dir, write_corpus(d / "corpus.jsonl")).close()
    return d / "proj"


@pytest.fixture
def project(tmp_path, project_template, corpus_file):
    """A fresh project of the test's own: a copy of the template, pointed at this test's corpus file
    (the same content, so the same fingerprint), which the test may change."""
    import shutil

    from inflq.project import Project, project_relative

    root = tmp_path / "proj"
    shutil.copytree(project_template, root)
    p = Project.open(root)
    p.config.corpus = project_relative(corpus_file, root)
    p.save_config()
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
