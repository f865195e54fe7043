"""The package's shape: imports run one way (no cycles, stages in order) and no folder holds prefix families.

Imports are read from the source (AST), including those inside functions, since a lazy import is still a
dependency; only `if TYPE_CHECKING:` blocks are skipped, as they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dem_hf"

# The pipeline's stages, bottom first: a module may import from its own stage or from stages listed before it.
STAGES = ["hub", "io", "evaluation", "vectors", "merging", "search", "training", "ablation", "demo", "commands"]
# The one import that points up, on purpose: the user-facing method hands the work to the stage above, lazily.
DELEGATIONS = {"dem_hf.merging.merger -> dem_hf.search.run"}  # DEMMerger.search() runs dem_hf.search


def _module_name(path: Path) -> str:
    parts = ["dem_hf", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST):
    """Every import statement that can run (module level or inside functions), skipping `if TYPE_CHECKING:`."""
    pending = [tree]
    while pending:
        node = pending.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                pending.extend(child.orelse)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child
            pending.append(child)


def _imported_modules(name: str, path: Path) -> set[str]:
    """The dem_hf modules that module `name` imports (a package import counts as its `__init__`)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in _import_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        for target in targets:
            while target and target not in MODULES:  # `import dem_hf.io.reader` -> the module itself
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: _imported_modules(name, path) for name, path in MODULES.items()}


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else None


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in graph.get(node, ()):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_the_walker_sees_lazy_imports():
    """A guard on the guard: an import inside a function is an edge; one under TYPE_CHECKING is not."""
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a\ndef f():\n    import b\n"
    names = [alias.name for node in _import_nodes(ast.parse(source)) for alias in node.names]
    assert names == ["b"] or sorted(names) == ["TYPE_CHECKING", "b"]
    assert "a" not in names


def test_no_import_cycles():
    assert _cycles(GRAPH) == []


def test_the_walker_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_stages_import_one_way():
    """io/hub at the bottom, commands at the top: no stage imports a stage above it."""
    upward = []
    for module, imports in GRAPH.items():
        stage = _stage(module)
        for target in imports:
            other = _stage(target)
            if stage and other and STAGES.index(other) > STAGES.index(stage):
                upward.append(f"{module} -> {target}")
    assert sorted(set(upward) - DELEGATIONS) == []


def test_every_stage_is_a_subpackage():
    top_level = sorted(path.stem for path in PACKAGE.glob("*.py") if path.stem != "__init__")
    assert set(top_level) <= {"__main__", "lazy", "logging"}, f"flat modules left at the top: {top_level}"
    for stage in STAGES:
        assert (PACKAGE / stage / "__init__.py").is_file(), stage


@pytest.mark.parametrize("folder", sorted({path.parent for path in PACKAGE.rglob("*.py")}), ids=str)
def test_no_prefix_families(folder: Path):
    """`x.py` beside `x_y.py` is a family that wants to be a folder (or better names)."""
    stems = {path.stem for path in folder.glob("*.py")} - {"__init__"}
    families = sorted(f"{a}.py ~ {b}.py" for a in stems for b in stems if b.startswith(f"{a}_"))
    assert families == []
