"""The package's shape: qcore's modules import one another without a cycle, and every import between
its rooms goes down the ladder that docs/DESIGN.md draws (never back up a layer). Read from the
source with `ast`, so imports inside functions count too: a lazy import hides a cycle, it does not
remove one."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The ladder, lowest rung first: a room may import its own rung and the rungs below it. docs/DESIGN.md
# ("Layering rules") draws the same picture.
LADDER: list[set[str]] = [
    {"qcore", "files", "cancel", "progress", "store"},
    {"data"},
    {"graph"},
    {"models"},
    {"quantize"},
    {"inference"},
    {"export", "analysis"},
    {"training", "lessons", "figures"},
    {"cli", "__main__"},
]


def module_imports(package_dir: Path) -> dict[str, set[str]]:
    """Module name -> the qcore modules it imports (a name imported from a package resolves to the
    submodule when there is one, else to the package)."""
    modules: dict[str, Path] = {}
    for path in package_dir.rglob("*.py"):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    root = package_dir.name
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            for target in targets:
                if target == root or target.startswith(root + "."):
                    resolved = resolve(target)
                    if resolved and resolved != name:
                        edges[name].add(resolved)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def rung(module: str) -> int:
    return next(level for level, rooms in enumerate(LADDER) if room(module) in rooms)


def imports_up(edges: dict[str, set[str]]) -> list[str]:
    return [
        f"{source} -> {target}"
        for source, targets in sorted(edges.items())
        for target in sorted(targets)
        if rung(target) > rung(source)
    ]


def test_the_checks_find_a_cycle_and_an_import_up():
    """The checker itself, on a made-up graph: a three-module cycle and a room importing above it."""
    made_up = {
        "qcore.data": {"qcore.graph.ops"},
        "qcore.graph.ops": {"qcore.graph.run"},
        "qcore.graph.run": {"qcore.graph.ops"},
        "qcore.files": set(),
    }
    assert cycles(made_up) == [["qcore.graph.ops", "qcore.graph.run"]]
    assert imports_up(made_up) == ["qcore.data -> qcore.graph.ops"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c"]]


def test_qcore_has_no_import_cycle():
    edges = module_imports(ROOT / "qcore")
    assert "qcore.quantize.qmodel" in edges and "qcore.inference.integer" in edges["qcore.lessons.walk"]
    assert cycles(edges) == []


def test_every_room_is_on_the_ladder_and_no_import_goes_back_up():
    edges = module_imports(ROOT / "qcore")
    rooms = {room(module) for module in edges}
    assert rooms <= set().union(*LADDER), f"rooms missing from the ladder: {rooms - set().union(*LADDER)}"
    assert imports_up(edges) == []


def test_qcore_never_imports_the_dashboard():
    for path in (ROOT / "qcore").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else []
            )
            for name in names:
                assert name.split(".")[0] not in ("streamlit", "ui", "pages"), f"{path.name} imports {name}"
