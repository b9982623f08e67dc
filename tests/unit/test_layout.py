"""The package's layers hold: no import runs upward, none runs in a circle, `import corral`
loads only the SDK, and no module, class or function outgrows what a reader can hold.

The layers, bottom to top (each may import those its rule names, and nothing else of Corral):

    core       I/O-free vocabulary, shared by the SDK and the server     (standard library only)
    agent      the guest agent, run inside sandboxes                      (standard library only)
    host       root-only kernel plumbing                                  core
    runtimes   isolation technologies behind one interface                core, host, agent
    images     layers, builds, OCI                                         core, host
    engine     the per-node owner of sandboxes                            core, agent, host,
                                                                          runtimes, images
    server     HTTP, store, tenancy                                       core, engine, images,
                                                                          client, tools (MCP)
    client     the SDK                                                    core
    tools      sandboxes as an agent's tools (function calling, MCP)      core, client
    cli        the command line                                           anything
    corral     the package itself: the SDK's surface                      core, client
               (`corral.Engine` is loaded lazily, on first use)
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from corral.engine.datadir import AGENT_FILES

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "corral"

ALLOWED: dict[str, set[str]] = {
    "core": {"core"},
    "agent": {"agent"},
    "host": {"core", "host"},
    "runtimes": {"core", "host", "agent", "runtimes"},
    "images": {"core", "host", "images"},
    "engine": {"core", "agent", "host", "runtimes", "images", "engine"},
    "server": {"core", "engine", "images", "client", "tools", "server"},
    "client": {"core", "client"},
    "tools": {"core", "client", "tools"},
    "cli": {
        "core",
        "agent",
        "host",
        "runtimes",
        "images",
        "engine",
        "server",
        "client",
        "tools",
        "cli",
    },
    "corral": {"core", "client", "cli", "engine"},
}
STDLIB_ONLY = ("core", "agent")
# Inside a sandbox the agent imports its siblings by their plain names.
# The agent's modules import each other by bare name inside the sandbox.
AGENT_SIBLINGS = {name.removesuffix(".py") for name in AGENT_FILES if name.endswith(".py")}
# Standard modules of other Pythons than this one (the agent runs under the image's, 3.8 on)
OTHER_PYTHONS = {"_sha2"}  # 3.12's SHA-2 (agent/lean.py)
# Above these sizes a module, class or function stops being readable in one sitting. Data tables
# (a seccomp rule list, an OCI spec) are the exception, by name.
MAX_MODULE_LINES = 500
MAX_CLASS_LINES = 400
MAX_FUNCTION_LINES = 60
DATA_TABLES: set[str] = set()


def modules() -> Iterator[tuple[str, Path]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else "corral"


def imports(path: Path, known: set[str]) -> Iterator[tuple[str, int]]:
    """Every Corral module `path` imports, anywhere in it (lazy and type-only imports too)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("corral"):
                    yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("corral"):
            assert node.level == 0, f"{path}:{node.lineno}: use absolute imports"
            module = node.module or ""
            for alias in node.names:
                submodule = f"{module}.{alias.name}"
                yield (submodule if submodule in known else module), node.lineno


def third_party(path: Path) -> Iterator[str]:
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            top = name.split(".")[0]
            standard = top in sys.stdlib_module_names or top in OTHER_PYTHONS
            if top != "corral" and not standard and top != "__future__":
                yield name


def graph() -> dict[str, set[str]]:
    found = dict(modules())
    known = set(found)
    return {module: {name for name, _ in imports(path, known)} for module, path in found.items()}


def test_no_import_runs_upward() -> None:
    found = dict(modules())
    known = set(found)
    upward = [
        f"{module} ({layer(module)}) imports {name} ({layer(name)}) at line {line}"
        for module, path in found.items()
        for name, line in imports(path, known)
        if layer(name) not in ALLOWED[layer(module)]
    ]
    assert not upward, "\n".join(upward)


def test_routes_reach_only_the_resource_services() -> None:
    """Routes turn HTTP into calls of `corral.server.resources` and back; the engine, the
    store and the service are the resources' business (tenancy is enforced there)."""
    found = dict(modules())
    known = set(found)
    forbidden = ("corral.engine", "corral.server.store", "corral.server.service", "corral.images")
    wrong = []
    for module, path in found.items():
        if not module.startswith("corral.server.routes"):
            continue
        wrong += [
            f"{module}:{line} imports {name}"
            for name, line in imports(path, known)
            if name.startswith(forbidden)
        ]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("engine", "store", "db"):
                wrong.append(f"{module}:{node.lineno} uses .{node.attr}")
    assert not wrong, wrong


def test_core_and_agent_use_the_standard_library_only() -> None:
    found = [
        f"{module} imports {name}"
        for module, path in modules()
        if layer(module) in STDLIB_ONLY
        for name in third_party(path)
        if not (layer(module) == "agent" and name in AGENT_SIBLINGS)
    ]
    assert not found, found


def test_no_circular_imports() -> None:
    edges = graph()
    cycles = [sorted(component) for component in _strongly_connected(edges) if len(component) > 1]
    cycles += [[module] for module, targets in edges.items() if module in targets]
    assert not cycles, cycles


def _strongly_connected(edges: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm, iterative: the import graph's strongly connected components."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
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
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                components.append(component)
    return components


def test_the_walk_sees_imports() -> None:
    """The checks above would pass on an empty graph: make sure they do not run on one."""
    edges = graph()
    assert "corral.core.errors" in edges["corral.core.spec"]
    assert "corral.engine" in edges["corral.server.service"]
    assert _strongly_connected({"a": {"b"}, "b": {"a"}, "c": set()}) in (
        [{"a", "b"}, {"c"}],
        [{"c"}, {"a", "b"}],
    )
    assert layer("corral.images.oci") == "images" and layer("corral") == "corral"


def test_importing_corral_loads_only_the_sdk() -> None:
    """`import corral` is the SDK: no server, engine, runtime, host plumbing or image
    machinery, none of the server's dependencies, and not even the HTTP client until a first
    request; on a machine with neither bubblewrap nor runsc. `corral.Engine` works, lazily."""
    code = (
        "import json, sys, corral\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(('corral', 'fastapi', "
        "'sqlalchemy', 'uvicorn', 'alembic', 'typer', 'httpx', 'websockets')))\n"
        "engine = corral.Engine.__module__\n"
        "print(json.dumps([loaded, engine]))\n"
    )
    no_tools = {"PATH": "/nonexistent", "HOME": "/nonexistent"}
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env=no_tools,
    )
    loaded, engine_module = json.loads(done.stdout)
    forbidden = ("server", "engine", "runtimes", "host", "images", "cli")
    wrong = [
        name
        for name in loaded
        if not name.startswith("corral") or layer(name) in forbidden or name == "corral.agent"
    ]
    assert not wrong, wrong
    assert "corral.client" in loaded and "corral.core" in loaded
    assert engine_module == "corral.engine.engine"


def test_modules_classes_and_functions_stay_small() -> None:
    too_big = []
    for module, path in modules():
        text = path.read_text()
        lines = len(text.splitlines())
        if lines > MAX_MODULE_LINES and module not in DATA_TABLES:
            too_big.append(f"module {module}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                name = f"{module}.{node.name}"
                limit = MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES
                if size > limit and name not in DATA_TABLES:
                    too_big.append(f"{type(node).__name__} {name}: {size} lines")
    assert not too_big, "\n".join(too_big)
