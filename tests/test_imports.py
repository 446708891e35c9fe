"""tunelab's modules import each other without cycles: read statically (every import statement, those
inside functions included), so a cycle that a lazy import hides at start-up is still one."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tunelab"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The tunelab modules that `path` imports, each resolved to the module that defines the name
    (`from tunelab.a import b` is tunelab.a.b when that is a module, else tunelab.a)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    resolved = set()
    for target in found:
        while target and target not in modules:  # `import tunelab.a.b as c` names a module; trim names of attributes
            target = target.rpartition(".")[0]
        if target and target != name:
            resolved.add(target)
    return resolved


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imported_modules(p, modules) for p in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the modules along it with the first repeated at the end; None when there is none."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_finder_names_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert "tunelab.models.load" in graph["tunelab.train.timing"]  # imported inside a function there
    assert "tunelab.strategies.registry" in graph["tunelab.config"]  # and at the top of a module
    assert module_name(PACKAGE / "strategies" / "__init__.py") == "tunelab.strategies"  # a package is a module


def test_tunelab_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


# DESIGN.md's stages, low to high: a module may import its own stage and the ones below it, never one above.
# The floor holds what every stage may use (errors, the run-file layout, atomic writes, the config tree).
STAGES = [
    {"errors", "percentile", "processes", "outputs", "runfiles", "atomic", "config"},
    {"data"}, {"models"}, {"strategies"}, {"train"}, {"evaluate"}, {"plan"}, {"export"}, {"serve"}, {"report"},
    {"compare", "doctor", "demo_world"}, {"demo"}, {"cli", "__main__"},
]
# the one arrow DESIGN.md allows upward: the config tree validates strategy names against the registry (a leaf)
ALLOWED_UPWARD = {("tunelab.config", "tunelab.strategies.registry")}


def stage_of(module: str) -> int:
    part = module.split(".")[1] if module.count(".") else module
    found = [i for i, names in enumerate(STAGES) if part in names]
    assert found, f"{module}: no stage in tests/test_imports.py's STAGES (add its part of the package to one)"
    return found[0]


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((a, b) for a, targets in graph.items() for b in targets
                  if a != "tunelab" and b != "tunelab" and stage_of(b) > stage_of(a) and (a, b) not in ALLOWED_UPWARD)


def test_the_layer_finder_names_an_upward_import():
    graph = {"tunelab.data.read": {"tunelab.train.loop"}, "tunelab.train.loop": {"tunelab.data.read"}}
    assert upward_imports(graph) == [("tunelab.data.read", "tunelab.train.loop")]


def test_no_stage_imports_a_higher_one():
    assert upward_imports(import_graph()) == []
