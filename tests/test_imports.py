"""The import graph of the project's own modules: no circle anywhere, and no layer imports a layer above it
(operators know nothing of flows; guidance imports nothing from tasks; demos use only the public API).

Imports are read from the source with ``ast``, function-level ones included, so a circle hidden in a function body
counts too. ``from package import name`` is an edge to ``package.name`` when that is a module, else to ``package``.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("guidance", "operators", "tasks")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def _imports(path: Path, name: str, known) -> set[str]:
    """The modules of ``known`` (plus top-level package names) that the file at ``path`` (module ``name``) imports."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            for alias in node.names:
                found.add(f"{module}.{alias.name}" if f"{module}.{alias.name}" in known else module)
    return {module for module in found if module.split(".")[0] in PACKAGES}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, name, modules) - {name} for name, path in modules.items()}


def test_the_import_graph_has_no_circle():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                circle = path[path.index(target):] + [target]
                raise AssertionError("import circle: " + " -> ".join(circle))
            if target in graph and not state.get(target):
                visit(target)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if not state.get(node):
            visit(node)


def test_no_layer_imports_a_layer_above_it():
    graph = _graph()
    above = {"operators": ("guidance", "tasks"), "guidance": ("tasks",), "tasks": ()}
    wrong = sorted(f"{module} imports {target}" for module, targets in graph.items() for target in targets
                   if target.split(".")[0] in above[module.split(".")[0]])
    assert not wrong, "\n".join(wrong)
    assert not [module for module in graph["guidance.flow"] if module.startswith("operators")]  # the time convention


def test_demos_use_only_the_public_api():
    """A demo imports ``guidance``, ``operators`` and ``tasks`` names only, never one of their modules, and every
    name it imports is public (in the package's ``__all__``)."""
    import guidance
    import operators
    import tasks

    public = {"guidance": set(guidance.__all__), "operators": set(operators.__all__), "tasks": set(tasks.__all__)}
    wrong = []
    for demo in sorted((ROOT / "demos").rglob("*.py")):
        for node in ast.walk(ast.parse(demo.read_text(), str(demo))):
            if isinstance(node, ast.Import):
                wrong += [f"{demo.name}: import {alias.name}" for alias in node.names
                          if alias.name.split(".")[0] in PACKAGES and "." in alias.name]
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
                if node.module not in PACKAGES:
                    wrong.append(f"{demo.name}: from {node.module} import ...")
                else:
                    wrong += [f"{demo.name}: {node.module}.{alias.name}" for alias in node.names
                              if alias.name not in public[node.module]]
    assert not wrong, "demos import beyond the public API:\n" + "\n".join(wrong)
