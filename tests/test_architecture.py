"""The shape of the code (docs/architecture.md): no import cycle, project imports only at the top of
a module, imports pointing down the layers, one owner for the record's file names, and a package
list in pyproject.toml that matches the packages on disk."""
from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("utils", "models")

# lower layers first; a module may import its own layer and the layers below it
LAYERS = [
    ["utils.errors", "utils.compat", "utils.config", "utils.fileio"],
    ["utils.data", "models"],
    ["utils.engine", "utils.record"],
    ["utils.attacks"],
    ["utils.victim"],
    ["utils.defenses"],
    ["utils.commands"],
    ["utils.robustness"],
    ["utils.analysis", "utils.tools"],
    ["utils.results", "utils.plots", "utils.lmc", "utils.sweep", "utils.bench", "utils.robustness_table", "utils.device_check"],  # `python -m` entry points
]


def _modules() -> dict[str, Path]:
    out = {}
    for top in PROJECT:
        for path in (ROOT / top).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _targets(node: ast.ImportFrom | ast.Import) -> list[str]:
    """The project modules an import statement loads (`from pkg import sub` names the submodule)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] in PROJECT]
    if node.level or not node.module or node.module.split(".")[0] not in PROJECT:
        return []
    return [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module for a in node.names]


def _imports(path: Path) -> tuple[set[str], list[str]]:
    """(project modules imported at the top of the module, project imports found anywhere else)."""
    tree = ast.parse(path.read_text())
    top, hidden = set(), []
    seen_code = False
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found = _targets(node)
            if seen_code and found:
                hidden.append(f"line {node.lineno}: after the first definition")
            top.update(found)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            seen_code = True
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)) and _targets(inner):
                    hidden.append(f"line {inner.lineno}: inside {node.name}")
    return top, hidden


GRAPH = {name: _imports(path)[0] for name, path in MODULES.items()}


def _layer(module: str) -> int:
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} is in no layer of tests/test_architecture.py: add it to LAYERS")


def test_every_module_has_a_layer():
    for name in MODULES:
        if name != "utils":
            _layer(name)


def test_no_import_cycle():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH.get(node, ())):
            if nxt not in MODULES:
                continue
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(MODULES):
        if name not in state:
            visit(name)


def test_project_imports_are_at_the_top():
    hidden = {name: h for name, path in MODULES.items() if (h := _imports(path)[1])}
    assert not hidden, f"project imports hidden below definitions or inside functions: {hidden}"


def test_imports_point_down_the_layers():
    upward = [f"{src} -> {dst}" for src, dsts in GRAPH.items() if src != "utils"
              for dst in dsts if dst in MODULES and dst != "utils" and _layer(dst) > _layer(src)]
    assert not upward, "imports against the layering of docs/architecture.md: " + ", ".join(sorted(upward))


def test_the_layer_check_sees_an_upward_import():
    # the checks above must be able to fail: a defense importing the robustness attacks is upward
    assert _layer("utils.robustness.retune") > _layer("utils.defenses.purify")
    assert "utils.commands.driver" in GRAPH["utils.robustness.retune"]


RECORD_NAMES = ("attack_result.pt", "config.yaml", "metrics.csv", "result.json", "summary.json", "model.pt",
                "checkpoint.pt", "generator.pt")


@pytest.mark.parametrize("name", RECORD_NAMES)
def test_record_file_names_are_spelled_in_the_layout_only(name):
    owners = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                      and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        if any(isinstance(n, ast.Constant) and n.value == name and id(n) not in docstrings for n in ast.walk(tree)):
            owners.append(module)
    assert owners == ["utils.record.layout"], f"{name!r} spelled as a string in {owners}"


def test_pyproject_lists_every_package():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {name for name, path in MODULES.items() if path.name == "__init__.py"}
    assert listed == on_disk
