"""The TUI driven through Pilot on a tiny project built in the test (nothing downloaded)."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("textual")

from helpers import make_model_dir, write_corpus  # noqa: E402
from inflq import catalog, reading, stats  # noqa: E402
from inflq.plugins import get_registry
from inflq.project import Project  # noqa: E402
from inflq.queries import add_query
from inflq.runs import RunSettings, run_investigation  # noqa: E402

SNAPSHOTS = Path(__file__).parent / "snapshots"
PROMPT, COMPLETION = "the first president of astrobia was", "zorald pfaff"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tui")
    model = make_model_dir(d / "model", "gpt2")
    corpus = write_corpus(d / "corpus.jsonl")
    Project.init(d / "proj", model, corpus).close()
    return d


@pytest.fixture
def project_dir(base, tmp_path) -> Path:
    """A fresh copy of the project per test (the model and corpus are shared, read-only)."""
    import shutil

    dst = tmp_path / "proj"
    shutil.copytree(base / "proj", dst)
    cfg = (dst / "inflq.toml").read_text()
    cfg = cfg.replace('path = "../model"', f'path = "{base / "model"}"').replace('path = "../corpus.jsonl"', f'path = "{base / "corpus.jsonl"}"')
    (dst / "inflq.toml").write_text(cfg)
    return dst


def make_app(path):
    """The app on ``path``; ``app.said`` collects every notification's message (through the public
    ``App.notify``, which a widget's ``notify`` calls too)."""
    from inflq.tui.app import InflqApp

    app = InflqApp(str(path))
    app.said = []
    real = app.notify

    def notify(message, **kwargs):
        app.said.append(str(message))
        return real(message, **kwargs)

    app.notify = notify
    return app


async def settle(pilot) -> None:
    for _ in range(200):
        await pilot.pause()
        await pilot.app.workers.wait_for_complete()
        await pilot.pause()
        if not any(w.is_running for w in pilot.app.workers):
            return
    raise AssertionError("workers did not finish")


def drive(path, size: tuple[int, int], script):
    """Open the app on ``path`` in a terminal of ``size``, let it settle, then run
    ``await script(app, pilot)``; its return value."""

    async def go():
        app = make_app(path)
        async with app.run_test(size=size) as pilot:
            await settle(pilot)
            return await script(app, pilot)

    return asyncio.run(go())


def seed(path, run: str | None = "identity") -> int:
    """The test query in the default investigation and, unless ``run`` is None, a run over it
    with that estimator at rank 4: the query's id."""
    p = Project.open(path)
    qid = add_query(p, "default", PROMPT, COMPLETION)
    if run is not None:
        run_investigation(p, "default", RunSettings(estimator=run, rank=4))
    p.close()
    return qid


async def type_into(pilot, selector: str, text: str) -> None:
    widget = pilot.app.screen.query_one(selector)
    widget.focus()
    widget.value = text
    await pilot.pause()


def pane(app, name):
    return app.screen.query_one(f"#pane-{name}")


def rendered(widget, width: int = 100) -> str:
    """A Static's content as the text a terminal ``width`` columns wide shows."""
    import io

    from rich.console import Console

    console = Console(width=width, record=True, file=io.StringIO())
    console.print(widget.content)
    return console.export_text()


@pytest.mark.slow  # a person's pace through the app: run in CI, left out of the inner loop (-m "not slow")
def test_journey(project_dir, tmp_path):
    from textual.widgets import DataTable, Input, Select, Static

    from inflq.tui.screens.sequence import SequenceScreen

    async def journey():
        app = make_app(project_dir)
        async with app.run_test(size=(100, 40)) as pilot:
            await settle(pilot)
            # Create an investigation from the investigations tab.
            await pilot.press("1")
            app.screen.query_one("#investigations").focus()
            await pilot.press("n")
            await pilot.pause()
            app.screen.query_one("#answer", Input).value = "astrobia"
            await pilot.press("enter")
            await settle(pilot)
            project = app.project
            assert [i["name"] for i in catalog.investigations(project.db)] == ["default", "astrobia"]
            assert app.investigation == "astrobia"
            # Add a query in the query editor.
            await pilot.press("2")
            await settle(pilot)
            await type_into(pilot, "#prompt", PROMPT)
            await type_into(pilot, "#completion", COMPLETION)
            await settle(pilot)
            tokens = str(app.screen.query_one("#tokens", Static).render())
            assert "[zorald]" in tokens and "[pfaff]" in tokens
            await pilot.press("ctrl+s")
            await settle(pilot)
            (q,) = catalog.queries(project.db, "astrobia")
            assert (q["prompt"], q["completion"]) == (PROMPT, COMPLETION)
            from inflq.predictions import completion_logprob

            says = str(app.screen.query_one("#model-says", Static).render())
            assert f"{completion_logprob(project, PROMPT, COMPLETION):.3f}" in says
            assert "greedy continuation" in says
            # Run with the identity estimator.
            await pilot.press("escape", "3")
            await settle(pilot)
            app.screen.query_one("#sel-estimator", Select).value = "identity"
            await settle(pilot)
            app.screen.query_one("#run-rank", Input).value = "4"
            await pilot.press("ctrl+r")
            await settle(pilot)
            run = project.db.execute("SELECT status FROM runs ORDER BY id DESC LIMIT 1").fetchone()
            assert run[0] == "done"
            rs1 = app.result_set_id
            assert rs1 is not None
            assert app.screen.query_one("#phases").children, "no progress bars were shown"
            # Browse results.
            await pilot.press("escape", "4")
            await settle(pilot)
            table = app.screen.query_one("#results", DataTable)
            stored = reading.top(project, rs1, q["id"], "top", 100)
            assert table.row_count == len(stored) > 0
            first = table.get_row_at(0)
            assert first[2] == stored[0]["seq_id"]
            table.focus()
            await pilot.press("b")
            await settle(pilot)
            bottom = reading.top(project, rs1, q["id"], "bottom", 1)[0]
            assert float(str(table.get_row_at(0)[1])) == pytest.approx(bottom["score"], rel=1e-3)
            await pilot.press("t")
            await settle(pilot)
            # Open the top sequence: heat map and tags.
            table.move_cursor(row=0)
            await pilot.press("enter")
            await settle(pilot)
            assert isinstance(app.screen, SequenceScreen)
            heat = app.screen.query_one("#heat", Static).render()
            toks = project.runtime.token_strings(project.runtime.corpus.get(stored[0]["seq_idx"]))
            assert str(heat).startswith(" ".join(toks))
            assert any(span.style for span in heat.spans), "the heat map has no colours"
            assert app.screen.heat_total == pytest.approx(stored[0]["score"], rel=1e-2, abs=1e-3)
            app.screen.query_one("#tag", Input).value = "relevant"
            app.screen.query_one("#note", Input).value = "names the president"
            await pilot.press("ctrl+s")
            await settle(pilot)
            (tag,) = catalog.sequence_tags(project.db, "astrobia", stored[0]["seq_id"])
            assert (tag["tag"], tag["note"]) == ("relevant", "names the president")
            await pilot.press("escape")
            await settle(pilot)
            # Distribution with a power-law fit.
            await pilot.press("5")
            await settle(pilot)
            fit_text = str(app.screen.query_one("#dist-fit", Static).render())
            fit = stats.powerlaw_tail(reading.distribution(project, "astrobia", q["id"], rs1))
            assert f"alpha = {fit.alpha:.2f}" in fit_text
            # A probe, scored at once.
            await pilot.press("6")
            await settle(pilot)
            app.screen.query_one("#probe-estimator", Select).value = "identity"
            await settle(pilot)
            probe = "the first president of the republic of astrobia was zorald pfaff ."
            app.screen.query_one("#probe-text", Input).value = probe
            await pilot.click("#probe-add")
            await settle(pilot)
            (p,) = catalog.probes(project.db, q["id"])
            shown = rendered(app.screen.query_one("#probe-body", Static))
            expected = reading.ScoringSession.for_queries(project, [q["id"]], estimator="identity").score_texts([probe], q["id"])[0].total
            assert f"{expected:+.4g}" in shown
            # A second result set, then compare.
            run_investigation(project, "astrobia", RunSettings(estimator="diagonal", rank=4))
            await pilot.press("escape", "7")
            await settle(pilot)
            await pilot.click("#cmp-go")
            await settle(pilot)
            rs_ids = [r["id"] for r in reading.result_sets(project, "astrobia")]
            cmp = stats.compare_result_sets(project, "astrobia", rs_ids[0], rs_ids[1], q["id"], 10)
            out = str(app.screen.query_one("#cmp-out", Static).render())
            assert f"Spearman rank correlation: {cmp.spearman:.3f}" in out
            assert f"top-10 overlap: {cmp.overlap}/10" in out
            # Export.
            app.set_context(result_set_id=rs1)
            await pilot.press("4")
            await settle(pilot)
            app.screen.query_one("#results").focus()
            await pilot.press("e")
            await pilot.pause()
            app.screen.query_one("#answer", Input).value = str(tmp_path / "out")
            await pilot.press("enter")
            await settle(pilot)
        return project

    asyncio.run(journey())
    files = sorted((tmp_path / "out").iterdir())
    assert [f.suffix for f in files] == [".csv", ".jsonl", ".md"]
    project = Project.open(project_dir)
    rs1 = reading.result_sets(project, "astrobia")[0]["id"]
    n = project.db["results"].count_where("result_set_id = ?", [rs1])
    with open(files[0]) as f:
        assert len(list(csv.DictReader(f))) == n
    assert len(files[1].read_text().splitlines()) == n
    first = json.loads(files[1].read_text().splitlines()[0])
    assert set(first["layer_scores"]) == {"0", "1"}
    assert "Sign convention" in files[2].read_text()


def test_run_failure_shows_a_modal(project_dir):
    from textual.widgets import Select, Static

    from inflq.tui.screens.modals import ErrorScreen

    seed(project_dir, run=None)

    async def go(app, pilot):
        await pilot.press("3")
        await settle(pilot)
        app.screen.query_one("#sel-estimator", Select).value = "identity"
        app.screen.query_one("#sel-filter", Select).value = "metadata"
        await settle(pilot)
        await pilot.press("ctrl+r")
        await settle(pilot)
        assert isinstance(app.screen, ErrorScreen)
        assert "metadata filter: give a value" in str(app.screen.query_one("#error-message", Static).render())
        await pilot.press("escape")
        await settle(pilot)
        # Still usable: the failed run is listed and the other tabs work.
        assert not isinstance(app.screen, ErrorScreen)
        assert app.project.db.execute("SELECT status FROM runs").fetchone()[0] == "failed"
        await pilot.press("1")
        await settle(pilot)
        assert app.screen.query_one("#investigations").row_count == 1

    drive(project_dir, (100, 40), go)


def test_a_full_rank_estimator_takes_the_rank_field(project_dir):
    """An estimator whose queries are never compressed (tests/trak_lite.py) runs at full rank: the
    run form shows no rank for it, and gives the default back for one that compresses."""
    import trak_lite
    from textual.widgets import Input, Select

    from inflq.testing import using_plugin

    seed(project_dir, run=None)

    async def go(app, pilot):
        await pilot.press("3")
        await settle(pilot)
        rank = app.screen.query_one("#run-rank", Input)
        assert rank.value == "32" and not rank.disabled
        app.screen.query_one("#sel-estimator", Select).value = "trak-lite"
        await settle(pilot)
        assert rank.disabled and rank.value == "full" and "never compressed" in str(rank.tooltip)
        assert app.screen.query_one("RunPane").settings().rank is None
        app.screen.query_one("#sel-estimator", Select).value = "identity"
        await settle(pilot)
        assert rank.value == "32" and not rank.disabled

    with using_plugin(trak_lite):
        drive(project_dir, (100, 40), go)


@pytest.mark.parametrize("where", ["missing", "not-a-project"])
def test_bad_project_folder_is_a_message(tmp_path, where):
    from textual.widgets import Static

    from inflq.tui.screens.modals import ErrorScreen

    path = tmp_path / "nope"
    if where == "not-a-project":
        path.mkdir()

    async def go(app, pilot):
        assert isinstance(app.screen, ErrorScreen)
        text = str(app.screen.query_one("#error-message", Static).render())
        assert ("does not exist" in text) if where == "missing" else ("not an inflq project" in text)
        await pilot.press("escape", "2", "?")
        await settle(pilot)
        await pilot.press("escape")

    drive(path, (80, 24), go)


def test_locked_catalog_is_a_message(project_dir, monkeypatch):
    import sqlite3

    from textual.widgets import Static

    from inflq import catalog
    from inflq.tui.screens.modals import ErrorScreen

    holder = sqlite3.connect(project_dir / "catalog.db")
    holder.execute("PRAGMA journal_mode = DELETE")
    holder.execute("BEGIN EXCLUSIVE")
    real = sqlite3.connect

    class Impatient(sqlite3.Connection):  # don't wait the catalog's 10 s for the lock
        def execute(self, sql, *args):
            return super().execute(sql.replace("busy_timeout = 10000", "busy_timeout = 50"), *args)

    def quick(*args, **kwargs):
        kwargs["timeout"] = 0.05
        return real(*args, factory=Impatient, **kwargs)

    monkeypatch.setattr(catalog.schema.sqlite3, "connect", quick)

    async def go(app, pilot):
        assert isinstance(app.screen, ErrorScreen)
        text = str(app.screen.query_one("#error-message", Static).render())
        assert "locked" in text

    try:
        drive(project_dir, (80, 24), go)
    finally:
        holder.rollback()
        holder.close()


def test_changed_model_is_a_message(project_dir, base):
    from textual.widgets import Static

    from inflq.tui.screens.modals import ErrorScreen

    other = make_model_dir(project_dir.parent / "other-model", "gpt2", seed=1)
    cfg = (project_dir / "inflq.toml").read_text().replace(str(base / "model"), str(other))
    (project_dir / "inflq.toml").write_text(cfg)

    async def go(app, pilot):
        assert isinstance(app.screen, ErrorScreen)
        assert "differs from the one this project was made with" in str(app.screen.query_one("#error-message", Static).render())

    drive(project_dir, (80, 24), go)


LONG_IDS = ["fact-astrobia-president-fwd-02", "fact-sunwheel-clock-inventor-fwd-07", "prose-0027"]


@pytest.fixture
def long_id_project(base, tmp_path) -> Path:
    """A project whose sequence ids are as long as the demo's (the 24-line corpus, renamed)."""
    rows = [json.loads(line) for line in (base / "corpus.jsonl").read_text().splitlines()]
    for i, r in enumerate(rows):
        r["id"] = f"{LONG_IDS[i % 3]}-{i:02d}"
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    Project.init(tmp_path / "proj", base / "model", corpus).close()
    return tmp_path / "proj"


def test_initial_investigation_follows_the_latest_work(long_id_project):
    from inflq.tui.app import initial_investigation

    p = Project.open(long_id_project)
    assert initial_investigation(p) == "default"  # nothing anywhere: the first
    catalog.create_investigation(p.db, "facts")
    add_query(p, "facts", PROMPT, COMPLETION)
    catalog.create_investigation(p.db, "empty")
    assert initial_investigation(p) == "facts"  # the most recent with queries
    run_investigation(p, "facts", RunSettings(estimator="identity", rank=4))
    catalog.create_investigation(p.db, "later")
    add_query(p, "later", "the capital city of astrobia is called", "velmora")
    assert initial_investigation(p) == "facts"  # results outrank a newer query
    p.close()


@pytest.mark.slow  # a person's pace through the app: run in CI, left out of the inner loop (-m "not slow")
def test_results_table_at_80x24(long_id_project):
    """On open: the investigation with results. Tab 4: focus on the table, full ids, the text
    column taking what is left; enter, a click on the highlighted row and a double click open the
    sequence; choosing a query gives the table the focus back."""
    from textual.widgets import DataTable, Select

    from inflq.tui.panes import ResultsPane
    from inflq.tui.screens.sequence import SequenceScreen

    p = Project.open(long_id_project)
    catalog.create_investigation(p.db, "facts")
    q1 = add_query(p, "facts", PROMPT, COMPLETION)
    q2 = add_query(p, "facts", "the capital city of astrobia is called", "velmora")
    rs = run_investigation(p, "facts", RunSettings(estimator="identity", rank=4)).result_set_id
    stored = {q: reading.top(p, rs, q, "top", 100) for q in (q1, q2)}
    p.close()

    async def go(app, pilot):
        assert (app.investigation, app.result_set_id) == ("facts", rs)
        await pilot.press("4")
        await settle(pilot)
        table = app.screen.query_one("#results", DataTable)
        assert app.focused is table
        # Ids are shown whole up to ResultsPane.ID_WIDTH, elided in the middle beyond it.
        ids = [str(table.get_row_at(i)[2]) for i in range(table.row_count)]
        for shown, row in zip(ids, stored[q1]):
            full = row["seq_id"]
            if len(full) <= ResultsPane.ID_WIDTH:
                assert shown == full
            else:
                assert len(shown) == ResultsPane.ID_WIDTH and shown.endswith(full[-5:]) and "…" in shown
        widths = {c.key.value: c.get_render_width(table) for c in table.ordered_columns}
        assert widths["id"] == min(ResultsPane.ID_WIDTH, max(len(i) for i in ids)) + 2
        room = table.size.width - table.styles.scrollbar_size_vertical
        assert room - 4 <= sum(widths.values()) <= room, (widths, room)  # the text column fills the row
        assert widths["text"] >= 20
        # enter opens the highlighted sequence; esc comes back to the focused table.
        await pilot.press("down", "enter")
        await settle(pilot)
        assert isinstance(app.screen, SequenceScreen) and app.screen.row["seq_id"] == stored[q1][1]["seq_id"]
        await pilot.press("escape")
        await settle(pilot)
        assert app.focused is table
        # A click moves the cursor; a click on the highlighted row (another column) opens it.
        await pilot.click(table, offset=(2, 3))  # row 2 (below the header and rows 0, 1), rank column
        await settle(pilot)
        assert table.cursor_row == 2 and not isinstance(app.screen, SequenceScreen)
        await pilot.click(table, offset=(40, 3))  # same row, id column
        await settle(pilot)
        assert isinstance(app.screen, SequenceScreen) and app.screen.row["seq_id"] == stored[q1][2]["seq_id"]
        await pilot.press("escape")
        await settle(pilot)
        await pilot.double_click(table, offset=(60, 1))  # row 0, text column
        await settle(pilot)
        assert isinstance(app.screen, SequenceScreen) and app.screen.row["seq_id"] == stored[q1][0]["seq_id"]
        await pilot.press("escape")
        await settle(pilot)
        # Choosing another query from its select: the table shows it and has the focus again.
        choose = app.screen.query_one("#res-query", Select)
        choose.focus()
        await pilot.pause()
        choose.value = q2
        await settle(pilot)
        assert app.query_id == q2 and app.focused is table
        assert [str(table.get_row_at(i)[0]) for i in range(table.row_count)] == [str(r["rank"]) for r in stored[q2]]
        # / searches, enter goes back to the table; esc in the table leaves it for the pane, whose
        # keys (t, b, n, p, e, /) and the tab digits keep working.
        await pilot.press("slash")
        await pilot.press(*"fwd-07")
        await pilot.press("enter")
        await settle(pilot)
        assert app.focused is table and table.row_count == sum("fwd-07" in r["seq_id"] for r in stored[q2])
        await pilot.press("escape")
        assert app.focused is pane(app, "results") and {"t", "b", "e"} <= set(app.screen.active_bindings)

    drive(long_id_project, (80, 24), go)


def test_cancel_and_resume_a_run(project_dir, monkeypatch):
    """A run with a small shard size, started and cancelled with ctrl+r and ctrl+b after esc has
    left the form (the tab's keys keep working), cancelled once its scoring progress shows, then
    resumed with ctrl+y: the cancelled run, not the older complete run under the cursor; it
    continues from its first uncommitted shard and completes with a result set."""
    from textual.widgets import DataTable, ProgressBar, Select, TabbedContent

    from inflq import runs
    from inflq.passes import ScorePass

    p = Project.open(project_dir)
    qid = add_query(p, "default", PROMPT, COMPLETION)
    old_run = run_investigation(p, "default", RunSettings(estimator="identity", rank=4)).run_id  # complete
    n_seqs = len(p.runtime.corpus)
    p.close()
    shard_size = 4
    scored: list[int] = []
    real_run = runs.LocalWorker.run
    release = threading.Event()

    def run(self, pass_, shard, batch_size, monitor, **kwargs):
        if isinstance(pass_, ScorePass) and not pass_.per_module:  # scoring, not the layer breakdown
            scored.append(shard.index)
            if scored == [0, 1, 2] and monitor is not None:
                # The tiny run would finish before a key press lands: hold the third shard until
                # the user has cancelled (the cancel is then seen at the end of its first batch).
                assert monitor.cancel_event.wait(30), "the cancel never reached the run"
            if scored == [0, 1, 2, 2]:  # the resumed run: held until the test has seen its status
                assert release.wait(30), "the test never released the resumed run"
        return real_run(self, pass_, shard, batch_size, monitor, **kwargs)

    monkeypatch.setattr(runs.LocalWorker, "run", run)

    def run_row():
        return app.project.db.execute("SELECT id, status FROM runs ORDER BY id DESC LIMIT 1").fetchone()

    async def go():
        nonlocal app
        app = make_app(project_dir)
        async with app.run_test(size=(100, 40)) as pilot:
            await settle(pilot)
            await pilot.press("3")
            await settle(pilot)
            app.screen.query_one("#sel-estimator", Select).value = "identity"
            await settle(pilot)
            await type_into(pilot, "#run-rank", "4")
            await type_into(pilot, "#run-shard_size", str(shard_size))
            rp = pane(app, "run")
            await pilot.press("escape")  # leave the field, as the help says: the tab's keys stay
            assert app.focused is rp and {"ctrl+r", "ctrl+b", "ctrl+y"} <= set(app.screen.active_bindings)
            await pilot.press("ctrl+r")
            for _ in range(1000):  # the scoring bar shows the two shards done before the held one
                await pilot.pause(0.02)
                bar = rp.phases.bars.get("scoring", (None, None))[1]
                if isinstance(bar, ProgressBar) and bar.progress == 2 * shard_size:
                    break
            else:
                raise AssertionError(f"the scoring progress was not shown: {rp.phases.bars}")
            await pilot.press("ctrl+b")
            await settle(pilot)
            run_id, status = run_row()
            assert status == "cancelled" and run_id != old_run
            committed = app.project.db["run_shards"].count_where("run_id = ?", [run_id])
            assert committed == 2 and len(reading.result_sets(app.project, "default")) == 1
            runs_table = app.screen.query_one("#runs", DataTable)
            assert runs_table.get_row_at(0)[:2] == [str(run_id), "cancelled"]
            # The cursor is on the cancelled run (the run that started, then stopped).
            assert runs_table.coordinate_to_cell_key((runs_table.cursor_row, 0)).row_key.value == str(run_id)
            # The stopped bar keeps its count, loses its ETA; the notice says what was committed.
            label = str(rp.phases.bars["scoring"][0].render())
            assert "ETA" not in label and "stopped" in label, label
            said = " ".join(app.said)
            assert f"run {run_id}; committed: {2 * shard_size} scored sequences in 2 shards" in said and "ctrl+y resumes it" in said, said
            # Even with the old complete run under the cursor, ctrl+y resumes the cancelled one.
            runs_table.move_cursor(row=1)
            await pilot.pause()
            assert runs_table.get_row_at(1)[:2] == [str(old_run), "done"]
            await pilot.press("ctrl+y")
            for _ in range(1000):  # while the resumed run works, the table says so
                await pilot.pause(0.02)
                if runs_table.get_row_at(0)[1] == "running":
                    break
            else:
                raise AssertionError(f"the runs table did not follow the resumed run: {runs_table.get_row_at(0)}")
            said = " ".join(app.said)
            assert f"run {old_run} (highlighted) is complete, so the latest unfinished run: resuming run {run_id}; committed:" in said, said
            release.set()
            await settle(pilot)
            assert run_row() == (run_id, "done")
            assert runs_table.get_row_at(0)[:2] == [str(run_id), "done"]
            n_shards = -(-n_seqs // shard_size)
            assert scored == [0, 1, 2] + list(range(2, n_shards)), "the resumed run did not continue from shard 2"
            rs = reading.result_sets(app.project, "default")[-1]
            assert app.result_set_id == rs["id"] and rs["run_id"] == run_id
            assert len(reading.top(app.project, rs["id"], qid, "top", 100)) == 20
            await pilot.press("4")  # and the tab digits work from the pane too
            assert app.screen.query_one("#tabs", TabbedContent).active == "tab-results"

    app = None
    asyncio.run(go())


def test_compare_defaults_to_result_sets_that_have_the_query(project_dir):
    """Compare opens on the two newest result sets that scored the current query (never on one
    that lacks it), marks the others, says plainly when fewer than two have it, and a set chosen
    without the query is named in the pane, not a crash dialog."""
    from textual.widgets import Select, Static

    from inflq.tui.screens.modals import ErrorScreen

    p = Project.open(project_dir)
    q1 = add_query(p, "default", PROMPT, COMPLETION)
    rs1 = run_investigation(p, "default", RunSettings(estimator="identity", rank=4)).result_set_id
    rs2 = run_investigation(p, "default", RunSettings(estimator="diagonal", rank=4)).result_set_id
    q2 = add_query(p, "default", "the capital city of astrobia is called", "velmora")
    rs3 = run_investigation(p, "default", RunSettings(estimator="identity", rank=4)).result_set_id
    p.close()

    async def go(app, pilot):
        out = app.screen.query_one("#cmp-out", Static)
        a, b = app.screen.query_one("#cmp-a", Select), app.screen.query_one("#cmp-b", Select)
        app.set_context(query_id=q2)
        await pilot.press("7")
        await settle(pilot)
        assert f"only result set {rs3} has query {q2}: a comparison needs two" in str(out.render())
        assert b.value == rs3 and a.value != rs2  # rs2 (the set before it) lacks the query
        await pilot.press("ctrl+s")
        await settle(pilot)
        assert not isinstance(app.screen, ErrorScreen)
        a.value = rs2
        await pilot.press("ctrl+s")
        await settle(pilot)
        assert not isinstance(app.screen, ErrorScreen), str(app.screen.query_one("#error-message").render())
        assert f"result set {rs2} did not score query {q2}" in str(out.render())
        labels = {str(o.prompt) for o in a.query_one("OptionList").options}
        assert f"{rs1}: identity / all (no query {q2})" in labels and f"{rs3}: identity / all" in labels, labels
        # Query 1 is in all three: the two newest, compared.
        app.set_context(query_id=q1)
        await settle(pilot)
        assert (a.value, b.value) == (rs2, rs3)
        await pilot.press("ctrl+s")
        await settle(pilot)
        cmp = stats.compare_result_sets(app.project, "default", rs2, rs3, q1, 10)
        assert f"query {q1}: result set {rs2} vs {rs3}" in str(out.render())
        assert f"Spearman rank correlation: {cmp.spearman:.3f}" in str(out.render())
        # A query no run has scored yet.
        q3 = add_query(app.project, "default", "the river of astrobia is", "velmora")
        app.set_context(query_id=q3)
        await settle(pilot)
        assert f"no result set has query {q3} yet: run the investigation (tab 3)" in str(out.render())

    drive(project_dir, (100, 30), go)


def test_factor_sets_screen(project_dir):
    """f opens the factor sets: at 80 columns the table shows what tells the sets apart (only the
    properties that differ) with its size, runs and model columns in view; the highlighted set's
    settings and spectra are shown; d (then y) removes it; esc goes back."""
    from textual.widgets import Static

    from inflq.runs import fit_factors

    p = Project.open(project_dir)
    ids = [fit_factors(p, RunSettings(estimator=e, fit_sequences=n))[1] for e, n in (("ekfac", None), ("ekfac", 8), ("ekfac:fisher=empirical", None))]
    n_seqs = len(p.runtime.corpus)
    p.close()

    async def go(app, pilot):
        await pilot.press("f")
        await settle(pilot)
        pane = app.screen.query_one("#pane-factors")
        table = pane.query_one("#factor-sets")
        assert table.row_count == 3
        apart = [str(table.get_row_at(i)[2]) for i in range(3)]
        assert apart == [f"fisher=true sequences={n_seqs}", "fisher=true sequences=8", f"fisher=empirical sequences={n_seqs}"], apart
        widths = [c.get_render_width(table) for c in table.ordered_columns]
        assert [c.label.plain for c in table.ordered_columns][-1] == "model" and sum(widths) <= table.size.width, widths
        shown = rendered(pane.query_one("#factor-detail", Static), 78)
        assert f"fitted with: ekfac (fisher=empirical), {n_seqs} fitting sequences" in shown, shown
        assert f"factor set {ids[2]}" in shown and "eff. dim" in shown and "under the damping" in shown
        assert all(f"{tm}" in shown for tm in ("0.mlp.c_fc", "1.attn.c_proj"))
        await pilot.press("d")
        await pilot.pause()
        await pilot.press("y")
        await settle(pilot)
        assert table.row_count == 2
        assert [str(table.get_row_at(i)[2]) for i in range(2)] == [f"sequences={n_seqs}", "sequences=8"]
        await pilot.press("escape")
        await pilot.pause()
        assert app.screen.query("#tabs")

    drive(project_dir, (80, 24), go)
    p = Project.open(project_dir)
    assert [r["id"] for r in catalog.factor_sets(p.db)] == ids[:2]
    p.close()


@pytest.mark.slow  # a person's pace through the app: run in CI, left out of the inner loop (-m "not slow")
def test_distribution_from_every_tab_and_at_80x24(long_id_project):
    """5 (and the palette's "Go to distribution") reach the Distribution tab from Results and
    Compare too; at 80x24 the fit lines scroll into view and the plot is redrawn on a resize."""
    from textual.containers import VerticalScroll
    from textual.widgets import Static, TabbedContent

    seed(long_id_project)

    async def go(app, pilot):
        tabs = app.screen.query_one("#tabs", TabbedContent)
        for start in ("4", "7", "6", "1"):
            await pilot.press(start)
            await settle(pilot)
            if start == "6":
                await pilot.press("escape")  # the probe field has the focus: leave it first
            await pilot.press("5")
            await settle(pilot)
            assert tabs.active == "tab-distribution", f"5 from tab {start} stayed on {tabs.active}"
        await pilot.press("4")
        await settle(pilot)
        app.screen.query_one("#pane-distribution")  # the palette's command does the same
        titles = [c.title for c in app.get_system_commands(app.screen)]
        assert len(titles) == len(set(titles)), titles  # one "Keys" (Textual's); inflq's help has its own name
        next(c for c in app.get_system_commands(app.screen) if c.title == "Go to distribution").callback()
        await settle(pilot)
        assert tabs.active == "tab-distribution"
        scroll = app.screen.query_one("#dist-scroll", VerticalScroll)
        assert app.focused is scroll
        title = app.screen.query_one("#dist-title", Static)
        assert title.size.height >= 2, "the title wraps rather than being cut"
        # The legend is in the title: inside the plot it covered the largest scores.
        assert re.search(r"• positive tail \(\d+ scores\), x negative tail \(\d+\)", str(title.render())), str(title.render())
        assert "positive" not in str(app.screen.query_one("#dist-plot", Static).render())
        fit = app.screen.query_one("#dist-fit", Static)
        assert scroll.virtual_size.height > scroll.size.height  # the fits are below the fold…
        await pilot.press("end")
        await settle(pilot)
        assert scroll.scroll_offset.y == scroll.max_scroll_y > 0
        assert fit.region.bottom <= scroll.region.bottom  # …and scroll into view
        plot = app.screen.query_one("#dist-plot", Static)
        narrow = max(len(line) for line in str(plot.render()).splitlines())
        await pilot.resize_terminal(120, 40)
        await settle(pilot)
        await pilot.pause(0.1)
        wide = max(len(line) for line in str(plot.render()).splitlines())
        assert wide > narrow + 30, (narrow, wide)

    drive(long_id_project, (80, 24), go)


def test_distribution_shares_positive_influence_by_a_metadata_field(project_dir):
    """The Distribution tab shows each query's share of its total positive influence by a corpus
    metadata field (the current query's column first), with the share of sequences each value
    holds; the shares are the hand count's from the score matrix."""
    from textual.widgets import Select, Static

    p = Project.open(project_dir)
    q1 = add_query(p, "default", PROMPT, COMPLETION)
    q2 = add_query(p, "default", "the capital city of astrobia is called", "velmora")
    run_investigation(p, "default", RunSettings(estimator="identity", rank=4))
    matrix = reading.score_matrix(p, "default")  # [queries, sequences]
    source = np.array([r["source"] for r in sorted(catalog.sequence_rows(p.db, list(range(matrix.shape[1]))).values(), key=lambda r: r["idx"])])
    p.close()
    positive = np.where(matrix > 0, matrix, 0.0)
    hand = {(q, v): positive[i][source == v].sum() / positive[i].sum() for i, q in enumerate((q1, q2)) for v in ("facts", "prose")}

    async def go(app, pilot):
        app.set_context(query_id=q2)
        await pilot.press("5")
        await settle(pilot)
        assert app.screen.query_one("#dist-field", Select).value == "source"
        shown = rendered(app.screen.query_one("#dist-by", Static), 78)
        assert "each query's share of its positive influence, as inflq top --by source" in shown, shown
        header = next(line for line in shown.splitlines() if "sequences" in line)
        assert header.index(f"query {q2} *") < header.index(f"query {q1}"), header  # the current query first
        for value in ("facts", "prose"):
            line = next(line for line in shown.splitlines() if line.strip().startswith(value))
            share_of_seqs = (source == value).mean()
            assert line.split()[1:] == [f"{100 * share_of_seqs:.1f}%", f"{100 * hand[q2, value]:.1f}%", f"{100 * hand[q1, value]:.1f}%"], line

    drive(project_dir, (80, 24), go)


def test_probes_tab_types_into_the_probe_field_and_shows_labels(project_dir):
    """The probe field has the focus on tab 6, so typing a probe fires no shortcut (o, q, f…);
    probes are listed with their label."""
    from textual.widgets import Input

    from inflq.tui.screens.modals import InputScreen

    p = Project.open(project_dir)
    qid = add_query(p, "default", PROMPT, COMPLETION)
    pid = catalog.add_probe(p.db, qid, "zorald pfaff was the first president of astrobia", "reversed")
    p.close()

    async def go(app, pilot):
        await pilot.press("6")
        await settle(pilot)
        box = app.screen.query_one("#probe-text", Input)
        assert app.focused is box
        await pilot.press(*"of the old town")
        await settle(pilot)
        assert box.value == "of the old town" and not isinstance(app.screen, InputScreen)
        app.screen.query_one("#probe-estimator").value = "identity"
        await settle(pilot)
        shown = rendered(app.screen.query_one("#probe-body"))
        assert f"probe {pid} reversed (identity)" in shown, shown

    drive(project_dir, (100, 30), go)


@pytest.mark.slow  # a person's pace through the app: run in CI, left out of the inner loop (-m "not slow")
def test_number_keys_typed_into_the_probe_field_type(project_dir):
    """Digits are text in the probe field, however the user got there: from any tab, after adding
    a probe with a click on the button or after a refused probe's dialog, after pressing 6 on the
    Probes tab itself; only esc (leaving the field) makes them switch tabs again."""
    from textual.widgets import Input, TabbedContent

    from inflq.tui.screens.modals import ErrorScreen

    p = Project.open(project_dir)
    add_query(p, "default", PROMPT, COMPLETION)
    p.close()

    async def go(app, pilot):
        tabs = app.screen.query_one("#tabs", TabbedContent)
        box = app.screen.query_one("#probe-text", Input)
        for start in "123457":
            await pilot.press("escape", start, "6", *"zorald 1903")
            await settle(pilot)
            assert (tabs.active, box.value) == ("tab-probes", "zorald 1903"), (start, tabs.active, box.value)
            box.value = ""
        await pilot.press(*"zorald pfaff was 42")
        await pilot.click("#probe-add")
        await settle(pilot)
        assert app.focused is box and box.value == ""
        await pilot.press(*"1 2")
        assert (tabs.active, box.value) == ("tab-probes", "1 2")
        box.value = "7"  # one token: refused in a dialog; closing it gives the field back
        await pilot.click("#probe-add")
        await settle(pilot)
        assert isinstance(app.screen, ErrorScreen)
        await pilot.press("escape")
        await settle(pilot)
        await pilot.press(*"3 4")
        assert (tabs.active, box.value) == ("tab-probes", "73 4")
        await pilot.press("escape")  # leaves the field: digits are tabs again
        assert app.focused is pane(app, "probes")
        await pilot.press("6")  # back on the field
        assert app.focused is box
        await pilot.press("5")
        assert (tabs.active, box.value) == ("tab-probes", "73 45")
        await pilot.press("escape", "1")
        await settle(pilot)
        assert tabs.active == "tab-investigations"

    drive(project_dir, (100, 30), go)


def test_export_to_the_default_folder_stays_out_of_git(long_id_project):
    """e then enter writes to PROJECT/exports, a folder that ignores itself in any git checkout
    (and the repository ignores projects/*/exports/ too)."""
    from textual.widgets import Input

    seed(long_id_project)

    async def go(app, pilot):
        await pilot.press("4")
        await settle(pilot)
        await pilot.press("e")
        await pilot.pause()
        assert app.screen.query_one("#answer", Input).value == str(long_id_project / "exports")
        await pilot.press("enter")
        await settle(pilot)

    drive(long_id_project, (80, 24), go)
    folder = long_id_project / "exports"
    assert sorted(f.suffix for f in folder.iterdir()) == ["", ".csv", ".jsonl", ".md"]
    subprocess.run(["git", "init", "-q", str(long_id_project)], check=True)
    ignored = subprocess.run(["git", "-C", str(long_id_project), "check-ignore", "-q", "exports/default-results-1.csv"])
    assert ignored.returncode == 0, "the export folder is not ignored by git"
    repo = Path(__file__).resolve().parents[1]
    if (repo / ".git").exists():  # a source checkout
        assert subprocess.run(["git", "-C", str(repo), "check-ignore", "-q", "projects/demo/exports/x.csv"]).returncode == 0


# A fresh interpreter (nothing of transformers imported yet) opens the TUI, goes to the Query tab
# as a person does (2, tab) and types the query at a person's speed: every keystroke starts a
# tokenizing and a live-query worker, and ctrl+l a model-loading one, so several threads load the
# tokenizer (and the model) while transformers is still being imported. It prints what it saw.
TYPING_CHILD = r"""
import asyncio, json, sys, threading, time

project, prompt, completion, delay = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
from inflq.runtime import Runtime
from inflq.tui.app import InflqApp

fresh = "transformers" not in sys.modules
errors, inside, most, arrived = [], [0], [0], [0]
lock, real_tokenize = threading.Lock(), Runtime.tokenize_query
together = threading.Event()  # set once three keystrokes' workers are in: they import transformers at once

def tokenize(self, *args, **kwargs):  # counts the workers tokenizing at once
    with lock:
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        arrived[0] += 1
        if arrived[0] >= 3:
            together.set()
    try:
        # The first workers wait for the third (at most 20 s: fewer keystrokes' workers than that is
        # what the test then reports), so the race on transformers' lazy import happens every run
        # rather than when the machine's timing allows it.
        together.wait(20)
        return real_tokenize(self, *args, **kwargs)
    finally:
        with lock:
            inside[0] -= 1

Runtime.tokenize_query = tokenize

async def main():
    app = InflqApp(project)
    real = app.show_error
    app.show_error = lambda exc, title="Something went wrong": (errors.append(f"{title}: {exc!r}"), real(exc, title))
    async with app.run_test(size=(100, 40)) as pilot:
        await pilot.pause()
        await pilot.press("2")
        await pilot.pause()
        await pilot.press("tab")
        focused = app.focused.id

        async def type_text(text):
            for ch in text:
                await pilot.press("space" if ch == " " else ch)
                await asyncio.sleep(delay)

        await type_text(prompt)
        await pilot.press("tab")
        await type_text(completion[:1])
        await pilot.press("ctrl+l")
        await type_text(completion[1:])
        await pilot.press("ctrl+l")
        main_screen = app.screen_stack[1]
        started = time.monotonic()
        while time.monotonic() - started < 240:
            await pilot.pause(0.1)
            if any(w.is_running for w in app.workers) or inside[0]:
                continue
            said = str(main_screen.query_one("#model-says").render())
            if errors or ("pfaff" in str(main_screen.query_one("#tokens").render()) and "log p" in said):
                break
        await pilot.pause(0.5)
        print(json.dumps({
            "fresh": fresh, "focused": focused, "most": most[0], "errors": errors,
            "fields": [main_screen.query_one("#prompt").value, main_screen.query_one("#completion").value],
            "tokens": str(main_screen.query_one("#tokens").render()), "says": str(main_screen.query_one("#model-says").render()),
        }))

asyncio.run(main())
"""


@pytest.mark.slow  # a fresh interpreter imports torch and transformers while the app runs
def test_typing_into_a_fresh_app_from_several_workers(project_dir):
    """Item 1 of issue 25: typing a query into a freshly started TUI, at a person's speed, starts a
    worker per keystroke while transformers is still being imported; none may fail (transformers
    5.x's lazy imports raced: "cannot import name 'AutoTokenizer'"), and the tokens line and the
    model's answer are about the text in the fields, not an earlier keystroke's."""
    import transformers

    assert int(transformers.__version__.split(".")[0]) >= 5, "the race is in transformers 5.x's lazy imports"
    out = subprocess.run([sys.executable, "-c", TYPING_CHILD, str(project_dir), PROMPT, COMPLETION, "0.1"],
                         capture_output=True, text=True, timeout=500)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["fresh"] and seen["focused"] == "prompt", seen
    assert seen["most"] >= 3, f"the workers never overlapped: {seen}"  # the race needs several at once
    assert seen["errors"] == [], seen["errors"]
    assert seen["fields"] == [PROMPT, COMPLETION]
    assert "[zorald] [pfaff]" in seen["tokens"] and "[was]" in seen["tokens"], seen["tokens"]
    p = Project.open(project_dir)
    from inflq.predictions import completion_logprob

    assert f"log p(completion | prompt) = {completion_logprob(p, PROMPT, COMPLETION):.3f}" in seen["says"], seen["says"]
    p.close()


def test_a_failed_worker_leaves_no_stale_status(project_dir, monkeypatch):
    """A tokenizing or model worker that fails shows its error once, in a dialog, and its line
    says that it failed: never the answer about the text typed before."""
    from textual.widgets import Static

    from inflq.runtime import Runtime
    from inflq.tui.screens.modals import ErrorScreen

    real = Runtime.tokenize_query

    def tokenize(self, prompt, completion, chat=False):
        if "boom" in completion:
            raise RuntimeError("the tokenizer broke")
        return real(self, prompt, completion, chat)

    monkeypatch.setattr(Runtime, "tokenize_query", tokenize)
    shown = []

    async def go(app, pilot):
        real_show = app.show_error
        app.show_error = lambda exc, title="Something went wrong": (shown.append(str(exc)), real_show(exc, title))
        await pilot.press("2")
        await settle(pilot)
        await type_into(pilot, "#prompt", PROMPT)
        await type_into(pilot, "#completion", COMPLETION)
        await settle(pilot)
        tokens = app.screen.query_one("#tokens", Static)
        assert "[zorald]" in str(tokens.render())
        await type_into(pilot, "#completion", "zorald boom")
        await settle(pilot)
        assert isinstance(app.screen, ErrorScreen) and shown == ["the tokenizer broke"]  # once
        assert "RuntimeError: the tokenizer broke" in str(app.screen.query_one("#error-message", Static).render())
        await pilot.press("escape")
        await pilot.pause()
        line = str(tokens.render())
        assert "[zorald]" not in line and "tokenizing the query failed (RuntimeError: the tokenizer broke)" in line, line

    drive(project_dir, (100, 30), go)


def test_query_editor_marks_what_is_stale_or_unmeasurable(project_dir):
    """What the model said (ctrl+l) is withdrawn once the query is edited; a completion of
    unknown tokens only is flagged under the tokens, and adding it is refused with a dialog."""
    from textual.widgets import Static

    from inflq.tui.screens.modals import ErrorScreen

    async def go(app, pilot):
        await pilot.press("2")
        await settle(pilot)
        await type_into(pilot, "#prompt", PROMPT)
        await type_into(pilot, "#completion", COMPLETION)
        await pilot.press("ctrl+l")
        await settle(pilot)
        says = app.screen.query_one("#model-says", Static)
        assert "log p(completion | prompt)" in str(says.render())
        await type_into(pilot, "#completion", "velmora")
        await settle(pilot)
        assert "log p" not in str(says.render()) and "ctrl+l" in str(says.render())
        await type_into(pilot, "#completion", "quokka zzyzx")
        await settle(pilot)
        tokens = str(app.screen.query_one("#tokens", Static).render())
        assert "[<unk>] [<unk>]" in tokens and "every token of the completion 'quokka zzyzx' is unknown" in tokens
        await pilot.press("ctrl+s")
        await settle(pilot)
        assert isinstance(app.screen, ErrorScreen) and not catalog.queries(app.project.db, "default")
        assert "is unknown to the model's tokenizer" in str(app.screen.query_one("#error-message", Static).render())

    drive(project_dir, (100, 30), go)


@pytest.mark.slow  # a person's pace through the app: run in CI, left out of the inner loop (-m "not slow")
def test_footer_search_metadata_and_options_read_whole(long_id_project):
    """At 80x24 every tab's footer keeps Quit and Help beside the palette key; a search with no
    hits says so and that it searched the stored rows; a sequence's source is shown once; the
    plugin dropdowns carry whole descriptions."""
    from textual.widgets import Label, OptionList, Select, Static

    from inflq.tui.screens.sequence import SequenceScreen

    p = Project.open(long_id_project)
    add_query(p, "default", PROMPT, COMPLETION)
    run_investigation(p, "default", RunSettings(estimator="identity", rank=4))
    descriptions = {n: " ".join(c.description.split()) for n, c in get_registry().all("estimator").items()}
    p.close()

    async def go(app, pilot):
        for tab in "1234579":
            if tab == "9":
                await pilot.press("4")
                await settle(pilot)
                await pilot.press("enter")  # the sequence view
            else:
                await pilot.press(tab)
            await settle(pilot)
            keys = {k.key: k.region for k in app.screen.query("FooterKey")}
            assert "q" in keys and "question_mark" in keys, (tab, keys)
            assert keys["q"].right <= keys["ctrl+p"].x, f"tab {tab}: Quit is under the palette key"
        assert isinstance(app.screen, SequenceScreen)
        meta = str(app.screen.query_one("#meta", Static).render())
        assert meta.count("source") == 1, meta
        await pilot.press("escape")
        await settle(pilot)
        await pilot.press("slash", *"zzz")
        await settle(pilot)
        status = str(app.screen.query_one("#res-status", Label).render())
        assert "no rows matching 'zzz' (searched: the 20 stored)" in status and "1-0" not in status, status
        listed = app.screen.query_one("#sel-estimator", Select).query_one(OptionList).options  # the open list's rows
        options = {str(o.prompt).split(":", 1)[0]: str(o.prompt) for o in listed if str(o.prompt) != "Select"}
        assert options == {n: f"{n}: {d}" for n, d in descriptions.items()}

    drive(long_id_project, (80, 24), go)


def palette_command(app, title: str):
    return next(c for c in app.get_system_commands(app.screen) if c.title == title).callback


def test_validate_screen_runs_with_progress_and_cancels(project_dir):
    """ctrl+p → Validate estimators: the validation runs in a worker with progress bars and shows
    the correlations (saved like `inflq validate`); a second one is cancelled with ctrl+b."""
    import io

    from rich.console import Console
    from textual.widgets import Input, Static

    from inflq.tui.screens.tools import ValidateScreen

    seed(project_dir, run=None)

    async def go(app, pilot):
        palette_command(app, "Validate estimators")()
        await settle(pilot)
        assert isinstance(app.screen, ValidateScreen)
        screen = app.screen
        for name, value in (("estimators", "identity"), ("sample", "4"), ("queries", "1"), ("fit_sequences", "8"), ("pbrf_steps", "3")):
            screen.query_one(f"#val-{name}", Input).value = value
        await pilot.press("ctrl+r")
        await settle(pilot)
        console = Console(width=98, record=True, file=io.StringIO())
        console.print(screen.query_one("#val-result", Static).content)
        shown = console.export_text()
        assert "validation 1: 1 query × 4 sequences vs PBRF" in shown and "identity" in shown, shown
        assert "PBRF" in screen.phases.bars and "ETA" not in str(screen.phases.bars["PBRF"][0].render())
        assert app.project.db["validations"].count == 1
        # A validation that would run for hours, cancelled at once: nothing saved, the screen says so.
        screen.query_one("#val-pbrf_steps", Input).value = "1000000"
        screen.query_one("#val-max_minutes", Input).value = "1000000"
        await pilot.press("ctrl+r", "ctrl+b")
        for _ in range(1500):  # (settle would re-raise the cancelled worker's Cancelled)
            await pilot.pause(0.02)
            if not screen.running and "cancelled" in str(screen.query_one("#val-result", Static).render()):
                break
        assert "cancelled: nothing was saved" in str(screen.query_one("#val-result", Static).render())
        assert app.project.db["validations"].count == 1
        await pilot.press("escape")
        await settle(pilot)
        assert app.screen.query("#tabs")

    drive(project_dir, (100, 40), go)


def test_validate_screen_runs_lds_and_shows_the_saved_scores(project_dir):
    """Method lds on the validate screen: retrains with the built-in trainer (tiny settings), shows
    the LDS table, and the latest saved LDS validation is shown again when the screen reopens."""
    import io

    from rich.console import Console
    from textual.widgets import Static

    from inflq.tui.screens.tools import ValidateScreen

    seed(project_dir, run=None)

    def shown(screen) -> str:
        console = Console(width=120, record=True, file=io.StringIO())
        console.print(screen.query_one("#val-result", Static).content)
        return console.export_text()

    async def go(app, pilot):
        palette_command(app, "Validate estimators")()
        await settle(pilot)
        screen = app.screen
        assert isinstance(screen, ValidateScreen)
        for name, value in (("method", "lds"), ("estimators", "identity"), ("queries", "1"), ("subsets", "3"), ("trainer", "adamw:epochs=1,batch_size=8,threads=1")):
            screen.query_one(f"#val-{name}").value = value  # (method: a select of the declared choices)
        await pilot.press("ctrl+r")
        await settle(pilot)
        text = shown(screen)
        assert "LDS validation 1: 1 query × 3 subsets" in text and "identity" in text, text
        assert "LDS retraining" in screen.phases.bars
        assert [r["method"] for r in app.project.db.query("SELECT method FROM validations")] == ["lds"]
        await pilot.press("escape")
        await settle(pilot)
        palette_command(app, "Validate estimators")()
        await settle(pilot)
        assert "LDS validation 1: 1 query × 3 subsets" in shown(app.screen)

    drive(project_dir, (120, 40), go)


@pytest.mark.slow  # a PBRF validation and LDS retraining, both tiny
def test_saved_validations_are_listed_with_their_tables(project_dir):
    """ctrl+p → Saved validations (or ctrl+l on the Validate screen): every saved validation,
    newest first, with its method, estimators and size; the highlighted one's table is the one
    `inflq validate` printed (PBRF correlations, LDS scores)."""
    from textual.widgets import DataTable, Static

    from inflq.lds import validate_lds
    from inflq.tui.screens.saved_validations import ValidationsScreen
    from inflq.tui.screens.tools import ValidateScreen
    from inflq.validate import validate

    seed(project_dir, run=None)
    p = Project.open(project_dir)
    pbrf = validate(p, "default", estimators=["identity", "diagonal"], sample=4, queries=1, fit_sequences=8, pbrf_steps=3)
    lds = validate_lds(p, "default", estimators=["identity"], subsets=3, trainer="adamw:epochs=1,batch_size=8,threads=1", queries=1)
    p.close()

    async def go(app, pilot):
        palette_command(app, "Saved validations")()
        await settle(pilot)
        assert isinstance(app.screen, ValidationsScreen)
        table = app.screen.query_one("#validations", DataTable)
        assert [table.get_row_at(i)[:4] for i in range(table.row_count)] == [
            [str(lds.id), "lds", "default", "identity"], [str(pbrf.id), "pbrf", "default", "identity, diagonal"]]
        assert table.get_row_at(1)[4] == "1 q × 4 sequences" and table.get_row_at(0)[4] == "1 q × 3 subsets"
        shown = rendered(app.screen.query_one("#validation-detail", Static), 120)
        assert f"LDS validation {lds.id}: 1 query × 3 subsets" in shown, shown
        await pilot.press("down")
        await settle(pilot)
        shown = rendered(app.screen.query_one("#validation-detail", Static), 120)
        assert f"validation {pbrf.id}: 1 query × 4 sequences vs PBRF" in shown, shown
        for r in pbrf.rows:
            assert re.search(rf"{r.estimator}\s+{r.pearson:.3f}( \[[^]]*\])?\s+{r.spearman:.3f}", shown), (r, shown)
        await pilot.press("escape")
        await settle(pilot)
        assert app.screen.query("#tabs")
        palette_command(app, "Validate estimators")()  # and from the Validate screen
        await settle(pilot)
        assert isinstance(app.screen, ValidateScreen)
        await pilot.press("ctrl+l")
        await settle(pilot)
        assert isinstance(app.screen, ValidationsScreen)

    drive(project_dir, (100, 30), go)


def test_relink_and_trust_from_the_palette(project_dir, base, tmp_path, monkeypatch):
    """Relink asks for the model and corpus copies, confirms, then checks fingerprints (a wrong
    corpus is a dialog, not a crash); Trust names the plugin files, confirms and loads them."""
    import shutil

    from textual.widgets import Input, Static

    from inflq import plugins
    from inflq.tui.screens.modals import ConfirmScreen, ErrorScreen

    monkeypatch.setenv("INFLQ_CONFIG_DIR", str(tmp_path / "config"))
    plugins.reset_registry()
    model_copy = tmp_path / "copies" / "model"
    shutil.copytree(base / "model", model_copy)
    corpus_copy = tmp_path / "copies" / "renamed.jsonl"
    shutil.copy(base / "corpus.jsonl", corpus_copy)
    (project_dir / "plugins").mkdir()
    (project_dir / "plugins" / "mine.py").write_text(
        "import inflq\nfrom inflq_builtins.estimators import GradientDotProduct\n\n\n"
        "class Mine(GradientDotProduct):\n    name = 'mine'\n    description = 'a local one'\n\n\n"
        "@inflq.hookimpl\ndef register_estimators(register):\n    register(Mine)\n")

    async def answer(pilot, text: str) -> None:
        pilot.app.screen.query_one("#answer", Input).value = text
        await pilot.press("enter")
        await settle(pilot)

    async def go(app, pilot):
        said = " ".join(app.said)
        assert "1 local plugin, not loaded: ctrl+p → Trust local plugins" in said
        # A wrong corpus: refused in a dialog, inflq.toml untouched.
        palette_command(app, "Relink model or corpus")()
        await settle(pilot)
        await answer(pilot, "")
        await answer(pilot, str(project_dir / "inflq.toml"))
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        await settle(pilot)
        assert isinstance(app.screen, ErrorScreen)
        assert "is not the corpus this project was made with" in str(app.screen.query_one("#error-message", Static).render())
        await pilot.press("escape")
        # The copies: relinked.
        palette_command(app, "Relink model or corpus")()
        await settle(pilot)
        await answer(pilot, str(model_copy))
        await answer(pilot, str(corpus_copy))
        assert isinstance(app.screen, ConfirmScreen) and "renamed.jsonl" in str(app.screen.query_one(".question", Static).render())
        await pilot.press("y")
        await settle(pilot)
        assert app.project.model_path.resolve() == model_copy.resolve()
        assert app.project.corpus_path.resolve() == corpus_copy.resolve()
        # Trust: asked, then loaded (the Run tab's estimators include it).
        palette_command(app, "Trust local plugins")()
        await settle(pilot)
        assert isinstance(app.screen, ConfirmScreen) and "mine.py" in str(app.screen.query_one(".question", Static).render())
        await pilot.press("y")
        await settle(pilot)
        assert "mine" in get_registry().names("estimator")

    try:
        drive(project_dir, (100, 30), go)
    finally:
        plugins.reset_registry()


def test_a_lissa_result_shows_its_residual(project_dir):
    from textual.widgets import Label

    seed(project_dir, run="lissa:depth=20,batch_size=4")

    async def go(app, pilot):
        await pilot.press("4")
        await settle(pilot)
        status = str(app.screen.query_one("#res-status", Label).render())
        assert re.search(r"lissa:depth=20,batch_size=4: damping .* residual \d", status), status

    drive(project_dir, (80, 24), go)


def test_results_of_an_edited_query_are_shown_stale(project_dir):
    """`inflq query edit` with a new completion: the result set that scored the old one says so."""
    from textual.widgets import Label

    from inflq.queries import edit_query

    qid = seed(project_dir)
    p = Project.open(project_dir)
    edit_query(p, qid, completion=" a different completion")
    p.close()

    async def go(app, pilot):
        await pilot.press("4")
        await settle(pilot)
        status = app.screen.query_one("#res-status", Label)
        assert "STALE: the query was edited after this result set scored it" in str(status.render())
        assert status.has_class("stale")

    drive(project_dir, (80, 24), go)


# -- snapshots -----------------------------------------------------------------------------------
def normalise_svg(svg: str) -> str:
    """Drop what changes between runs: the terminal id hashed into every class and clip name."""
    return re.sub(r"terminal-\d+", "terminal", svg)


def check_snapshot(name: str, svg: str) -> None:
    """The screen against tests/snapshots/NAME.svg. A missing snapshot is written (and the test
    skipped) on a developer's machine; in CI (CI=true) it fails: a snapshot nobody committed
    would otherwise never be compared."""
    path = SNAPSHOTS / f"{name}.svg"
    svg = normalise_svg(svg)
    if not path.exists():
        if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
            pytest.fail(f"tests/snapshots/{name}.svg is missing; run this test outside CI to write it, look at it, and commit it")
        path.write_text(svg)
        pytest.skip(f"wrote new snapshot {path.name}; run again to compare")
    assert svg == path.read_text(), f"screen {name} differs from tests/snapshots/{name}.svg (delete it to accept the new look)"


@pytest.mark.parametrize("ci", ["true", ""])
def test_a_missing_snapshot_fails_in_ci(tmp_path, monkeypatch, ci):
    monkeypatch.setattr(sys.modules[__name__], "SNAPSHOTS", tmp_path)
    monkeypatch.setenv("CI", ci)
    expected = pytest.fail.Exception if ci else pytest.skip.Exception
    with pytest.raises(expected):
        check_snapshot("nothing", "<svg/>")
    assert (tmp_path / "nothing.svg").exists() == (not ci)
    if not ci:
        check_snapshot("nothing", "<svg/>")  # written: compared from now on
        with pytest.raises(AssertionError):
            check_snapshot("nothing", "<svg>changed</svg>")


@pytest.mark.parametrize("screen", ["investigations", "query", "run", "help"])
def test_snapshot(project_dir, screen):
    seed(project_dir, run=None)

    async def go(app, pilot):
        keys = {"investigations": ["1"], "query": ["2"], "run": ["3"], "help": ["question_mark"]}[screen]
        await pilot.press(*keys)
        await settle(pilot)
        if screen == "query":
            app.screen.query_one("#prompt").value = PROMPT
            app.screen.query_one("#completion").value = COMPLETION
            await settle(pilot)
            app.screen.query_one("#queries").focus()
            await pilot.pause()
        return app.export_screenshot()

    check_snapshot(screen, drive(project_dir, (80, 24), go))


def test_snapshot_results(long_id_project):
    seed(long_id_project)

    async def go(app, pilot):
        await pilot.press("4")
        await settle(pilot)
        return app.export_screenshot()

    check_snapshot("results", drive(long_id_project, (80, 24), go))


def test_core_imports_without_textual():
    code = "import sys, inflq, inflq.project, inflq.runs, inflq.reading, inflq.stats, inflq.export, inflq.predictions\n"
    code += "try:\n    import inflq.cli\nexcept ImportError:\n    pass\n"
    code += "assert 'textual' not in sys.modules, sorted(m for m in sys.modules if m.startswith('textual'))"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_powerlaw_tail_recovers_the_exponent():
    rng = np.random.default_rng(0)
    alpha = 2.5
    x = (1 - rng.random(20000)) ** (-1 / (alpha - 1))  # Pareto with p(x) ∝ x^-alpha, x >= 1
    fit = stats.powerlaw_tail(x, tail_fraction=0.5)
    assert abs(fit.alpha - alpha) < 3 * fit.stderr + 0.05
    assert stats.powerlaw_tail(np.array([1.0, -2.0])) is None


def test_compare_scores_against_a_hand_count():
    idx = np.arange(6)
    a = np.array([6.0, 5, 4, 3, 2, 1])
    b = np.array([1.0, 2, 3, 4, 5, np.nan])
    cmp = stats.compare_scores(idx, a, idx, b, k=2)
    assert cmp.n_common == 5 and cmp.spearman == pytest.approx(-1.0)
    assert cmp.overlap == 0
    assert [i for i, _, _ in cmp.only_a] == [0, 1] and [i for i, _, _ in cmp.only_b] == [4, 3]
    assert cmp.only_a[0][2] == 5  # sequence 0 is B's 5th


# -- the house: context, workers, one-way imports --------------------------------------------------
def test_context_is_one_value_and_its_changes_reach_the_pane_in_view(long_id_project):
    """Context.changed names what differs; a change made by the app is posted to every pane
    (ContextChanged); the pane in view reloads, a hidden one waits until it is shown, and the pane
    that made a change is not told to reload what it has just updated."""
    from inflq.tui.context import Context

    qid = seed(long_id_project)
    p = Project.open(long_id_project)
    q2 = add_query(p, "default", "the capital city of astrobia is called", "velmora")
    assert Context(p, "a", 1).changed(Context(p, "a", 2)) == {"query_id"}
    other = Project.open(long_id_project)
    assert Context(p).changed(Context(other)) == {"project"}
    other.close()
    p.close()

    async def go(app, pilot):
        from textual.widgets import Label, Select

        heard: dict[str, list] = {"results": [], "query": []}
        reloads = {"results": 0, "query": 0}
        for name in heard:
            widget = pane(app, name)

            def told(event, name=name, real=widget.context_changed):
                heard[name].append(event.changed)
                real(event)

            def reload(name=name, real=widget.reload):
                reloads[name] += 1
                real()

            widget.context_changed, widget.reload = told, reload
        await pilot.press("4")
        await settle(pilot)
        shown = reloads["results"]
        app.set_context(query_id=q2)
        await settle(pilot)
        assert heard == {"results": [{"query_id"}], "query": [{"query_id"}]}
        assert reloads == {"results": shown + 1, "query": 0}
        assert f"query {q2}" in str(app.screen.query_one("#res-status", Label).render())
        assert f"query: {q2}" in app.sub_title
        app.screen.query_one("#res-query", Select).value = qid  # the results pane changes it itself
        await settle(pilot)
        assert app.query_id == qid and reloads["results"] == shown + 1 and heard["query"][-1] == {"query_id"}
        app.set_context(query_id=qid)  # no change: nobody is told
        await settle(pilot)
        assert len(heard["query"]) == 2

    drive(long_id_project, (80, 24), go)


def test_distribution_loads_in_a_worker_and_drops_a_stale_load(long_id_project, monkeypatch):
    """The score matrix is read off the UI thread: while it loads the tab says so; when the query
    changes meanwhile, the stale load is cancelled and its result never shown."""
    from textual.widgets import Static

    seed(long_id_project)
    p = Project.open(long_id_project)
    q2 = add_query(p, "default", "the capital city of astrobia is called", "velmora")
    run_investigation(p, "default", RunSettings(estimator="identity", rank=4))
    p.close()
    real, calls, release = reading.distribution, [], threading.Event()

    def slow(project, investigation, query_id, result_set_id=None):
        calls.append((query_id, threading.current_thread() is threading.main_thread()))
        if len(calls) == 1:
            assert release.wait(30), "the test never released the first load"
        return real(project, investigation, query_id, result_set_id)

    monkeypatch.setattr(reading, "distribution", slow)

    async def go(app, pilot):
        first = app.query_id
        await pilot.press("5")
        for _ in range(100):
            await pilot.pause(0.02)
            if calls:
                break
        title = app.screen.query_one("#dist-title", Static)
        assert "loading the scores" in str(title.render())
        app.set_context(query_id=q2)
        for _ in range(500):
            await pilot.pause(0.02)
            if len(calls) == 2 and "CCDF" in str(title.render()):
                break
        release.set()
        await settle(pilot)
        await pilot.pause(0.1)
        assert [q for q, _ in calls] == [first, q2] and not any(main for _, main in calls)
        assert str(title.render()).startswith(f"query {q2},"), str(title.render())

    drive(long_id_project, (80, 24), go)


def test_tui_imports_run_one_way():
    """app -> layout -> panes -> screens: no pane imports the app or the layout, no screen
    imports a pane, the app or the layout (so nothing circles back)."""
    import ast

    root = Path(__file__).resolve().parents[1] / "inflq" / "tui"

    def imports(path: Path) -> set[str]:
        pkg = ".".join(path.relative_to(root.parent.parent).with_suffix("").parts[:-1])
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = pkg.rsplit(".", node.level - 1)[0] if node.level else ""
                mod = ".".join(x for x in (base, node.module) if x)
                found |= {mod} | {f"{mod}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
        return found

    for folder, banned in (("panes", ("inflq.tui.app", "inflq.tui.main_screen")),
                           ("screens", ("inflq.tui.app", "inflq.tui.main_screen", "inflq.tui.panes"))):
        for path in (root / folder).glob("*.py"):
            bad = [m for m in imports(path) if m.startswith(banned)]
            assert not bad, f"{path.relative_to(root)} imports {bad}"
    private = ("._" + "options", "._" + "notifications")  # Textual's; the tests read notifications through App.notify
    for path in [*root.rglob("*.py"), Path(__file__)]:
        found = [name for name in private if name in path.read_text()]
        assert not found, f"{path.name} reads a private Textual attribute: {found}"


def _index_plugin():
    import inflq_builtins.gradient_index as index_plugin
    from inflq.cli import cli

    if get_registry().pm.get_plugin("inflq.index") is None:  # an installed inflq registers it by entry point
        get_registry().register(index_plugin, name="inflq.index", distribution="inflq")
    if "index" not in cli.commands:
        index_plugin.register_commands(cli=cli)
    return index_plugin


def _build_index(project_dir) -> None:
    from inflq.cli import main

    try:
        main(["index", "build", str(project_dir), "--k-s", "3", "--k-a", "3"])
    except SystemExit as exc:
        assert exc.code in (0, None)


async def _type_query(app, pilot, prompt: str = PROMPT, completion: str = COMPLETION):
    """The query typed into the Query tab, once the live worker has answered: the live box."""
    from textual.widgets import Static

    await pilot.press("2")
    await settle(pilot)
    await type_into(pilot, "#prompt", prompt)
    await type_into(pilot, "#completion", completion)
    await settle(pilot)
    return app.screen.query_one("#live", Static)


ROW = re.compile(r"^ ?\d+\. (exact|preview)\s+(\S+)", re.M)


def _recording(monkeypatch):
    """Every state the query pane's live box was asked to show, in order."""
    from inflq.tui.panes.query_pane import QueryPane

    shown = []
    real = QueryPane._show_live

    def show(self, state):
        shown.append(state.copy())
        real(self, state)

    monkeypatch.setattr(QueryPane, "_show_live", show)
    return shown


@pytest.mark.slow  # a person's pace through the app: run in CI, left out of the inner loop (-m "not slow")
def test_live_query_converges_to_the_exact_top_of_the_index_candidates(project_dir, monkeypatch):
    """As the query is typed, the index's preview shows first (none without an index), with the
    investigation's probes scored from the index and ranked among the corpus; then (its factors
    fitted on ctrl+g the first time, none being cached) exact EK-FAC re-scores the preview's top
    candidates block by block, each row marked preview or exact, until the list is their exact
    top with the layer breakdown; ctrl+g then re-scores twice as deep."""
    from inflq.tui.panes.query_pane import QueryPane

    async def hidden(app, pilot):
        return (await _type_query(app, pilot)).display

    assert drive(project_dir, (120, 50), hidden) is False
    index_plugin = _index_plugin()
    _build_index(project_dir)
    p = Project.open(project_dir)
    assert len(index_plugin.recorded_indexes(p)) == 1
    # The investigation's probes (on a query of its own) are scored from the index as the query is typed.
    other = add_query(p, "default", "the capital city of astrobia is called", "velmora")
    probe_texts = ["zorald pfaff was the first president of astrobia", "velmora is a city of rivers", "zorald pfaff"]
    probe_ids = [catalog.add_probe(p.db, other, t, label="mine" if i == 0 else "") for i, t in enumerate(probe_texts)]
    n = len(p.runtime.corpus)
    p.close()
    monkeypatch.setattr(QueryPane, "LIVE_DEPTH", 12)
    monkeypatch.setattr(QueryPane, "LIVE_BLOCK", 4)
    shown = _recording(monkeypatch)

    async def converge(app, pilot):
        live = await _type_query(app, pilot)
        waiting = str(live.render())
        await pilot.press("ctrl+g")  # no cached factors: fits them, then re-scores the top 12
        await settle(pilot)
        done = str(live.render())
        at_12 = len(shown)
        await pilot.press("ctrl+g")  # re-score deeper: 24, the whole corpus
        await settle(pilot)
        return live.display, waiting, done, at_12, str(live.render())

    async def narrow(app, pilot):
        """At 80x24: a line per sequence and probe, cut at the width, never wrapped; the list
        scrolls into view rather than being cut at the bottom."""
        live = await _type_query(app, pilot)
        lines = str(live.render()).splitlines()
        assert live.size.height == len(lines) and live.size.width <= 78, (live.size, lines)  # no line wrapped
        assert max(len(line) for line in lines) > live.size.width  # (some had to be cut)
        scroll = app.screen.query_one("#query-detail")
        assert scroll.max_scroll_y > 0  # the list goes below the fold…
        scroll.scroll_end(animate=False)
        await pilot.pause()
        assert live.region.bottom <= scroll.region.bottom and lines[-1].lstrip().startswith("probe")  # …and scrolls into view
        return lines

    lines = drive(project_dir, (80, 24), narrow)  # before any factors are fitted: the preview, waiting for ctrl+g
    assert lines[0].startswith("live: top 10 of") and len(lines) == 1 + 10 + 1 + 1 + 3  # header, rows, hint, probes' header, probes

    display, waiting, done, at_12, deeper = drive(project_dir, (120, 60), converge)
    assert display is True
    assert f"live: top 10 of {n:,}: index preview" in waiting and "ctrl+g fits them" in waiting
    assert [kind for kind, _ in ROW.findall(waiting)] == ["preview"] * 10
    assert f"probes, ranked among the {n:,} corpus sequences" in waiting
    # Preview first, then exact scores arriving a block (4) at a time, then the exact top.
    scored = [st.scored() for st in shown[:at_12]]
    assert scored[0] == 0 and scored[-3:] == [4, 8, 12] and not shown[0].done() and shown[at_12 - 1].done()
    assert "live: exact top 10 of the index's best 12" in done and "influence by layer of #1" in done
    assert [kind for kind, _ in ROW.findall(done)] == ["exact"] * 10

    # Against the exact answer: a full-rank EK-FAC run of the same query (the factors the TUI cached).
    from inflq.live import LiveScorer

    p = Project.open(project_dir)
    add_query(p, "default", PROMPT, COMPLETION)
    rs = run_investigation(p, "default", RunSettings(estimator="ekfac", rank=None, top_k=n))
    assert len(catalog.factor_sets(p.db)) == 2  # the index's fit and EK-FAC's, fitted once by the TUI
    row = reading.score_matrix(p, "default", rs.result_set_id)[-1].astype(np.float64)
    live = LiveScorer(p)
    top = live.top(PROMPT, COMPLETION, 10, catalog.investigation_probes(p.db, "default"))
    cand = top.candidates(12)
    final = shown[at_12 - 1]
    assert sorted(final.exact) == sorted(int(i) for i in cand)
    for i, (v, parts) in final.exact.items():
        assert v == pytest.approx(row[i], rel=1e-4, abs=1e-6 * np.abs(row).max())
        assert parts.sum() == pytest.approx(v, rel=1e-4, abs=1e-6 * np.abs(row).max())
    want = [int(i) for i in np.asarray(cand)[np.argsort(-row[cand], kind="stable")][:10]]
    assert [r[0] for r in final.rows(10)] == want
    ids = [catalog.sequence_rows(p.db, [i])[i]["seq_id"] for i in want]
    assert [sid for _, sid in ROW.findall(done)] == ids
    # The layer chart of #1 is the run's own breakdown of that sequence (its saved query gradients).
    session = reading.ScoringSession.for_result_set(p, catalog.get_result_set(p.db, rs.result_set_id))
    module, _ = session.breakdown(p.runtime.corpus.get(want[0]), session.query_ids[-1])
    layer_of = {t.name: t.layer for t in session.engine.tracked}
    by_layer: dict[int, float] = {}
    for name, v in zip(session.qg.names, module, strict=True):
        by_layer[layer_of[name]] = by_layer.get(layer_of[name], 0.0) + float(v)
    chart = re.findall(r"layer (\d+) .*? ([+-]\S+)$", done.split("influence by layer of #1", 1)[1], re.M)
    scale = max(abs(v) for v in by_layer.values())
    assert [(int(k), float(v)) for k, v in chart] == [(k, pytest.approx(v, rel=5e-3, abs=1e-3 * scale)) for k, v in sorted(by_layer.items())]
    # Deeper: every sequence, and the list is the run's exact top 10.
    assert shown[-1].depth == n and shown[-1].scored() == n and shown[-1].done()
    assert [r[0] for r in shown[-1].rows(10)] == [int(i) for i in np.argsort(-row, kind="stable")[:10]]
    assert f"live: exact top 10 of the index's best {n}" in deeper
    # The probes: scored from the index (the projected EK-FAC, computed the slow way below) and
    # ranked among the corpus sequences by their index scores.
    shown_probes = re.findall(r"probe (\d+)(?: mine)? \(query (\d+)\)  (\S+)  rank (\S+)", waiting)
    assert sorted(int(i) for i, *_ in shown_probes) == sorted(probe_ids) and all(int(q) == other for _, q, *_ in shown_probes)
    assert [(int(i), f"{s:.4g}", f"{r:,}") for i, _, s, r in [(pr.id, pr.query_id, pr.score, pr.rank) for pr in top.probes]] == \
        [(int(i), s, r) for i, _, s, r in shown_probes]
    from inflq import make_batch
    from inflq.progress import Monitor
    from inflq.runs import query_gradients

    est = live.asker.prepare_index()
    qgrads = query_gradients(p, est.engine, [{"prompt": PROMPT, "completion": COMPLETION, "chat": 0}], None)
    lifted = est.precondition(qgrads)
    all_scores = est.score_candidates(live.asker.index_context([{"prompt": PROMPT, "completion": COMPLETION, "chat": 0}], np.arange(n), Monitor()))[0]
    for pr in top.probes:
        grads = est.engine.sequence_gradients(make_batch([p.runtime.tokenize_sequence(pr.text)], p.runtime.pad_id), "data")
        slow = float(sum((lifted[m][0].double() * grads[m][0].double()).sum() for m in lifted))
        assert pr.score == pytest.approx(slow, rel=1e-4, abs=1e-6 * float(abs(all_scores).max()))
        assert pr.rank == 1 + int((all_scores > pr.score).sum())
    assert [pr.score for pr in top.probes] == sorted((pr.score for pr in top.probes), reverse=True)
    np.testing.assert_allclose(live.exact(PROMPT, COMPLETION, top.indices), row[top.indices], rtol=1e-4, atol=1e-6 * np.abs(row).max())
    p.close()


def test_a_keystroke_cancels_the_exact_re_scoring(project_dir, monkeypatch):
    """A new keystroke stops the worker re-scoring the previous text between two blocks: none of
    its exact scores is shown, and the new text's re-scoring runs to its end."""
    import threading

    from inflq.live import LiveScorer
    from inflq.tui.panes.query_pane import QueryPane

    _index_plugin()
    _build_index(project_dir)
    p = Project.open(project_dir)
    add_query(p, "default", PROMPT, COMPLETION)
    run_investigation(p, "default", RunSettings(estimator="ekfac", rank=None))  # caches the factors
    n = len(p.runtime.corpus)
    p.close()
    monkeypatch.setattr(QueryPane, "LIVE_DEPTH", 12)
    monkeypatch.setattr(QueryPane, "LIVE_BLOCK", 4)
    shown = _recording(monkeypatch)
    entered, release = threading.Event(), threading.Event()
    calls = []
    real = LiveScorer.exact_parts

    def exact_parts(self, prompt, completion, indices, *measured):
        calls.append((completion, len(indices)))
        if completion == COMPLETION:  # the first text's first block waits for the next keystroke
            entered.set()
            assert release.wait(60)
        return real(self, prompt, completion, indices, *measured)

    monkeypatch.setattr(LiveScorer, "exact_parts", exact_parts)

    async def script(app, pilot):
        import asyncio

        await pilot.press("2")
        await settle(pilot)
        await type_into(pilot, "#prompt", PROMPT)
        await type_into(pilot, "#completion", COMPLETION)
        for _ in range(600):
            if entered.is_set():
                break
            await asyncio.sleep(0.05)
        assert entered.is_set()
        await type_into(pilot, "#completion", COMPLETION + " pfaff")  # the keystroke
        await pilot.pause(0.1)
        release.set()
        await settle(pilot)
        return str(app.screen.query_one("#live").render())

    final = drive(project_dir, (120, 50), script)
    first = [c for c in calls if c[0] == COMPLETION]
    assert first == [(COMPLETION, 4)]  # stopped after the block in flight: 1 of 3
    assert all(st.about[:2] == (PROMPT, COMPLETION + " pfaff") for st in shown if st.scored())
    assert shown[-1].about[1] == COMPLETION + " pfaff" and shown[-1].done() and shown[-1].scored() == 12
    assert "live: exact top 10 of the index's best 12" in final and f"(of {n:,})" in final


def test_query_tab_chooses_the_measurement_and_shows_it(project_dir):
    """Issue 25, item 11: the Query tab's select chooses what a query measures; the alternative's
    field appears for a measurement that compares two completions (margin), the query is added with
    both, the queries table shows them, and selecting a row puts them back in the fields."""
    from textual.widgets import DataTable, Input, Select, Static

    from inflq.tui.screens.modals import ErrorScreen

    async def go(app, pilot):
        await pilot.press("2")
        await settle(pilot)
        select, alt = app.screen.query_one("#measurement", Select), app.screen.query_one("#alternative", Input)
        assert select.value == "logprob" and not alt.display
        labels = {str(o.prompt) for o in select.query_one("OptionList").options}
        assert "margin: log p(completion) - log p(alternative)" in labels, labels
        await type_into(pilot, "#prompt", PROMPT)
        await type_into(pilot, "#completion", COMPLETION)
        select.value = "margin"
        await settle(pilot)
        assert alt.display
        await pilot.press("ctrl+s")  # a margin without an alternative: the one-line error
        await settle(pilot)
        assert isinstance(app.screen, ErrorScreen) and "--alternative" in str(app.screen.query_one("#error-message").render())
        await pilot.press("escape")
        await settle(pilot)
        await type_into(pilot, "#alternative", "velmora")
        await pilot.press("ctrl+s")
        await settle(pilot)
        assert not isinstance(app.screen, ErrorScreen)
        q = catalog.queries(app.project.db, "default")[-1]
        assert (q["measurement"], q["alternative"]) == ("margin", "velmora")
        table = app.screen.query_one("#queries", DataTable)
        assert "margin vs 'velmora'" in [str(c) for c in table.get_row(str(q["id"]))]
        assert "margin = " in str(app.screen.query_one("#model-says", Static).render())
        # Back to logprob hides the alternative; selecting the row restores what the query measures.
        select.value = "logprob"
        await settle(pilot)
        assert not alt.display
        table.focus()
        table.move_cursor(row=table.get_row_index(str(q["id"])))
        await pilot.press("enter")
        await settle(pilot)
        assert select.value == "margin" and alt.display and alt.value == "velmora"

    drive(project_dir, (100, 30), go)


def test_a_margin_querys_tabs_and_export_say_what_a_positive_score_raises(project_dir, tmp_path):
    """The sign notes under the Results and Probes tabs (and the sequence view) are about the
    query's measurement: for a margin, a positive score raises log p(completion) - log p(alternative),
    not "makes the completion more likely"; a log p(completion) query keeps the plain note. An export
    names each row's measurement."""
    from textual.widgets import Label

    from inflq.export import export_csv
    from inflq.tui import render

    p = Project.open(project_dir)
    qid = add_query(p, "default", PROMPT, COMPLETION, measurement="margin", alternative=" velmora")
    rs = run_investigation(p, "default", RunSettings(estimator="identity", rank=4)).result_set_id
    rows = list(csv.DictReader(export_csv(p, "default", rs, tmp_path / "out.csv").read_text(encoding="utf-8").splitlines()))
    assert rows and {(r["measurement"], r["alternative"]) for r in rows} == {("margin", " velmora")}
    p.close()

    async def go(app, pilot):
        await pilot.press("4")
        await settle(pilot)
        results = str(app.screen.query_one("#res-sign", Label).render())
        await pilot.press("6")
        await settle(pilot)
        return results, str(app.screen.query_one("#probe-sign", Label).render())

    results, probes = drive(project_dir, (120, 40), go)
    want = "margin vs ' velmora': score > 0 (red) raises log p(completion) - log p(alternative) · < 0 (blue) lowers it"
    assert results == want and probes == want, (results, probes)
    assert render.sign_note({"id": qid, "measurement": "logprob", "alternative": None}) == render.SIGN_NOTE
