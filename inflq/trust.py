"""Local plugins in a project folder (``PROJECT/plugins/*.py``) run only after the user trusts them.

Trust is remembered in a user-level JSON file (``trusted_projects.json`` in the platformdirs user
config folder; ``INFLQ_CONFIG_DIR`` overrides it) per resolved folder path *and* content hash of
the plugin files: editing, adding or removing a plugin file withdraws trust until the user trusts
the folder again. Opening a project never loads its plugins; :func:`load_project_plugins` does,
and only when trusted. What is executed is exactly the bytes that were hashed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import time
import uuid
from pathlib import Path

from .errors import InflqError

TRUST_FILE = "trusted_projects.json"
PLUGINS_DIR = "plugins"


def config_dir() -> Path:
    """The user-level inflq configuration folder (``INFLQ_CONFIG_DIR`` overrides it)."""
    override = os.environ.get("INFLQ_CONFIG_DIR")
    if override:
        return Path(override)
    import platformdirs

    return Path(platformdirs.user_config_dir("inflq", appauthor=False))


def plugin_files(root: Path) -> list[Path]:
    folder = Path(root) / PLUGINS_DIR
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.py") if p.is_file())


def _read_plugins(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in plugin_files(root)}


def content_hash(sources: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for name in sorted(sources):
        h.update(name.encode() + b"\0" + hashlib.sha256(sources[name]).hexdigest().encode() + b"\n")
    return h.hexdigest()


def _key(root: Path) -> str:
    return str(Path(root).resolve())


def _load_store() -> dict:
    path = config_dir() / TRUST_FILE
    if not path.exists():
        return {"projects": {}}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise InflqError(f"the trust file {path} is damaged; delete it (every project folder becomes untrusted)") from None
    if not isinstance(data, dict) or not isinstance(data.get("projects"), dict):
        raise InflqError(f"the trust file {path} is damaged; delete it (every project folder becomes untrusted)")
    return data


def _save_store(data: dict) -> None:
    folder = config_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / TRUST_FILE
    tmp = folder / f".{TRUST_FILE}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def trust(root: Path | str) -> list[str]:
    """Trust the current plugin files of the project folder ``root``; returns their names."""
    root = Path(root)
    if not root.is_dir():
        raise InflqError(f"project folder {root} does not exist")
    sources = _read_plugins(root)
    if not sources:
        raise InflqError(f"{root} has no local plugins ({PLUGINS_DIR}/*.py); there is nothing to trust")
    data = _load_store()
    data["projects"][_key(root)] = {"hash": content_hash(sources), "files": sorted(sources), "trusted_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    _save_store(data)
    return sorted(sources)


def untrust(root: Path | str) -> bool:
    """Withdraw trust from a folder; returns whether it was trusted."""
    data = _load_store()
    found = data["projects"].pop(_key(Path(root)), None) is not None
    if found:
        _save_store(data)
    return found


def is_trusted(root: Path | str, sources: dict[str, bytes] | None = None) -> bool:
    root = Path(root)
    sources = _read_plugins(root) if sources is None else sources
    entry = _load_store()["projects"].get(_key(root))
    return bool(entry) and isinstance(entry, dict) and entry.get("hash") == content_hash(sources)


def load_project_plugins(project) -> list[Path]:
    """Register the project's local plugins if the user trusts the folder as it is now.

    Returns the plugin files left unloaded because the folder is not trusted (empty when there
    are none, or when they were loaded), so a client can say how to enable them."""
    from .plugins import LoadedPlugin, _one_line, get_registry

    root = Path(project.root)
    files = plugin_files(root)
    if not files:
        return []
    sources = {p.name: p.read_bytes() for p in files}
    if not is_trusted(root, sources):
        return files
    reg = get_registry()
    digest = content_hash(sources)[:12]
    for path in files:
        name = f"project:{root.resolve().name}/{path.stem}@{digest}"
        if reg.pm.get_plugin(name) is not None:
            continue
        try:
            spec = importlib.util.spec_from_file_location(f"inflq_project_plugins.{digest}.{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            # Execute the very bytes that were hashed, not whatever is on disk a moment later.
            exec(compile(sources[path.name], str(path), "exec"), module.__dict__)
            reg.register(module, name=name, distribution="(project)")
        except Exception as exc:  # a broken local plugin is reported, not fatal
            reg.loaded.append(LoadedPlugin(name, str(path), "(project)", _one_line(exc)))
    return []


def untrusted_notice(project, files: list[Path]) -> str:
    n = len(files)
    return f"this project has {n} local plugin{'s' if n != 1 else ''}; run `inflq trust {project.root}` to enable {'them' if n != 1 else 'it'}"
