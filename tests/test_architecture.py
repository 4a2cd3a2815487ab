"""The package's layers: every import runs down the data flow, the library never prints, and
the Krylov core depends on torch alone. Reads the source (``ast``), imports inside functions
included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "lanczos_ntk"

# bottom to top; a module may import its own layer and the layers below it
LAYERS = [
    ("base", ["_tolerances", "_results", "linalg", "plotting"]),
    ("models", ["models"]),
    ("operators", ["operators"]),
    ("spectral", ["spectral"]),
    ("dynamics", ["dynamics"]),
    ("analysis", ["channels", "optim", "landscape", "testing", "track"]),
    ("experiments", ["experiments"]),
    ("cli", ["cli", "__main__"]),
]
RANK = {name: i for i, (_, names) in enumerate(LAYERS) for name in names}


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        yield path, [p for p in parts if p != "__init__"]


def _imports(path: Path, parts: list[str]):
    """``(line, target parts)`` of every import of this package in ``path``."""
    package = parts if path.name == "__init__.py" else parts[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = base + (node.module.split(".") if node.module else [])
            elif (node.module or "").startswith("lanczos_ntk"):
                target = node.module.split(".")[1:]
            else:
                continue
            if node.module is None:  # from . import a, b
                for alias in node.names:
                    yield node.lineno, target + [alias.name]
            else:
                yield node.lineno, target
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("lanczos_ntk"):
                    yield node.lineno, alias.name.split(".")[1:]


def _rank(parts: list[str]) -> int | None:
    return RANK.get(parts[0]) if parts else None


def test_every_module_has_a_layer():
    missing = [".".join(p) for _, p in _modules() if p and _rank(p) is None]
    assert not missing, f"modules without a layer in tests/test_architecture.py: {missing}"


def test_imports_run_down_the_layers():
    upward = []
    for path, parts in _modules():
        if not parts:  # the package's __init__ gathers the public names
            continue
        mine = _rank(parts)
        for line, target in _imports(path, parts):
            if not target:
                upward.append(f"{path.name}:{line} imports the package root")
                continue
            theirs = _rank(target)
            is_module = (ROOT / target[0]).is_dir() or (ROOT / f"{target[0]}.py").exists()
            if not is_module:  # a name from the package root, which imports nearly everything
                if LAYERS[mine][0] != "cli":
                    upward.append(f"{'/'.join(parts)}.py:{line} imports {target[0]} from the package root")
            elif theirs > mine:
                upward.append(
                    f"{'/'.join(parts)}.py:{line} ({LAYERS[mine][0]}) imports "
                    f"{'.'.join(target)} ({LAYERS[theirs][0]})"
                )
    assert not upward, "imports against the data flow:\n" + "\n".join(upward)


def test_the_library_never_prints_and_linalg_needs_only_torch():
    printing, foreign = [], []
    for path, parts in _modules():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        if parts and parts[0] not in ("cli", "__main__"):
            printing += [
                f"{'/'.join(parts)}:{n.lineno}"
                for n in ast.walk(tree)
                if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "print"
            ]
        if parts and parts[0] == "linalg":
            for n in ast.walk(tree):
                names = (
                    [a.name for a in n.names]
                    if isinstance(n, ast.Import)
                    else [n.module]
                    if isinstance(n, ast.ImportFrom) and not n.level
                    else []
                )
                foreign += [
                    f"{'/'.join(parts)}:{n.lineno} {m}"
                    for m in names
                    if m.split(".")[0]
                    not in ("torch", "math", "warnings", "typing", "collections", "__future__", "dataclasses")
                ]
    assert not printing, f"print() in the library: {printing}"
    assert not foreign, f"linalg imports beyond torch: {foreign}"


@pytest.mark.parametrize("bad", ["from ..cli import main", "from ..experiments import teacher"])
def test_the_check_sees_an_upward_import(tmp_path, bad):
    """The checker itself: a models module importing the command line or an experiment."""
    path = tmp_path / "_rnn.py"
    path.write_text(bad + "\n")
    found = [t for _, t in _imports(path, ["models", "_rnn"])]
    assert found and _rank(found[0]) > RANK["models"]
