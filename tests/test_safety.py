"""Opening a shared folder must execute nothing from it: no pickle anywhere in our code, tensors only
through safetensors (or ``torch.load(weights_only=True)``), and ``trust_remote_code`` never taken
from a folder. The scanner is tested on known-bad code too, so it cannot pass vacuously."""

from __future__ import annotations

import ast
import tarfile
from pathlib import Path

import pytest

from inflq.errors import InflqError

REPO = Path(__file__).resolve().parent.parent
SCANNED = [REPO / d for d in ("inflq", "plugins", "examples") if (REPO / d).is_dir()]
PICKLERS = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "joblib", "shelve", "marshal"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def scan_source(source: str, where: str = "<string>") -> list[str]:
    """Unsafe deserialisation or remote-code patterns in ``source``, one line each."""
    found = []
    tree = ast.parse(source, where)
    for node in ast.walk(tree):
        line = f"{where}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PICKLERS:
                    found.append(f"{line}: imports {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] in PICKLERS:
                found.append(f"{line}: imports from {node.module}")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            kw = {k.arg: k.value for k in node.keywords}
            if name.endswith("torch.load") and not _is_true(kw.get("weights_only")):
                found.append(f"{line}: torch.load without weights_only=True")
            if name in ("np.load", "numpy.load") and "allow_pickle" in kw and not (isinstance(kw["allow_pickle"], ast.Constant) and kw["allow_pickle"].value is False):
                found.append(f"{line}: np.load with allow_pickle")
            if name.split(".")[-1] in ("read_pickle", "to_pickle") or name.startswith(tuple(p + "." for p in PICKLERS)):
                found.append(f"{line}: calls {name}")
            if "trust_remote_code" in kw and not (isinstance(kw["trust_remote_code"], ast.Constant) and kw["trust_remote_code"].value is False):
                found.append(f"{line}: passes trust_remote_code")
            if any(k.arg is None for k in node.keywords) and name.endswith("from_pretrained"):
                found.append(f"{line}: from_pretrained(**kwargs) could smuggle trust_remote_code")
    return found


def _python_files() -> list[Path]:
    return sorted(p for d in SCANNED for p in d.rglob("*.py") if "__pycache__" not in p.parts)


def test_scanner_catches_known_bad_code():
    bad = """
import pickle
import cloudpickle
from dill import loads
import joblib
import torch, numpy as np
from transformers import AutoModel
torch.load("x.pt")
torch.load("x.pt", weights_only=False)
np.load("x.npy", allow_pickle=True)
joblib.load("m.joblib")
AutoModel.from_pretrained("m", trust_remote_code=True)
AutoModel.from_pretrained("m", **opts)
"""
    found = scan_source(bad)
    assert [int(f.split(":")[1]) for f in found] == [2, 3, 4, 5, 8, 9, 10, 11, 12, 13], found
    good = """
import torch, numpy as np
torch.load("x.pt", weights_only=True)
np.load("x.npy", allow_pickle=False)
np.load("x.npy")
AutoModel.from_pretrained("m", trust_remote_code=False)
"""
    assert scan_source(good) == []


def test_our_code_never_unpickles_or_runs_remote_code():
    files = _python_files()
    assert len(files) > 20, "the scan must cover the package"
    found = [hit for f in files for hit in scan_source(f.read_text(encoding="utf-8"), str(f.relative_to(REPO)))]
    assert found == []


def test_text_mentions_of_pickle_loaders_are_absent():
    """A belt to the AST scan's braces: dynamic imports by name (``importlib.import_module("pickle")``)."""
    for f in _python_files():
        text = f.read_text(encoding="utf-8")
        for needle in ('"pickle"', "'pickle'", '"cloudpickle"', '"dill"', "__reduce__"):
            assert needle not in text, f"{f}: {needle}"


@pytest.mark.parametrize(
    "toml",
    [
        '[model]\npath = "m"\ntrust_remote_code = true\n',
        '[project]\nname = "x"\n[model]\npath = "m"\n[model.kwargs]\ntrust_remote_code = true\n',
        '[[checkpoints]]\npath = "c"\ntrust_remote_code = true\n',
    ],
)
def test_trust_remote_code_in_a_project_config_is_refused(tmp_path, toml):
    import tomllib

    from inflq.project import Project, ProjectConfig

    with pytest.raises(InflqError, match="trust_remote_code"):
        ProjectConfig.from_toml(tomllib.loads(toml), "inflq.toml")
    (tmp_path / "inflq.toml").write_text(toml)
    with pytest.raises(InflqError, match="trust_remote_code"):
        Project.open(tmp_path)
    assert not (tmp_path / "catalog.db").exists()


def test_an_archive_asking_for_remote_code_is_refused(project, tmp_path):
    """Even with every checksum right, unpack refuses a config that asks for remote code."""
    import hashlib
    import io
    import json

    from inflq.sharing import MANIFEST, pack, unpack

    project.close()
    good = pack(project.root, tmp_path / "a.tar")
    with tarfile.open(good.path) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    manifest = json.loads(dict((m.name, d) for m, d in members)[MANIFEST])
    evil = dict((m.name, d) for m, d in members)["inflq.toml"] + b"\n[extra]\ntrust_remote_code = true\n"
    for f in manifest["files"]:
        if f["path"] == "inflq.toml":
            f["size"], f["sha256"] = len(evil), hashlib.sha256(evil).hexdigest()
    with tarfile.open(tmp_path / "b.tar", "w") as tf:
        for m, d in members:
            d = evil if m.name == "inflq.toml" else json.dumps(manifest).encode() if m.name == MANIFEST else d
            m.size = len(d)
            tf.addfile(m, io.BytesIO(d))
    with pytest.raises(InflqError, match="trust_remote_code"):
        unpack(tmp_path / "b.tar", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    unpack(good.path, tmp_path / "ok")  # the untampered one unpacks
    assert (tmp_path / "ok" / "catalog.db").is_file()
