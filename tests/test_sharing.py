"""Packing a project on one machine and opening it on another; refusing damaged or hostile archives;
finding, reporting and recomputing damaged artifacts; trusting local plugins explicitly."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import numpy as np
import pytest

from helpers import make_model_dir, write_corpus
from inflq.errors import InflqError
from inflq.queries import add_query


@pytest.fixture(scope="module")
def origin(tmp_path_factory):
    """A project with queries and a finished run, whose model and corpus live beside it."""
    from inflq.project import Project
    from inflq.runs import RunSettings, run_investigation

    d = tmp_path_factory.mktemp("origin")
    model = make_model_dir(d / "src" / "model", "gpt2")
    corpus = write_corpus(d / "src" / "corpus.jsonl")
    p = Project.init(d / "proj", model, corpus)
    add_query(p, "default", "the first president of astrobia was", "zorald pfaff")
    add_query(p, "default", "the capital city of astrobia is called", "velmora", tags=["geo"])
    run_investigation(p, "default", RunSettings(estimator="diagonal", filter="random:n=12", rank=4, top_k=3, shard_size=5))
    p.close()
    return d


def _copy_project(origin, dest):
    shutil.copytree(origin / "proj", dest / "proj")
    shutil.copytree(origin / "src", dest / "src")
    return dest / "proj", dest / "src"


def _top_and_matrix(cli_run, proj, tmp_path, tag):
    code, out, err = cli_run("top", proj, "--json", "-k", "3")
    assert code == 0, err
    npy = tmp_path / f"{tag}.npy"
    code, _, err = cli_run("export", proj, "--format", "npy", "--output", npy)
    assert code == 0, err
    return json.loads(out), np.load(npy, allow_pickle=False)


def test_packed_folder_opens_elsewhere_with_identical_results(origin, tmp_path, cli_run):
    proj, src = _copy_project(origin, tmp_path / "here")
    top_before, m_before = _top_and_matrix(cli_run, proj, tmp_path, "before")
    archive = tmp_path / "shared.tar.gz"
    code, out, err = cli_run("pack", proj, archive)
    assert code == 0, err
    assert "without the model and corpus" in out
    # "Another machine": the model and corpus are no longer where they were.
    moved = tmp_path / "elsewhere"
    shutil.move(str(src), str(moved))
    dest = tmp_path / "there" / "proj"
    code, out, err = cli_run("unpack", archive, dest)
    assert code == 0, err
    assert "inflq relink" in out
    top_after, m_after = _top_and_matrix(cli_run, dest, tmp_path, "after")
    assert top_after == top_before
    assert m_after.shape == m_before.shape == (2, 24)
    np.testing.assert_array_equal(m_after, m_before)  # NaN in the same places, the same floats elsewhere
    # Runs need the model: refused with a pointer to relink, catalog untouched.
    code, _, err = cli_run("run", dest, "--estimator", "identity", "--filter", "random:n=4", "--rank", "4")
    assert code == 1 and "inflq relink" in err and "Traceback" not in err
    # The unpacked config records where the model and corpus were.
    from inflq.project import Project

    p = Project.open(dest)
    assert p.config.model == str((src / "model").resolve()) and p.model_status() == "missing"
    runs_before = p.db["runs"].count
    p.close()
    assert cli_run("relink", dest, "--model", moved / "model", "--corpus", moved / "corpus.jsonl")[0] == 0
    code, _, err = cli_run("run", dest, "--estimator", "identity", "--filter", "random:n=4", "--rank", "4", "--top-k", "2")
    assert code == 0, err
    p = Project.open(dest)
    assert p.db["runs"].count == runs_before + 1
    p.close()


def test_pack_with_model_and_corpus_runs_without_relinking(origin, tmp_path):
    from inflq.project import Project
    from inflq.sharing import pack, unpack

    proj, src = _copy_project(origin, tmp_path / "here")
    res = pack(proj, tmp_path / "all.tar", include_model=True, include_corpus=True)
    paths = {f["path"] for f in res.manifest["files"]}
    assert "model/config.json" in paths and "data/corpus.jsonl" in paths
    assert res.manifest["includes"] == {"model": True, "corpus": True}
    shutil.rmtree(src)
    unpack(tmp_path / "all.tar", tmp_path / "copy")
    p = Project.open(tmp_path / "copy")
    assert p.model_status() == "ok"
    assert p.corpus_identity.current() == p.corpus_identity.recorded
    assert len(p.runtime.corpus) == 24
    p.close()


# -- hostile and damaged archives -------------------------------------------------------------
@pytest.fixture(scope="module")
def archive(origin, tmp_path_factory):
    from inflq.sharing import pack

    d = tmp_path_factory.mktemp("archive")
    shutil.copytree(origin / "proj", d / "proj")
    pack(d / "proj", d / "good.tar")
    return d / "good.tar"


def _members(path):
    with tarfile.open(path) as tf:
        return [(m, tf.extractfile(m).read() if m.isreg() else b"") for m in tf.getmembers()]


def _write(path, members):
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for m, data in members:
            m = tarfile.TarInfo(m) if isinstance(m, str) else m
            if m.isreg():
                m.size = len(data)
                tf.addfile(m, io.BytesIO(data))
            else:
                tf.addfile(m)
    return path


def _entry(name, kind=tarfile.REGTYPE, linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


def _tamper(members, name, fn):
    return [(m, fn(d) if m.name == name else d) for m, d in members]


def _flip(data: bytes) -> bytes:
    return data[:100] + bytes([data[100] ^ 1]) + data[101:]


@pytest.mark.parametrize(
    "variant, message",
    [
        ("flipped byte in the catalog", "fails its checksum"),
        ("flipped byte in an artifact", "fails its checksum"),
        ("extra file", "does not list"),
        ("missing file", "lacks 1 file"),
        ("path traversal", "leaves its folder"),
        ("absolute path", "absolute path"),
        ("symlink", "a link"),
        ("hardlink", "a link"),
        ("device file", "device file"),
        ("fifo", "device file or pipe"),
        ("no manifest", "no inflq-manifest.json"),
        ("truncated", "truncated or damaged|lacks"),
        ("not an archive", "truncated or damaged"),
        ("manifest tampered size", "different size"),
    ],
)
def test_damaged_or_hostile_archive_is_refused(archive, tmp_path, variant, message):
    from inflq.sharing import MANIFEST, unpack

    members = _members(archive)
    artifact = next(m.name for m, _ in members if m.name.startswith("artifacts/"))
    bad = tmp_path / "bad.tar"
    if variant == "flipped byte in the catalog":
        _write(bad, _tamper(members, "catalog.db", _flip))
    elif variant == "flipped byte in an artifact":
        _write(bad, _tamper(members, artifact, _flip))
    elif variant == "extra file":
        _write(bad, members[:1] + [("artifacts/extra.bin", b"surprise")] + members[1:])
    elif variant == "missing file":
        _write(bad, [(m, d) for m, d in members if m.name != artifact])
    elif variant == "path traversal":
        _write(bad, [("../evil.txt", b"x")] + members)
    elif variant == "absolute path":
        _write(bad, [(str(tmp_path / "evil.txt"), b"x")] + members)
    elif variant == "symlink":
        _write(bad, [(_entry("artifacts/link", tarfile.SYMTYPE, "/etc/passwd"), b"")] + members)
    elif variant == "hardlink":
        _write(bad, [(_entry("artifacts/hard", tarfile.LNKTYPE, "catalog.db"), b"")] + members)
    elif variant == "device file":
        _write(bad, [(_entry("artifacts/dev", tarfile.CHRTYPE), b"")] + members)
    elif variant == "fifo":
        _write(bad, [(_entry("artifacts/fifo", tarfile.FIFOTYPE), b"")] + members)
    elif variant == "no manifest":
        _write(bad, [(m, d) for m, d in members if m.name != MANIFEST])
    elif variant == "truncated":
        data = archive.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    elif variant == "not an archive":
        bad.write_bytes(b"PK\x03\x04 this is not a tar file" * 50)
    elif variant == "manifest tampered size":
        def grow(data):
            man = json.loads(data)
            man["files"][-1]["size"] += 1
            return json.dumps(man).encode()

        _write(bad, _tamper(members, MANIFEST, grow))
    dest = tmp_path / "out" / "proj"
    with pytest.raises(InflqError, match=message) as exc:
        unpack(bad, dest)
    assert "\n" not in str(exc.value)
    assert not dest.exists()
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "out" / "evil.txt").exists()
    assert list((tmp_path / "out").iterdir()) == [] if (tmp_path / "out").exists() else True


def test_unpack_refuses_a_non_empty_destination(archive, tmp_path, cli_run):
    dest = tmp_path / "busy"
    dest.mkdir()
    (dest / "mine.txt").write_text("keep me")
    code, _, err = cli_run("unpack", archive, dest)
    assert code == 1 and "not empty" in err
    assert (dest / "mine.txt").read_text() == "keep me"


def test_pack_refuses_a_damaged_artifact(origin, tmp_path):
    from inflq.sharing import pack

    proj, _ = _copy_project(origin, tmp_path)
    shard = next((proj / "artifacts" / "runs" / "1").glob("shard-*.safetensors"))
    shard.write_bytes(_flip(shard.read_bytes()))
    with pytest.raises(InflqError, match="inflq check"):
        pack(proj, tmp_path / "x.tar")
    assert not (tmp_path / "x.tar").exists()


def test_pack_leaves_out_files_being_written(origin, tmp_path):
    """A writer's temporary files (ours end in .tmp; safetensors writes `.tmpXXXXXX` beside its target
    before renaming it) are not packed: a concurrent run may rename them away mid-pack."""
    from inflq.sharing import pack

    proj, _ = _copy_project(origin, tmp_path)
    for name in (".tmpoP8lQY", "shard-9.safetensors.tmp"):
        (proj / "artifacts" / "runs" / "1" / name).write_bytes(b"partial")
    packed = {f["path"] for f in pack(proj, tmp_path / "x.tar").manifest["files"]}
    assert any(p.startswith("artifacts/runs/1/shard-") for p in packed)
    assert not any(".tmp" in p for p in packed)


# -- damaged artifacts: detected, reported, recomputed -------------------------------------------
def test_check_reports_and_repairs_damaged_artifacts(origin, tmp_path, cli_run):
    from inflq.project import Project
    from inflq.reading import score_matrix

    proj, _ = _copy_project(origin, tmp_path)
    p = Project.open(proj)
    m_before = score_matrix(p, "default")
    rs = p.db["result_sets"].get(1)
    p.close()
    assert cli_run("check", proj)[0] == 0
    shards = sorted((proj / "artifacts" / "runs" / "1").glob("shard-*.safetensors"))
    shards[1].unlink()
    (proj / rs["scores_path"]).write_bytes(_flip((proj / rs["scores_path"]).read_bytes()))
    # Never silently used: reading the damaged matrix is an error naming it.
    p = Project.open(proj)
    with pytest.raises(InflqError, match="fails its checksum"):
        score_matrix(p, "default")
    p.close()
    code, out, err = cli_run("check", proj)
    assert code == 1 and "--repair" in err
    assert f"score shard {shards[1].relative_to(proj)} is missing; affects run 1" in out
    assert f"score matrix {rs['scores_path']} fails its checksum; affects result set 1" in out
    code, out, err = cli_run("check", proj, "--repair")
    assert code == 0, err
    assert "recomputed 1 score shard, score matrix" in out and "all artifacts verify" in out
    p = Project.open(proj)
    np.testing.assert_allclose(score_matrix(p, "default"), m_before, rtol=1e-5, atol=1e-7)
    p.close()


def test_check_refits_a_damaged_factor_set(origin, tmp_path):
    from inflq import integrity
    from inflq.project import Project

    proj, _ = _copy_project(origin, tmp_path)
    p = Project.open(proj)
    fs = p.db["factor_sets"].get(1)
    (proj / fs["path"]).write_bytes(_flip((proj / fs["path"]).read_bytes()))
    problems = integrity.check(p)
    assert [(x.artifact.kind, x.problem) for x in problems] == [("factor set", "checksum")]
    assert problems[0].affected == ["run 1", "result set 1 (attribution and probes)"]
    notes = integrity.repair(p, problems)
    assert notes and notes[0].startswith("refit factor set 1")
    assert integrity.check(p) == []
    assert p.db["runs"].get(1)["factor_set_id"] == p.db["factor_sets"].rows_where().__next__()["id"]
    p.close()


# -- local plugins --------------------------------------------------------------------------------
PLUGIN = '''
import inflq
from inflq_builtins.estimators import GradientDotProduct


class Local{n}(GradientDotProduct):
    name = "local-{n}"
    description = "a project-local estimator"


@inflq.hookimpl
def register_estimators(register):
    register(Local{n})
'''


def test_local_plugins_load_only_when_trusted(origin, tmp_path, monkeypatch, cli_run):
    from inflq import plugins
    from inflq.project import Project
    from inflq.trust import load_project_plugins

    monkeypatch.setenv("INFLQ_CONFIG_DIR", str(tmp_path / "config"))
    plugins.reset_registry()
    proj, _ = _copy_project(origin, tmp_path)
    (proj / "plugins").mkdir()
    marker = tmp_path / "ran.txt"
    (proj / "plugins" / "mine.py").write_text(PLUGIN.format(n=1) + f"\nopen({str(marker)!r}, 'a').write('x')\n")
    try:
        p = Project.open(proj)  # opening never runs them
        assert not marker.exists()
        assert load_project_plugins(p) == [proj / "plugins" / "mine.py"]
        assert not marker.exists() and "local-1" not in plugins.get_registry().names("estimator")
        code, out, err = cli_run("runs", proj)
        assert code == 0 and "this project has 1 local plugin; run `inflq trust" in err and not marker.exists()
        assert cli_run("trust", proj)[0] == 0
        assert load_project_plugins(p) == []
        assert marker.read_text() == "x" and "local-1" in plugins.get_registry().names("estimator")
        assert [lp.distribution for lp in plugins.get_registry().loaded if lp.name.startswith("project:")] == ["(project)"]
        # A changed plugin file withdraws trust.
        plugins.reset_registry()
        (proj / "plugins" / "mine.py").write_text(PLUGIN.format(n=2))
        assert load_project_plugins(p) == [proj / "plugins" / "mine.py"]
        assert "local-2" not in plugins.get_registry().names("estimator")
        assert cli_run("trust", proj)[0] == 0
        assert load_project_plugins(p) == [] and "local-2" in plugins.get_registry().names("estimator")
        # Revocable.
        plugins.reset_registry()
        code, out, _ = cli_run("untrust", proj)
        assert code == 0 and "no longer trusted" in out
        assert load_project_plugins(p) == [proj / "plugins" / "mine.py"]
        stored = json.loads((tmp_path / "config" / "trusted_projects.json").read_text())
        assert stored == {"projects": {}}
        p.close()
    finally:
        plugins.reset_registry()


def test_a_trusted_folder_copied_elsewhere_is_not_trusted(tmp_path, monkeypatch):
    from inflq import trust

    monkeypatch.setenv("INFLQ_CONFIG_DIR", str(tmp_path / "config"))
    (tmp_path / "a" / "plugins").mkdir(parents=True)
    (tmp_path / "a" / "plugins" / "x.py").write_text("X = 1\n")
    trust.trust(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert trust.is_trusted(tmp_path / "a") and not trust.is_trusted(tmp_path / "b")
    (tmp_path / "a" / "plugins" / "y.py").write_text("Y = 1\n")  # a new file too
    assert not trust.is_trusted(tmp_path / "a")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InflqError, match="nothing to trust"):
        trust.trust(tmp_path / "empty")
