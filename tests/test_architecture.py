"""Guards for the shape of the house (docs/architecture.md): they fail when a change strays from it.

- Only ``inflq/catalog/`` knows the core's table names or runs SQL.
- The plugin contract is ``inflq.__all__``: third-party-shaped plugins (examples/, the test plugins)
  import nothing else (and :mod:`inflq.testing` in their tests); the built-in plugins import the
  contract and :mod:`inflq._builtins_api` (unstable, what they need beyond it), and touch no core
  table. The package root imports nothing from the CLI or the TUI.
- No import circles among inflq's modules.
- The headless core never imports Textual.

The scans read the source (AST), so they see code that a test run might never execute.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import inflq
from inflq import catalog

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "inflq"
BUILTINS = ROOT / "plugins" / "inflq_builtins"
# Plugins shaped as a third party's: the examples (package and tests) and the suite's own.
THIRD_PARTY = [ROOT / "examples" / "inflq-cosine", ROOT / "examples" / "inflq-plugin-template", ROOT / "tests" / "trak_lite.py"]

SQL = re.compile(
    r"^\s*(SELECT\s.*\bFROM\s|SELECT\s+(max|min|count|coalesce|1)\b|INSERT\s+(OR\s+\w+\s+)?INTO\s|UPDATE\s+\w+\s+SET\s|DELETE\s+FROM\s"
    r"|PRAGMA\s+\w+|CREATE\s+(TABLE|INDEX|UNIQUE|VIEW|TRIGGER)\s|DROP\s+(TABLE|INDEX)\s|ALTER\s+TABLE\s|BEGIN(\s+\w+)?\s*$|COMMIT\s*$|VACUUM\b)",
    re.I | re.S,
)
# sqlite-utils' Table and Database methods that read or write rows.
DB_METHODS = {
    "execute", "executescript", "query", "rows_where", "count_where", "insert", "insert_all", "upsert",
    "upsert_all", "delete_where", "table_names", "get", "update", "delete", "lookup", "create_table",
}


def _py_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _is_db(node: ast.AST) -> bool:
    """``db``, ``self.db``, ``project.db``, ``p.db``, ``conn``...: an expression naming a database."""
    name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else ""
    return name in {"db", "conn", "_db"} or name.endswith("_db")


def catalog_uses(tree: ast.AST) -> list[tuple[int, str]]:
    """Places in ``tree`` that touch the catalog directly: ``db[...]``, ``db.execute(...)`` and
    friends, and string constants that are SQL statements."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and _is_db(node.value):
            found.append((node.lineno, f"{ast.unparse(node)[:60]}"))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in DB_METHODS and _is_db(node.func.value):
            found.append((node.lineno, f"{ast.unparse(node.func)}(...)"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and SQL.match(node.value):
            found.append((node.lineno, f"SQL {node.value.strip()[:50]!r}"))
    return found


def test_only_the_catalog_package_touches_the_catalog():
    offenders = []
    for path in _py_files(CORE):
        if path.is_relative_to(CORE / "catalog"):
            continue
        for line, what in catalog_uses(ast.parse(path.read_text(), str(path))):
            offenders.append(f"{_rel(path)}:{line}: {what}")
    assert not offenders, "SQL outside inflq/catalog/ (call a catalog function instead):\n" + "\n".join(offenders)


def test_the_guard_sees_sql():
    """The scan above is only as good as what it recognises: it must catch each form."""
    src = (
        "def f(project, db):\n"
        "    project.db['runs'].get(1)\n"
        "    db.execute('select 1')\n"
        "    list(self.db.query(q))\n"
        "    conn.execute(x)\n"
        "    s = 'DELETE FROM results WHERE id = ?'\n"
    )
    assert sorted(line for line, _ in catalog_uses(ast.parse(src))) == [2, 3, 3, 4, 5, 6]
    assert catalog_uses(ast.parse("x = {'a': 1}['a']\nd.get(1)\nprint('selected items')\n")) == []


def _core_tables(tmp_path: Path) -> set[str]:
    db = catalog.connect(tmp_path / "c.db", create=True)
    try:
        return set(db.table_names()) - {"_sqlite_migrations"}
    finally:
        db.conn.close()


def test_builtin_plugins_touch_no_core_table(tmp_path):
    core = _core_tables(tmp_path)
    offenders = []
    for path in _py_files(BUILTINS):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Subscript) and _is_db(node.value):
                key = node.slice.value if isinstance(node.slice, ast.Constant) else None
                if key in core:
                    offenders.append(f"{_rel(path)}:{node.lineno}: {ast.unparse(node)}")
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and SQL.match(node.value):
                words = set(re.findall(r"[A-Za-z_]+", node.value))
                if words & core:
                    offenders.append(f"{_rel(path)}:{node.lineno}: SQL on {sorted(words & core)}")
    assert not offenders, "built-in plugins must use catalog functions for core tables:\n" + "\n".join(offenders)


def private_inflq_imports(tree: ast.AST, public: set[str], modules: dict[str, set[str]] | None = None) -> list[tuple[int, str]]:
    """Imports in ``tree`` of anything but the names ``inflq/__init__.py`` exports (``public``) and,
    for each module that ``modules`` names, the names given there (``{"inflq.testing": {...}}``)."""
    modules = modules or {}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module in modules:
                found += [(node.lineno, f"from {node.module} import {a.name}") for a in node.names if a.name not in modules[node.module]]
            elif node.module.startswith("inflq."):
                found.append((node.lineno, f"from {node.module} import ..."))
            elif node.module == "inflq":
                found += [(node.lineno, f"from inflq import {a.name}") for a in node.names if a.name not in public]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}") for a in node.names if a.name.startswith("inflq.") and a.name not in modules]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "inflq" and node.attr not in public:
            found.append((node.lineno, f"inflq.{node.attr}"))
    return found


def _files(paths: list[Path]) -> list[Path]:
    return [f for p in paths for f in ([p] if p.is_file() else _py_files(p))]


def builtin_names() -> dict[str, set[str]]:
    """What the built-in plugins may import beyond the contract: :mod:`inflq._builtins_api`."""
    from inflq import _builtins_api

    return {"inflq._builtins_api": set(_builtins_api.__all__)}


def test_builtin_plugins_import_the_contract_and_the_builtins_api_only():
    public = set(inflq.__all__)
    offenders = []
    for path in _py_files(BUILTINS):
        for line, what in private_inflq_imports(ast.parse(path.read_text(), str(path)), public, builtin_names()):
            offenders.append(f"{_rel(path)}:{line}: {what}")
    assert not offenders, (
        "built-in plugins import only names in inflq.__all__, and inflq._builtins_api for what they need beyond it:\n" + "\n".join(offenders)
    )


def test_third_party_plugins_import_the_contract_only():
    """The example plugin, the template and the suite's own third-party-shaped plugins (trak-lite)
    are written against ``inflq.__all__`` alone; their tests may add :mod:`inflq.testing`."""
    from inflq import testing

    public = set(inflq.__all__)
    offenders = []
    files = _files(THIRD_PARTY)
    assert len(files) >= 5 and all(p.exists() for p in THIRD_PARTY)
    for path in files:
        for line, what in private_inflq_imports(ast.parse(path.read_text(), str(path)), public, {"inflq.testing": set(testing.__all__)}):
            offenders.append(f"{_rel(path)}:{line}: {what}")
    assert not offenders, (
        "third-party plugins import only names in inflq.__all__ (docs/plugins.md): export what they need, "
        "or use inflq.testing in tests:\n" + "\n".join(offenders)
    )


def test_the_builtins_api_holds_only_what_the_builtins_use():
    """Each of its names resolves, none is also in the contract, and some built-in imports it: the
    module does not grow into a second public API."""
    from inflq import _builtins_api

    used: set[str] = set()
    for path in _py_files(BUILTINS):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module == "inflq._builtins_api":
                used |= {a.name for a in node.names}
    names = set(_builtins_api.__all__)
    assert not names & set(inflq.__all__)
    assert sorted(names - used) == [], "in inflq._builtins_api but used by no built-in"
    for name in names:
        assert getattr(_builtins_api, name) is not None


def test_the_package_root_imports_no_front_end():
    """Not at import, and not on first use of any contract name: the CLI and the TUI are clients."""
    import subprocess
    import sys

    tree = ast.parse((CORE / "__init__.py").read_text())
    named = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)] + [str(v) for v in inflq._LAZY.values()]
    assert not [m for m in named if m.split(".")[0] in ("cli", "tui")], named
    code = "import sys, inflq\nfor n in inflq.__all__: getattr(inflq, n)\nprint(sorted(m for m in sys.modules if m.startswith(('inflq.cli', 'inflq.tui', 'textual'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_the_plugin_guide_lists_the_public_api_exactly():
    """docs/plugins.md's table of what a plugin may import names every name in ``inflq.__all__``,
    and nothing else: a name exported without a line there is one plugin authors cannot find."""
    text = (ROOT / "docs" / "plugins.md").read_text()
    section = text.split("## The public API: what a plugin may import", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| for ")]
    listed = {name for row in rows for name in re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", row.split("|")[2])}
    assert listed, "the table was not found"
    assert sorted(set(inflq.__all__) - listed) == [], "exported but not in docs/plugins.md's public-API table"
    assert sorted(listed - set(inflq.__all__)) == [], "in docs/plugins.md's public-API table but not exported"


def test_the_import_guard_sees_private_names():
    src = "from inflq.runs import build_worker\nfrom inflq import Job, _secret\nimport inflq.project\nx = inflq.project\n"
    assert sorted(line for line, _ in private_inflq_imports(ast.parse(src), {"Job"})) == [1, 2, 3, 4]
    src = "from inflq.testing import cli, _x\nfrom inflq.testing import tiny_project\nimport inflq.testing\n"
    assert [line for line, _ in private_inflq_imports(ast.parse(src), set(), {"inflq.testing": {"cli", "tiny_project"}})] == [1]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    return ast.unparse(node.test) in {"TYPE_CHECKING", "typing.TYPE_CHECKING"}


def import_graph(files: list[Path]) -> dict[str, set[str]]:
    """Module -> the inflq modules it imports (at any depth of the file, lazy imports included;
    ``if TYPE_CHECKING:`` blocks excluded, as they never run)."""
    modules = {_module_name(p): p for p in files}
    graph: dict[str, set[str]] = {m: set() for m in modules}

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        tree = ast.parse(path.read_text(), str(path))
        skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node) for b in node.body for n in ast.walk(b)}
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    stem = ".".join(base + ([node.module] if node.module else []))
                else:
                    stem = node.module or ""
                # ``from pkg import module`` imports the module; ``from module import name`` the module.
                targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in modules else stem for a in node.names]
            for t in targets:
                r = resolve(t)
                if r and r != mod:
                    graph[mod].add(r)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_circles_are_found():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    files = [p for p in _py_files(CORE)]
    graph = import_graph(files)
    # The package's __init__ re-exports the public API from its modules; a module importing a
    # sibling by ``from . import x`` is an edge to that sibling, not to the package.
    found = [c for c in circles(graph)]
    assert not found, "import circles (make the arrows one-way, docs/architecture.md):\n" + "\n".join(" <-> ".join(c) for c in found)


@pytest.mark.parametrize("path", [p for p in _py_files(CORE) if not p.is_relative_to(CORE / "tui")], ids=_rel)
def test_the_headless_core_never_imports_textual(path):
    tree = ast.parse(path.read_text(), str(path))
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0]
    assert not [n for n in names if n.split(".")[0] == "textual"]


# -- one artifact layout ------------------------------------------------------------------------------
# What an artifact path looks like when spelled out: the artifacts folder as a path part, a core
# artifact folder, or a core file name pattern. Only inflq/layout.py may spell them.
ARTIFACT_PATH = re.compile(
    r"(^|[\s/(`'\"])artifacts/|/artifacts$|(^|/)(runs|results|factors|exports)/|(^|[/{}])fit-|-upto-|(^|[/{}])shard-"
    r"|(^|/)(candidates|queries|scores)\.safetensors"
)
# A folder's bare name, where it makes a path (``root / "artifacts"``) or names one (``X = "artifacts"``).
FOLDER_NAMES = {"artifacts", "runs", "results", "factors", "exports"}
LAYOUT = CORE / "layout.py"


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                out.add(id(first.value))
    return out


def artifact_paths(tree: ast.AST) -> list[tuple[int, str]]:
    """String constants in ``tree`` (f-strings' literal parts too; docstrings aside) that spell an
    artifact path instead of asking inflq/layout.py for it."""
    skip = _docstrings(tree)
    found = [
        (node.lineno, repr(node.value)[:60])
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip and ARTIFACT_PATH.search(node.value)
    ]
    for node in ast.walk(tree):
        parts = [node.left, node.right] if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) else []
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            parts = [node.value]
        found += [(p.lineno, repr(p.value)) for p in parts if isinstance(p, ast.Constant) and p.value in FOLDER_NAMES]
    return sorted(set(found))


def test_only_the_layout_knows_where_artifacts_live():
    """Paths of factors, runs' files, score matrices, exports and plugin folders come from
    inflq/layout.py (plugins: ``project.plugin_folder(name)``), so no two modules can drift apart."""
    offenders = []
    for path in _py_files(CORE) + _py_files(BUILTINS) + [p for t in THIRD_PARTY for p in ([t] if t.is_file() else _py_files(t))]:
        if path == LAYOUT:
            continue
        for line, what in artifact_paths(ast.parse(path.read_text(), str(path))):
            offenders.append(f"{_rel(path)}:{line}: {what}")
    assert not offenders, "artifact paths spelled outside inflq/layout.py (ask the layout):\n" + "\n".join(offenders)


def test_the_layout_guard_sees_artifact_paths():
    src = (
        '"""A docstring may say artifacts/runs/ in prose."""\n'
        'a = "artifacts"\n'
        'b = f"artifacts/runs/{run_id}/shard-{i:06d}.safetensors"\n'
        'c = root / "artifacts" / "runs"\n'
        'd = f"{ARTIFACTS}/results/run-{run_id}.safetensors"\n'
        'e = f"{base}/fit-{number}-upto-{last:06d}.safetensors"\n'
        'f = f"{folder}/candidates.safetensors"\n'
        'g = "exports"\n'
        'h = "artifacts/cosine/norms.safetensors"\n'
    )
    assert sorted({line for line, _ in artifact_paths(ast.parse(src))}) == [2, 3, 4, 5, 6, 7, 8, 9]
    harmless = (
        'x = "all artifacts verify"\ny = "--fit-memory"\nz = "model.safetensors"\nw = "see `inflq runs`"\n'
        'v = f"{n} runs"\nu = {"artifacts": 1, "results": rows}\nt = "the run\'s queries"\ns = f(id="run-form")\n'
    )
    assert artifact_paths(ast.parse(harmless)) == []
    # And the real layout module spells them, so the scan would see it if it were not exempt.
    assert artifact_paths(ast.parse(LAYOUT.read_text()))


def test_no_two_modules_share_a_name():
    """A module's name says its role, once: no two modules of the package and the built-in plugins
    share a file name (``__init__``/``__main__`` aside), so that "layout.py" or "workers.py" names one
    thing in a traceback, a grep or a review."""
    seen: dict[str, list[str]] = {}
    for path in _py_files(CORE) + _py_files(BUILTINS):
        if path.name not in ("__init__.py", "__main__.py"):
            seen.setdefault(path.name, []).append(_rel(path))
    assert {name: paths for name, paths in seen.items() if len(paths) > 1} == {}
