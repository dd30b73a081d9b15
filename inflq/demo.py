"""The demo project (``projects/demo``): a small GPT-2 trained by ``projects/demo/train_model.py``
on invented facts stated in both word orders, with a prepared "word-order" investigation."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from . import catalog
from .errors import InflqError
from .layout import CATALOG, CATALOG_SIDE_FILES
from .progress import Monitor
from .project import Project
from .queries import add_queries

INVESTIGATION = "word-order"


def demo_root() -> Path:
    env = os.environ.get("INFLQ_DEMO")
    root = Path(env) if env else Path(__file__).resolve().parent.parent / "projects" / "demo"
    if not (root / "inflq.toml").exists():
        raise InflqError(f"the demo project is not at {root}; it ships with the source repository (git clone, then pip install -e .)")
    return root


def ensure_demo(progress: Callable[[str], None] | None = None) -> Path:
    """Build the demo's catalog and its prepared investigation on first use."""
    root = demo_root()
    if (root / CATALOG).exists():
        return root
    if progress:
        progress(f"preparing the demo project in {root} (first use)…")
    project = Project.create_catalog(root)
    try:
        catalog.create_investigation(project.db, INVESTIGATION, "The paper's word-order finding: facts influence a query only in prompt-then-completion order.")
        queries = [json.loads(line) for line in (root / "queries.jsonl").read_text().splitlines() if line.strip()]
        ids = add_queries(project, INVESTIGATION, queries)
        probes_file = root / "probes.jsonl"
        if probes_file.exists():
            for line in probes_file.read_text().splitlines():
                if line.strip():
                    pr = json.loads(line)
                    catalog.add_probe(project.db, ids[int(pr["query"])], pr["text"], pr.get("label", ""))
    except BaseException:
        project.close()
        for p in (CATALOG, *CATALOG_SIDE_FILES):
            (root / p).unlink(missing_ok=True)
        raise
    project.close()
    return root


def run_demo(root: Path, estimator: str | None = None, monitor: Monitor | None = None) -> int:
    """Run the demo investigation once with ``estimator`` (default: the registry's default) and the
    default run settings (the default filter: every sequence among the built-ins), reusing the
    latest result set made so (e.g. in the UI), and return its id. Result sets with another
    estimator or filter are never returned for it."""
    from .plugins import get_registry
    from .runs import RunSettings, run_investigation

    settings = RunSettings(estimator=estimator).resolve_defaults(get_registry())
    project = Project.open(root)
    try:
        inv = catalog.investigation(project.db, INVESTIGATION)
        existing = catalog.result_sets_scored_with(project.db, inv["id"], settings.estimator, settings.filter)
        if existing:
            return existing[-1]["id"]
        return run_investigation(project, INVESTIGATION, settings, monitor).result_set_id
    finally:
        project.close()
