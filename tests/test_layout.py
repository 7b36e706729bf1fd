"""The code's shape, checked: no import circles, no private names reached across modules, small passes, the
families as subpackages, and a wheel that holds and imports every module."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGES = (("optpipe", "optpipe"), ("passes", "optpipe.passes"), ("targets", "optpipe.targets"))


def _modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES:
        for path in (ROOT / folder).rglob("*.py"):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def _runtime_imports(path: Path) -> list[ast.ImportFrom | ast.Import]:
    """Import statements that run (those under `if TYPE_CHECKING:` only feed type checkers)."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and getattr(block.test, "id", "") == "TYPE_CHECKING" for n in ast.walk(block)}
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in typing_only]


def _graph() -> dict[str, set[str]]:
    modules = _modules()

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for node in _runtime_imports(path):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [f"{node.module}.{a.name}" for a in node.names] if node.module and not node.level else [])
            for name in names:
                target = owner(name) if name.startswith("optpipe") else None
                # `import optpipe.x.y` also runs the package inits above it; those are the package's own business
                if target and target != module and not module.startswith(target + "."):
                    graph[module].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_circles():
    assert _cycles(_graph()) == []


def test_no_private_name_is_imported_from_another_module():
    offenders = []
    for module, path in _modules().items():
        for node in _runtime_imports(path):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("optpipe"):
                offenders += [f"{module}: {node.module}.{a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
    assert offenders == []


def test_passes_are_small_and_optpipe_shows_its_families():
    long = {p.name: n for p in (ROOT / "passes").glob("*.py") if (n := len(p.read_text().splitlines())) > 250}
    assert long == {}
    flat = sorted(p.stem for p in (ROOT / "optpipe").glob("*.py") if p.stem not in ("__init__", "__main__"))
    assert len(flat) <= 10, flat
    for family in ("cli", "perf", "tune", "validation", "data"):
        assert (ROOT / "optpipe" / family / "__init__.py").is_file()
    assert not (ROOT / "optpipe" / "passes").exists()  # passes/ installs as optpipe.passes


def test_the_wheel_holds_and_imports_every_module(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(ROOT)], check=True, timeout=600)
    (wheel,) = (tmp_path / "dist").glob("optpipe-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {m.replace(".", "/") + ("/__init__.py" if p.name == "__init__.py" else ".py")
                for m, p in _modules().items()}
    assert expected <= names, sorted(expected - names)
    assert {"optpipe/targets/cpu-int8.toml", "optpipe/data/validation.txt"} <= names
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(tmp_path / "site"),
                    str(wheel)], check=True, timeout=600)
    modules = sorted(m for m in _modules() if m != "optpipe.__main__")
    code = "import importlib, sys; [importlib.import_module(m) for m in sys.argv[1:]]; print(len(sys.argv) - 1)"
    out = subprocess.run([sys.executable, "-c", code, *modules], capture_output=True, text=True, timeout=600,
                         cwd=tmp_path, env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin",
                                            "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str(len(modules))
