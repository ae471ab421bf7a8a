"""The shape of the house: layers import one way, fedgen knows nothing of Flower, attacks see no
training internals, no two modules import each other (directly or round a loop), and no module
grows past MAX_LINES.

Imports are read from the source with `ast`, at module level and inside functions alike: a lazy
import is still an import. Nothing is imported to check it.
"""

from __future__ import annotations

import ast
from collections.abc import Collection
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("fedgen", "attacks", "clients", "server")
MAX_LINES = 400

# Low to high. A module may import its own layer and the layers below it, never one above.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("seeding, config, audit_bounds, group_privacy",
     ("fedgen.seeding", "fedgen.config", "fedgen.schema", "fedgen.hospital_level_schema", "fedgen.audit_bounds", "fedgen.group_privacy")),
    ("model, diffusion, run_dir, data",
     ("fedgen.model", "fedgen.base_model", "fedgen.trainable", "fedgen.diffusion", "fedgen.run_dir", "fedgen.data")),
    ("privacy", ("fedgen.privacy",)),
    ("tracking", ("fedgen.tracking",)),
    ("federation", ("fedgen.federation",)),
    ("evaluation", ("fedgen.evaluation",)),
    ("attacks", ("attacks",)),
    ("running", ("fedgen.running",)),
    ("cli", ("fedgen.cli",)),
    ("clients, server (Flower)", ("clients", "server")),
)
# The threat model: attacks see released weights and candidate images, never how training ran.
TRAINING_INTERNALS = (
    "fedgen.privacy", "fedgen.federation", "fedgen.running", "fedgen.tracking", "fedgen.cli",
)


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layer_of(name: str) -> int | None:
    """Index in LAYERS of a project module, None for anything else (the standard library, torch)."""
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(_within(name, prefix) for prefix in prefixes):
            return index
    return None


def project_modules() -> dict[str, Path]:
    """{dotted name: file} for every module of PACKAGES; a package is named by its __init__.py."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports(module: str, source: str, known: Collection[str] = (), is_package: bool = False
            ) -> list[tuple[int, str]]:
    """(line, imported module) for every import statement anywhere in `source`, the code of
    `module`. `from p import n` names p.n when that is a module in `known`, else p; relative
    imports are resolved against `module`'s package (itself when `is_package`)."""
    found = []
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.append((node.lineno, candidate if candidate in known else base))
    return found


def problems(module: str, source: str, known: Collection[str] = (), is_package: bool = False
             ) -> list[str]:
    """What is wrong with the imports of `module` (dotted name) whose code is `source`."""
    found = []
    own = layer_of(module)
    for line, target in imports(module, source, known, is_package):
        where = f"{module} (line {line}) imports {target}"
        if _within(module, "fedgen") and _within(target, "flwr"):
            found.append(f"{where}: fedgen is plain PyTorch; Flower belongs in clients/, server/")
        if _within(module, "attacks") and any(_within(target, t) for t in TRAINING_INTERNALS):
            found.append(f"{where}: attacks see released weights and candidate images only, "
                         f"never training internals ({', '.join(TRAINING_INTERNALS)})")
        theirs = layer_of(target)
        if own is not None and theirs is not None and theirs > own:
            found.append(f"{where}: layer '{LAYERS[own][0]}' may not import the higher layer "
                         f"'{LAYERS[theirs][0]}'")
    return found


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """{module: the project modules it imports}."""
    graph = {}
    for name, path in modules.items():
        found = imports(name, path.read_text(), modules.keys(), _is_package(path))
        graph[name] = {target for _, target in found if target in modules and target != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One loop a -> ... -> a for each group of modules that import each other (Tarjan's strongly
    connected components, written out)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_loop(sorted(group)[0], set(group), graph) for group in groups]


def _loop(start: str, group: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest path start -> ... -> start inside `group` (breadth first)."""
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for nxt in sorted(graph[node] & group):
            if nxt == start:
                return [*paths[node], start]
            if nxt not in paths:
                paths[nxt] = [*paths[node], nxt]
                queue.append(nxt)
    raise AssertionError(f"{start} is in an import cycle but no path leads back to it")


# --- the project ---------------------------------------------------------------------------------
def test_every_module_has_a_layer():
    modules = project_modules()
    assert {"fedgen.cli", "fedgen.data.silos", "attacks.membership", "server.app"} <= set(modules)
    assert [name for name in modules if layer_of(name) is None] == [], "add these to LAYERS"


def test_imports_follow_the_layers():
    modules = project_modules()
    found = [
        problem
        for name, path in modules.items()
        for problem in problems(name, path.read_text(), modules.keys(), _is_package(path))
    ]
    assert not found, "forbidden imports:\n" + "\n".join(found)


def test_no_import_cycles():
    graph = import_graph(project_modules())
    assert "fedgen.running.simulate" in graph["fedgen.cli"]  # a lazy import, inside a function
    loops = cycles(graph)
    assert not loops, "import cycles:\n" + "\n".join(" -> ".join(loop) for loop in loops)


def test_modules_stay_small():
    lines = {name: len(path.read_text().splitlines()) for name, path in project_modules().items()}
    long = {name: n for name, n in lines.items() if n > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by concern): {long}"


# --- the checker itself --------------------------------------------------------------------------
def test_checker_reports_an_upward_import_inside_a_function():
    source = "import torch\n\n\ndef build():\n    from fedgen.running import simulate\n"
    found = problems("fedgen.data.silos", source, {"fedgen.running.simulate"})
    assert len(found) == 1
    assert "fedgen.data.silos (line 5) imports fedgen.running.simulate" in found[0]
    assert "higher layer 'running'" in found[0]


def test_checker_reports_flower_in_fedgen_and_training_internals_in_attacks():
    flower = problems("fedgen.federation.hospital", "from flwr.app import Message\n")
    assert len(flower) == 1 and "fedgen is plain PyTorch" in flower[0]
    assert problems("clients.app", "from flwr.app import Message\n") == []
    found = problems("attacks.loss", "from fedgen.privacy.accounting import EpsilonLedger\n")
    assert len(found) == 1 and "never training internals" in found[0]
    assert problems("attacks.loss", "from fedgen.model import load_released\n") == []


def test_checker_resolves_relative_imports():
    source = "from ..running import simulate\n"
    found = problems("fedgen.data.silos", source, {"fedgen.running.simulate"})
    assert len(found) == 1 and "imports fedgen.running.simulate" in found[0]


def test_cycle_finder_reports_a_loop():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
