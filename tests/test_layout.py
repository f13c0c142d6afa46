"""The tree tells the architecture (README, "What lives where"): imports go one way, functions
stay short (the core's and every package's), and nothing cites a file outside the repository.
Read from the source."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

TRAINER = Path(__file__).resolve().parents[1] / "trainer"
TOOLS = ("trainer.verify", "trainer.bench")
CORE_TOP = (
    "trainer.loop",
    "trainer.session",
    "trainer.events",
    "trainer.app",
    "trainer.restore",
    "trainer.__main__",
)


def module_name(path: Path) -> str:
    parts = path.relative_to(TRAINER.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every trainer module `path` imports, at any depth of the file (function-local too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("trainer")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("trainer"):
            out |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
    return out


MODULES = {module_name(p): p for p in sorted(TRAINER.rglob("*.py"))}


def _under(name: str, packages) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


@pytest.mark.parametrize("name", [m for m in MODULES if not _under(m, TOOLS)])
def test_the_core_never_imports_the_tools(name):
    used = {m for m in imports(MODULES[name]) if _under(m, TOOLS)}
    assert not used, f"{name} imports {sorted(used)}"


@pytest.mark.parametrize(
    "name", [m for m in MODULES if _under(m, ("trainer.checkpoint", "trainer.distribute"))]
)
def test_subsystems_never_import_the_loop(name):
    used = {m for m in imports(MODULES[name]) if _under(m, CORE_TOP)}
    assert not used, f"{name} imports {sorted(used)}"


def test_the_import_check_sees_a_forbidden_import(tmp_path):
    """The reader above finds a function-local `from trainer.verify import ...` (so the tests
    built on it can fail)."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from trainer.verify import compare\n    return compare\n")
    assert "trainer.verify.compare" in imports(bad)


MAX_FUNCTION_LINES = 80


def long_functions(path: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """Every function (methods and nested ones too) in `path` longer than `limit` lines, as
    "file: name (N lines, from line L)"."""
    rel = path.relative_to(TRAINER.parent) if path.is_relative_to(TRAINER.parent) else path
    return [
        f"{rel}: {n.name} ({n.end_lineno - n.lineno + 1} lines, from line {n.lineno})"
        for n in ast.walk(ast.parse(path.read_text()))
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
        and n.end_lineno - n.lineno + 1 > limit
    ]


LENGTH_CHECKED = list(MODULES)  # every module under trainer/, no exemptions


@pytest.mark.parametrize("name", LENGTH_CHECKED)
def test_functions_read_in_one_screen(name):
    """No function anywhere under trainer/ (the core and every package) is longer than 80
    lines."""
    long = long_functions(MODULES[name])
    assert not long, f"over {MAX_FUNCTION_LINES} lines: {long}"


def test_the_length_check_reads_every_package():
    """Every .py under trainer/, at any depth, is checked (not only trainer/*.py)."""
    on_disk = {
        module_name(Path(d) / f) for d, _, fs in os.walk(TRAINER) for f in fs if f.endswith(".py")
    }
    assert set(LENGTH_CHECKED) == on_disk
    for package in ("bench", "checkpoint", "distribute", "verify"):
        assert any(m.startswith(f"trainer.{package}.") for m in LENGTH_CHECKED), package


def test_the_length_check_sees_a_long_function(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n" + "    x = 1\n" * 80 + "    return x\n")
    assert long_functions(bad) == [f"{bad}: f (82 lines, from line 1)"]


@pytest.mark.parametrize(
    "package", ["checkpoint", "data", "distribute", "sweep", "verify", "bench"]
)
def test_each_package_says_what_it_is_for_and_may_import(package):
    doc = ast.get_docstring(ast.parse((TRAINER / package / "__init__.py").read_text())) or ""
    assert len(doc.split()) > 20 and "import" in doc, doc


def test_nothing_cites_a_file_outside_the_repository():
    root = TRAINER.parent
    sources = [*root.glob("trainer/**/*.py"), *root.glob("scripts/*"), *root.glob("tests/*.py")]
    sources += [*root.glob("conf/**/*.yaml"), *root.glob("models/*.py"), root / "README.md"]
    outside = ("DESIGN.md", "STYLE.md", "../shared", "/work/")
    cited = [
        (p.name, o) for p in sources if p != Path(__file__) for o in outside if o in p.read_text()
    ]
    assert not cited, cited


# ---------------------------------------------------------------- the import graph
ROOT = TRAINER.parent
GRAPH_SOURCES = [*sorted(TRAINER.rglob("*.py")), *sorted((ROOT / "models").rglob("*.py"))]
GRAPH_SOURCES += sorted((ROOT / "scripts").glob("*.py"))


def graph_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(sources: list[Path]) -> dict[str, set[str]]:
    """{module: the modules of `sources` it imports}, every import at any depth of the file
    (an import inside a function counts: it cannot hide a cycle). `from a.b import c` is an
    edge to the module a.b.c where there is one, else to a.b."""
    names = {graph_name(p): p for p in sources}

    def resolve(name: str) -> str | None:
        while name and name not in names:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in names.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            edges |= {r for t in targets if (r := resolve(t)) and r != name}
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each import cycle, as a path a -> b -> ... -> a (one per strongly connected group)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_path_through(graph, set(g)) for g in groups]


def _path_through(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """A cycle inside a strongly connected `group`: from its first module back to it."""
    start = min(group)
    seen, path = {start: None}, [start]
    frontier = [start]
    while frontier:  # breadth-first, within the group, until an edge back to start
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & group):
                if w == start:
                    chain, u = [start], v
                    while u is not None:
                        chain.append(u)
                        u = seen[u]
                    return chain[::-1]
                if w not in seen:
                    seen[w] = v
                    nxt.append(w)
        frontier = nxt
    return path


def test_no_import_cycle_anywhere():
    """trainer/ (every package), models/ and scripts/: no module imports itself through
    others, not even through an import inside a function."""
    found = cycles(import_graph(GRAPH_SOURCES))
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


def test_the_cycle_check_names_a_cycle_hidden_in_a_function(tmp_path):
    pkg = tmp_path / "trainer"
    pkg.mkdir()
    (pkg / "a.py").write_text("from trainer import b\n")
    (pkg / "b.py").write_text("def f():\n    from trainer.c import g\n    return g\n")
    (pkg / "c.py").write_text("def g():\n    from trainer.a import b\n    return b\n")
    global ROOT
    root, ROOT = ROOT, tmp_path
    try:
        found = cycles(import_graph(sorted(pkg.glob("*.py"))))
    finally:
        ROOT = root
    assert found == [["trainer.a", "trainer.b", "trainer.c", "trainer.a"]]


MAX_MODULE_LINES = 420  # "about 400": one job a module


@pytest.mark.parametrize("name", list(MODULES))
def test_one_job_a_module(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{name}: {lines} lines; split it along its jobs"
