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
CORE_TOP = ("trainer.loop", "trainer.session", "trainer.app", "trainer.restore", "trainer.__main__")


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


@pytest.mark.parametrize("package", ["checkpoint", "distribute", "verify", "bench"])
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
