"""memento_core's import graph: no circles (function-level imports included) and nothing from ComfyUI.

The graph is read from the source (``ast``), so a lazy import inside a function that would close a
circle counts too (imports under ``if TYPE_CHECKING:`` never run and do not count). A package's
``__init__`` importing its own submodules is not an edge back from
those submodules (Python imports the parent package first; that is not a circle of ours).
"""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "memento_core"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(CORE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def resolve(current: str, is_package: bool, level: int, target: str | None) -> str:
    base = current.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join([*base, *([target] if target else [])])


def import_graph(external: dict[str, set[str]] | None = None) -> dict[str, set[str]]:
    """module -> the memento_core modules it imports; ``external`` (when given) collects, per module,
    the top-level names of everything else it imports."""
    modules = {module_name(p): p for p in CORE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"))
        typing_only = {  # imports under `if TYPE_CHECKING:` never run
            id(sub)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
            for sub in ast.walk(node)
        }
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                base = resolve(name, is_package, node.level, node.module) if node.level else node.module or ""
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            for target in targets:
                if external is not None and not target.startswith("memento_core"):
                    external.setdefault(name, set()).add(target.split(".")[0])
                # the deepest module of the graph that the import names
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(target + "."):
                    graph[name].add(target)
    return graph


def test_memento_core_has_no_import_circles() -> None:
    graph = import_graph()
    assert {"memento_core.runner", "memento_core.cli", "memento_core.memory.bank"} <= set(graph)
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt) :], nxt]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_layers_import_downward() -> None:
    external: dict[str, set[str]] = {}
    graph = import_graph(external)
    # the CLI is the top: nothing imports it except the story package's __main__
    assert {m for m, deps in graph.items() if "memento_core.cli" in deps} == {"memento_core.story.__main__"}
    assert "memento_core.runner" not in graph["memento_core.real_models"]
    assert "memento_core.runner" not in graph["memento_core.story.script"]
    assert "torch" in external["memento_core.dit"]  # the external names are read
    for name, names in external.items():
        assert not names & {"comfy", "comfy_api", "comfy_extras", "folder_paths", "nodes"}, name
