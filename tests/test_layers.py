"""The packages' layering: data flows one way, and each part imports only the parts below it.

Read from the source (every import, including those inside functions, but not
those only for type checkers), so an import added anywhere in flowcheck/ that
crosses a layer fails here, whether or not a test runs that code.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import flowcheck

ROOT = Path(flowcheck.__file__).parent
BASE = {"errors", "defaults", "redact", "tls", "_deps", "flowcheck"}
NETWORK = {"aio_pika", "aiormq", "aiokafka", "redis", "kafka", "httpx", "socket"}

# part of flowcheck -> the other parts it may import (docs/development.md, "The packages")
MAY_IMPORT: dict[str, set[str]] = {
    "topology": BASE,
    "observations": BASE | {"topology"},
    "propagation": BASE,
    "devkafka": BASE,
    "correlate": BASE | {"topology", "observations"},
    "trace": BASE | {"observations"},
    "timeline": BASE | {"observations"},
    "checker": BASE | {"topology", "observations"},
    "scenario": BASE | {"topology"},
    "reporting": BASE | {"topology", "observations", "checker"},
    "gate": BASE | {"checker", "reporting"},
    "otel": BASE | {"topology", "observations", "checker"},
    "brokers": BASE | {"topology", "observations", "correlate", "propagation"},
    "tracer": BASE | {"topology", "observations", "correlate", "brokers"},
    "signals": BASE | {"trace"},
    "recorder": BASE
    | {"topology", "observations", "brokers", "tracer", "trace", "signals", "checker"},
}
MAY_IMPORT["runner"] = MAY_IMPORT["recorder"] | {"recorder", "checker", "scenario", "gate"}
MAY_IMPORT["testing"] = MAY_IMPORT["runner"] | {"reporting"}
MAY_IMPORT["__main__"] = {"cli"}
MAY_IMPORT["flowcheck"] = BASE | {"topology"}  # the package's own __init__: its public API
# The entry points (cli, pytest_plugin) sit on top and may import any part but each other.


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "flowcheck"


def _module(path: Path) -> str:
    return ".".join(path.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__")


def _is_module(package: str, name: str) -> bool:
    if not package.startswith("flowcheck"):
        return False
    where = ROOT.parent.joinpath(*package.split("."), name)
    return where.with_suffix(".py").exists() or (where / "__init__.py").exists()


def _type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(tree: ast.AST) -> Iterator[str]:
    """Every module an import in ``tree`` loads at run time."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _type_checking(node):
            yield from (m for n in node.orelse for m in _imports(ast.Module([n], [])))
            continue
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (
                f"{node.module}.{a.name}" for a in node.names if _is_module(node.module, a.name)
            )
        yield from _imports(node)


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        graph[_module(path)] = set(_imports(ast.parse(path.read_text(encoding="utf-8"))))
    return graph


GRAPH = _graph()


def test_each_part_imports_only_the_parts_below_it() -> None:
    crossings = []
    for module, imported in GRAPH.items():
        part = _part(module)
        if part in ("cli", "pytest_plugin"):
            allowed = set(map(_part, GRAPH)) - {"cli", "pytest_plugin", "__main__"}
        else:
            allowed = MAY_IMPORT.get(part, BASE)
        for name in imported:
            if name.startswith("flowcheck.") and _part(name) not in allowed | {part}:
                crossings.append(f"{module} imports {name}")
    assert crossings == []


def test_only_brokers_reach_the_network() -> None:
    reaching = [
        f"{module} imports {name}"
        for module, imported in GRAPH.items()
        if _part(module) not in ("brokers", "devkafka")
        for name in imported
        if name.split(".")[0] in NETWORK
    ]
    assert reaching == []


def test_the_checker_and_the_topology_do_no_io() -> None:
    io = {"asyncio", "socket", "subprocess", "rich", "opentelemetry", *NETWORK}
    doing = [
        f"{module} imports {name}"
        for module, imported in GRAPH.items()
        if _part(module) in ("checker", "topology")
        for name in imported
        if name.split(".")[0] in io
    ]
    assert doing == []


def test_private_modules_are_imported_only_inside_their_package() -> None:
    outside = []
    for module, imported in GRAPH.items():
        for name in imported:
            parts = name.split(".")
            private = next((i for i, p in enumerate(parts) if p.startswith("_")), None)
            if parts[0] != "flowcheck" or private is None or private == 1:
                continue  # not flowcheck's, public, or flowcheck._deps (a part of the base)
            package = ".".join(parts[:private])
            if module != package and not module.startswith(package + "."):
                outside.append(f"{module} imports {name}")
    assert outside == []


def test_the_table_names_real_parts() -> None:
    parts = set(map(_part, GRAPH))
    named = set(MAY_IMPORT).union(*MAY_IMPORT.values())
    assert named - parts == set()
