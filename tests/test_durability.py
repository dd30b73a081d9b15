"""Never lose work: real processes writing one project at once, and writers killed with SIGKILL at
random points. Afterwards the catalog passes SQLite's integrity check, every multi-row write is all
or nothing, every artifact a committed row references verifies, and an interrupted run resumes to
the same scores as an uninterrupted one."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from inflq.queries import add_query

WRITER = textwrap.dedent(
    """
    import sys
    from inflq import catalog
    from inflq.project import Project
    from inflq.queries import add_queries

    mode, root, tag = sys.argv[1], sys.argv[2], sys.argv[3]
    limit = int(sys.argv[4]) if len(sys.argv) > 4 else 10**9
    p = Project.open(root)
    if mode == "queries":
        try:
            catalog.create_investigation(p.db, tag)
        except Exception:
            pass
        print("ready", flush=True)
        i = 0
        while i < limit:
            batch = [{"prompt": "the red cat runs with", "completion": "the big dog", "notes": f"{tag}-{i}-{j}"} for j in range(5)]
            add_queries(p, tag, batch)
            catalog.tag_sequence(p.db, tag, f"d{i % 24}:0", f"{tag}-{i}")
            print("committed", i, flush=True)
            i += 1
    elif mode == "rebuild":
        print("ready", flush=True)
        while True:
            p.runtime.rebuild_corpus()
            print("rebuilt", flush=True)
    """
)


def _env():
    return {**os.environ, "INFLQ_BUSY_TIMEOUT": "120000", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


def _spawn(tmp_path, *args):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    return subprocess.Popen([sys.executable, str(script), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())


def _spawn_run(root, *extra):
    cmd = [sys.executable, "-m", "inflq.cli", "run", str(root), "--estimator", "identity", "--filter", "all", "--rank", "4", "--shard-size", "2", "--top-k", "3", "--batch-size", "2", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())


def _wait_line(proc, word, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if word in line:
            return
        if not line and proc.poll() is not None:
            raise AssertionError(f"writer exited early: {proc.stderr.read()[-2000:]}")
    raise AssertionError(f"no {word!r} from the writer")


def _batches(root, tag) -> dict[int, int]:
    conn = sqlite3.connect(f"file:{root / 'catalog.db'}?mode=ro", uri=True)
    out: dict[int, int] = {}
    for (notes,) in conn.execute("SELECT notes FROM queries WHERE notes LIKE ?", [f"{tag}-%"]):
        i = int(notes.split("-")[1])
        out[i] = out.get(i, 0) + 1
    conn.close()
    return out


def _integrity(root):
    conn = sqlite3.connect(str(root / "catalog.db"))
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0], conn.execute("PRAGMA foreign_key_check").fetchall()
    finally:
        conn.close()


@pytest.mark.slow
def test_two_processes_write_one_project_and_nothing_is_lost(project, tmp_path):
    """A CLI run commits shards while another process adds queries and tags in a loop, and this
    process packs the project meanwhile; every row of both is there afterwards."""
    from inflq import integrity
    from inflq.project import Project
    from inflq.sharing import pack, unpack

    add_query(project, "default", "the first president of astrobia was", "zorald pfaff")
    root = project.root
    project.close()
    run = _spawn_run(root)
    writer = _spawn(tmp_path, "queries", root, "other", 12)
    packs = 0
    while run.poll() is None or writer.poll() is None:
        pack(root, tmp_path / "snapshot.tar")  # consistent while both write
        packs += 1
        time.sleep(0.2)
    out, err = run.communicate()
    assert run.returncode == 0, err[-2000:]
    assert writer.wait() == 0, writer.stderr.read()[-2000:]
    assert packs >= 1
    assert _integrity(root) == ("ok", [])
    assert _batches(root, "other") == {i: 5 for i in range(12)}
    p = Project.open(root)
    assert sorted(r["tag"] for r in p.db["sequence_tags"].rows) == sorted(f"other-{i}" for i in range(12))
    run_row = p.db["runs"].get(1)
    assert run_row["status"] == "done"
    assert p.db["run_shards"].count_where("run_id = 1") == 12
    assert p.db["results"].count_where("result_set_id = 1 AND side = 'top'") == 3
    assert integrity.check(p) == []
    p.close()
    # The last archive taken mid-write unpacks into a consistent project.
    unpack(tmp_path / "snapshot.tar", tmp_path / "unpacked")
    assert _integrity(tmp_path / "unpacked") == ("ok", [])
    q = Project.open(tmp_path / "unpacked")
    assert integrity.check(q) == []
    assert set(_batches(tmp_path / "unpacked", "other").values()) <= {5}
    q.close()


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0])
def test_writers_killed_at_random_points_leave_a_consistent_catalog(project, tmp_path, seed):
    from inflq import integrity
    from inflq.project import Project
    from inflq.reading import score_matrix
    from inflq.runs import RunSettings, run_investigation

    rng = random.Random(seed)
    add_query(project, "default", "the first president of astrobia was", "zorald pfaff")
    add_query(project, "default", "the capital city of astrobia is called", "velmora")
    settings = RunSettings(estimator="identity", filter="all", rank=4, shard_size=2, top_k=3, batch_size=2)
    reference = run_investigation(project, "default", settings)
    expected = score_matrix(project, "default", reference.result_set_id)
    root = project.root
    project.close()
    # Round 1: a run committing shards and a query writer, both killed mid-way.
    run = _spawn_run(root)
    writer = _spawn(tmp_path, "queries", root, "crash")
    _wait_line(writer, "committed")
    deadline = time.time() + 120
    while time.time() < deadline:
        conn = sqlite3.connect(f"file:{root / 'catalog.db'}?mode=ro", uri=True)
        shards = conn.execute("SELECT count(*) FROM run_shards WHERE run_id = 2").fetchone()[0]
        conn.close()
        if shards >= 1 or run.poll() is not None:
            break
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 0.6))
    finished_alone = run.poll() is not None
    for proc in (run, writer):
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    if finished_alone:
        assert run.returncode == 0, run.stderr.read()[-2000:]
    # Round 2: re-tokenizing the corpus while queries are added, killed at a random moment.
    rebuild = _spawn(tmp_path, "rebuild", root, "x")
    writer2 = _spawn(tmp_path, "queries", root, "crash2")
    _wait_line(rebuild, "rebuilt")
    _wait_line(writer2, "committed")
    time.sleep(rng.uniform(0.0, 1.0))
    for proc in (rebuild, writer2):
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()

    assert _integrity(root) == ("ok", [])
    for tag in ("crash", "crash2"):
        counts = _batches(root, tag)
        assert counts, "the writer committed something before it was killed"
        assert set(counts.values()) == {5}, counts  # every batch whole or absent
        assert sorted(counts) == list(range(len(counts)))  # committed in order, none lost in between
    p = Project.open(root)
    assert len(p.runtime.corpus) == p.db["sequences"].count == 24  # a killed rebuild leaves a usable store
    assert integrity.check(p) == []  # every artifact a committed row references verifies
    run_row = p.db["runs"].get(2)
    if run_row["status"] != "done":  # killed mid-run: resume finishes it with the same scores
        result = run_investigation(p, "default", resume=2)
        np.testing.assert_allclose(score_matrix(p, "default", result.result_set_id), expected, rtol=1e-5, atol=1e-6)
    assert integrity.check(p) == []
    p.close()


def test_a_rebuild_killed_between_its_renames_leaves_the_old_store_usable(project, monkeypatch):
    """The token store is swapped by renames only: killed after moving the old store aside and
    before moving the new one in, the next open puts the old store back (and a read-only opener
    reads it where it is); a completed rebuild leaves nothing aside."""
    from inflq import corpus as corpus_mod
    from inflq.corpus import CorpusStore

    folder = project.store_dir
    before = CorpusStore(folder)
    n, first = len(before), before.get(0).copy()
    del before
    real_replace = os.replace

    def killed_after_first(src, dst):  # the rebuild dies right after moving the old store aside
        real_replace(src, dst)
        if str(dst).endswith(".old"):
            raise KeyboardInterrupt

    monkeypatch.setattr(corpus_mod.os, "replace", killed_after_first)
    with pytest.raises(KeyboardInterrupt):
        project.runtime.rebuild_corpus()
    monkeypatch.setattr(corpus_mod.os, "replace", real_replace)
    assert not folder.exists() and folder.with_name(folder.name + ".old").exists()

    monkeypatch.setattr(corpus_mod.os, "replace", lambda *a: (_ for _ in ()).throw(PermissionError("read-only")))
    read_only = CorpusStore(folder)  # cannot move it back: reads it aside
    assert len(read_only) == n and np.array_equal(read_only.get(0), first)
    monkeypatch.setattr(corpus_mod.os, "replace", real_replace)

    store = CorpusStore(folder)  # moved back into place
    assert folder.exists() and not folder.with_name(folder.name + ".old").exists()
    assert len(store) == n and np.array_equal(store.get(0), first)

    project.runtime.rebuild_corpus()  # a whole rebuild: the new store in place, nothing aside
    assert len(CorpusStore(folder)) == n and not folder.with_name(folder.name + ".old").exists()
