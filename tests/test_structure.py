"""The package's import graph: no cycle (imports inside functions included), and no stage imports another."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "dalign_jax"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dalign_jax"):
                # `from dalign_jax.engine import judge` imports the module dalign_jax.engine.judge
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    targets.add(full if full in modules else node.module)
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("dalign_jax")}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def test_no_import_cycle():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_no_stage_imports_another():
    graph = import_graph()
    stages = {m for m in graph if m.startswith("dalign_jax.stages.") and m != "dalign_jax.stages.common"}
    # The pipeline runs the stages in order; every other stage stands on its own.
    offenders = {m: sorted(graph[m] & stages) for m in stages if m != "dalign_jax.stages.pipeline" and graph[m] & stages}
    assert not offenders, offenders
