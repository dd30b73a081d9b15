"""projects/demo/report.py's arithmetic: confidence intervals, fact groups and the word-order table."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from inflq import catalog
from inflq.project import Project
from inflq.queries import add_query

REPORT = Path(__file__).resolve().parents[1] / "projects" / "demo" / "report.py"


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("demo_report", REPORT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_fisher_ci(report):
    lo, hi = report.fisher_ci(0.5, 28)
    z, half = math.atanh(0.5), 1.96 / 5.0
    assert (lo, hi) == pytest.approx((math.tanh(z - half), math.tanh(z + half)))
    assert lo == pytest.approx(0.156, abs=1e-3) and hi == pytest.approx(0.736, abs=1e-3)
    assert all(math.isnan(v) for v in report.fisher_ci(0.5, 3))


def test_word_order_counts_same_and_reversed_phrasings(tmp_path, gpt2_dir, report):
    rows = [
        {"id": "fact-ab-fwd-00", "text": "the cat runs"}, {"id": "fact-ab-fwd-01", "text": "a the cat runs"},
        {"id": "fact-ab-rev-00", "text": "runs the cat"}, {"id": "prose-0000", "text": "old red bird"},
        {"id": "revonly-cd-rev-00", "text": "river town dog"},
    ]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    p = Project.init(tmp_path / "p", gpt2_dir, corpus)
    add_query(p, "default", "the cat", " runs", tags=["fact", "forward"])
    add_query(p, "default", "runs the", " cat", tags=["fact", "reverse-direction"])
    add_query(p, "default", "dog town", " river", tags=["reversed-only", "forward"])
    groups = report.fact_groups(p)
    order = {r["seq_id"]: i for i, r in catalog.sequence_rows(p.db, list(range(len(rows)))).items()}
    idx = {r["id"]: order[r["id"] + ":0"] if r["id"] + ":0" in order else order[r["id"]] for r in rows}
    assert sorted(groups["ab"]["fwd"]) == sorted([idx["fact-ab-fwd-00"], idx["fact-ab-fwd-01"]])
    assert groups["ab"]["rev"] == [idx["fact-ab-rev-00"]] and groups["cd"]["rev"] == [idx["revonly-cd-rev-00"]]
    m = np.zeros((3, len(rows)))
    m[0, [idx["fact-ab-fwd-00"], idx["fact-ab-fwd-01"]]] = [4.0, 2.0]
    m[0, idx["fact-ab-rev-00"]] = 1.0
    m[1, idx["fact-ab-rev-00"]] = 5.0
    table = report.word_order(p, catalog.queries(p.db, "default"), m, groups, k=1)
    fwd, rev, only = table
    assert (fwd["kind"], fwd["mean_same"], fwd["mean_other"], fwd["top_same"], fwd["top_other"]) == ("forward", 3.0, 1.0, 1, 0)
    # The reverse-direction query's "same order" is the name-first (rev) phrasing.
    assert (rev["kind"], rev["mean_same"], rev["same_order"], rev["top_same"]) == ("reverse-direction", 5.0, 1, 1)
    assert only["kind"] == "reversed-only" and only["same_order"] == 0 and math.isnan(only["mean_same"])
    p.close()
