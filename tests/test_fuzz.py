"""Bad input, tried systematically (hypothesis): corpus files, query files, inflq.toml configs and
archive manifests. Every failure is an InflqError with a one-line message (from the CLI: one
``Error:`` line, no traceback), and the catalog is unchanged afterwards. The number of generated
cases per property is printed at the end of the module."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import sqlite3
import string
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import make_model_dir, write_corpus
from inflq.errors import InflqError

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], database=None)
RAN: Counter = Counter()


@pytest.fixture(scope="module", autouse=True)
def report_counts(request):
    yield
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    line = "hypothesis cases run: " + ", ".join(f"{k} {v}" for k, v in sorted(RAN.items())) + f" (total {sum(RAN.values())})"
    capman = request.config.pluginmanager.getplugin("capturemanager")
    if reporter is not None and capman is not None:
        with capman.global_and_fixture_disabled():
            reporter.write_line("\n" + line)
    else:
        print(line)


@pytest.fixture(scope="module")
def proj(tmp_path_factory):
    from inflq.project import Project

    d = tmp_path_factory.mktemp("fuzz")
    model = make_model_dir(d / "model", "gpt2")
    corpus = write_corpus(d / "corpus.jsonl")
    p = Project.init(d / "proj", model, corpus)
    p.close()
    return d / "proj"


def _dump(root: Path) -> dict:
    conn = sqlite3.connect(f"file:{root / 'catalog.db'}?mode=ro", uri=True)
    tables = [t for (t,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'") if t != "file_hashes"]
    out = {t: sorted(map(repr, conn.execute(f"SELECT * FROM [{t}]").fetchall())) for t in tables}
    conn.close()
    return out


def _one_line(exc: BaseException) -> None:
    assert isinstance(exc, InflqError), f"{type(exc).__name__} escaped: {exc!r}"
    msg = str(exc)
    assert msg and "\n" not in msg and "Traceback" not in msg, msg


def _cli(*args) -> tuple[int, str, str]:
    from inflq.testing import cli

    got = cli(*args)
    return got.code, got.out, got.err


def _assert_cli_error(code: int, err: str) -> None:
    assert code == 1, (code, err)
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in err, err


# -- values that break parsers ------------------------------------------------------------------
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=30))
json_values = st.recursive(json_scalars, lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=8), c, max_size=3)), max_leaves=8)
weird_ids = st.one_of(st.text(max_size=20), st.integers(), st.floats(allow_nan=True), st.none(), st.lists(st.integers(), max_size=2), st.just(""), st.just("d0"), st.just("../../etc"))
good_text = st.lists(st.sampled_from(["the", "first", "president", "of", "astrobia", "was", "zorald", "pfaff", "river", "town", "cat", "dog", "."]), min_size=0, max_size=12).map(" ".join)


@st.composite
def corpus_line(draw) -> bytes:
    kind = draw(st.sampled_from(["good", "bad utf8", "huge", "empty", "wrong type", "not json", "array", "weird id"]))
    if kind == "good":
        return json.dumps({"id": draw(st.text(string.ascii_letters, min_size=1, max_size=6)), "text": draw(good_text)}).encode()
    if kind == "bad utf8":
        return b'{"id": "x", "text": "caf\xc3\x28 \xff\xfe"}'
    if kind == "huge":
        return json.dumps({"id": draw(st.text(string.ascii_letters, min_size=1, max_size=6)), "text": "the river " * draw(st.integers(500, 4000))}).encode()
    if kind == "empty":
        return draw(st.sampled_from([b"", b"   ", b"\t", b"\r"]))
    if kind == "wrong type":
        return json.dumps({"id": "w", "text": draw(json_values.filter(lambda v: not isinstance(v, str)))}).encode()
    if kind == "not json":
        return draw(st.binary(max_size=40)).replace(b"\n", b" ")
    if kind == "array":
        return json.dumps(draw(st.lists(json_scalars, max_size=3))).encode()
    return json.dumps({"id": draw(weird_ids), "text": draw(good_text)}, default=str).encode()


@settings(FUZZ, max_examples=40)
@given(lines=st.lists(corpus_line(), max_size=6))
def test_fuzz_corpus_files(proj, lines):
    from inflq.project import Project

    RAN["corpus files"] += 1
    p = Project.open(proj)
    before = _dump(proj)
    store_before = (proj / "corpus" / "store.json").read_bytes()
    original = p.corpus_path.read_bytes()
    try:
        p.corpus_path.write_bytes(b"\n".join(lines))
        try:
            p.runtime.rebuild_corpus()
        except Exception as exc:
            _one_line(exc)
            assert _dump(proj) == before
            assert (proj / "corpus" / "store.json").read_bytes() == store_before
            assert not (proj / "corpus.tmp").exists()
        else:
            assert len(p.runtime.corpus) == p.db["sequences"].count > 0
    finally:
        p.corpus_path.write_bytes(original)
        if _dump(proj) != before:
            p.runtime.rebuild_corpus()
        p.close()


@st.composite
def query_line(draw) -> bytes:
    kind = draw(st.sampled_from(["good", "bad utf8", "wrong type", "not json", "array", "missing", "empty", "huge"]))
    if kind == "good":
        return json.dumps({"prompt": draw(good_text.filter(bool)), "completion": draw(good_text.filter(bool)), "tags": draw(json_values)}).encode()
    if kind == "bad utf8":
        return b'{"prompt": "\xff\xfe", "completion": "x"}'
    if kind == "wrong type":
        return json.dumps({"prompt": draw(json_values), "completion": draw(json_values), "chat": draw(json_values)}).encode()
    if kind == "not json":
        return draw(st.binary(max_size=40)).replace(b"\n", b" ")
    if kind == "array":
        return json.dumps(draw(st.lists(json_scalars, max_size=3))).encode()
    if kind == "missing":
        return json.dumps({"prompt": "the river"}).encode()
    if kind == "huge":
        return json.dumps({"prompt": "the river " * draw(st.integers(100, 5000)), "completion": "town"}).encode()
    return b""


@FUZZ
@given(lines=st.lists(query_line(), min_size=1, max_size=6))
def test_fuzz_query_files(proj, tmp_path_factory, lines):
    RAN["query files"] += 1
    f = tmp_path_factory.mktemp("q") / "queries.jsonl"
    f.write_bytes(b"\n".join(lines))
    before = _dump(proj)
    code, out, err = _cli("query", "add", proj, "--file", f)
    if code != 0:
        _assert_cli_error(code, err)
        assert _dump(proj) == before
    else:
        assert "added" in out


toml_values = st.one_of(st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False), st.text(max_size=20), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(string.ascii_letters, min_size=1, max_size=6), st.integers(), max_size=2))
section = st.dictionaries(st.sampled_from(["name", "seed", "path", "device", "dtype", "modules", "format", "text_field", "id_field", "max_length", "add_bos", "append_eos", "trust_remote_code", "x"]), toml_values, max_size=5)


@FUZZ
@given(
    doc=st.one_of(
        st.dictionaries(st.sampled_from(["project", "model", "corpus", "tokenization", "checkpoints", "other"]), st.one_of(section, toml_values), max_size=5).map(lambda d: tomli_w.dumps(d).encode()),
        st.binary(max_size=200),
        st.text(max_size=200).map(str.encode),
    )
)
def test_fuzz_configs(proj, doc):
    RAN["inflq.toml configs"] += 1
    cfg = proj / "inflq.toml"
    original = cfg.read_bytes()
    before = _dump(proj)
    try:
        cfg.write_bytes(doc)
        code, _, err = _cli("runs", proj)
        if code != 0:
            _assert_cli_error(code, err)
        from inflq.project import Project

        try:
            Project.open(proj).close()
        except Exception as exc:
            _one_line(exc)
        assert _dump(proj) == before
    finally:
        cfg.write_bytes(original)


@pytest.fixture(scope="module")
def packed(proj, tmp_path_factory):
    from inflq.sharing import MANIFEST, pack

    path = tmp_path_factory.mktemp("packed") / "p.tar"
    pack(proj, path)
    with tarfile.open(path) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    manifest = json.loads(dict((m.name, d) for m, d in members)[MANIFEST])
    return members, manifest


bad_paths = st.one_of(st.text(max_size=30), st.sampled_from(["../x", "/etc/passwd", "a/../../b", "C:/x", "a\\b", "", ".", "a//b", "a/./b", "x\x00y", "catalog.db"]))


@st.composite
def mutated_manifest(draw, manifest):
    m = json.loads(json.dumps(manifest))
    kind = draw(st.sampled_from(["value", "file field", "path", "drop key", "add file", "duplicate", "format", "raw"]))
    if kind == "value":
        m[draw(st.sampled_from(sorted(m)))] = draw(json_values)
    elif kind == "file field":
        f = draw(st.sampled_from(m["files"]))
        f[draw(st.sampled_from(["path", "size", "sha256"]))] = draw(json_values)
    elif kind == "path":
        draw(st.sampled_from(m["files"]))["path"] = draw(bad_paths)
    elif kind == "drop key":
        del m[draw(st.sampled_from(sorted(m)))]
    elif kind == "add file":
        m["files"].append({"path": draw(bad_paths), "size": draw(st.integers(-5, 10)), "sha256": draw(st.sampled_from(["0" * 64, "x"]))})
    elif kind == "duplicate":
        m["files"].append(dict(draw(st.sampled_from(m["files"]))))
    elif kind == "format":
        m["format_version"] = draw(st.one_of(st.integers(), st.text(max_size=3), st.booleans()))
    else:
        return draw(st.binary(max_size=100))
    return json.dumps(m).encode()


@FUZZ
@given(data=st.data())
def test_fuzz_archive_manifests(packed, tmp_path_factory, data):
    from inflq.sharing import MANIFEST, parse_manifest, unpack

    RAN["archive manifests"] += 1
    members, manifest = packed
    raw = data.draw(mutated_manifest(manifest))
    try:
        parse_manifest(raw)
    except Exception as exc:
        _one_line(exc)
    d = tmp_path_factory.mktemp("m")
    with tarfile.open(d / "a.tar", "w", format=tarfile.PAX_FORMAT) as tf:
        for m, payload in members:
            payload = raw if m.name == MANIFEST else payload
            m.size = len(payload)
            tf.addfile(m, io.BytesIO(payload))
    try:
        unpack(d / "a.tar", d / "out")
    except Exception as exc:
        _one_line(exc)
        assert not (d / "out").exists()
        assert [x.name for x in d.iterdir()] == ["a.tar"]  # no temporary folder left behind
    else:  # only a manifest that still describes the archive exactly may pass
        files = {f["path"]: f for f in json.loads(raw)["files"]}
        for m, payload in members:
            if m.name != MANIFEST:
                assert files[m.name]["sha256"] == hashlib.sha256(payload).hexdigest()
                assert (d / "out" / m.name).read_bytes() == payload
        shutil.rmtree(d / "out")


def test_counts_were_reported():
    assert min(RAN.values(), default=0) >= 10 and len(RAN) == 4, RAN
