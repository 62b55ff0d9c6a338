"""The package's import graph: no cycle (imports inside functions included), no stage imports another, the
config needs nothing of rl/; docs/configuration.md against the typed config."""
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
    # The pipeline runs the stages in order; every other stage stands on its own (inputs.py and
    # outputs.py are what they share, not stages).
    stages = {f"dalign_jax.stages.{s}" for s in ("distill", "judge", "sft", "rl", "eval", "report")}
    offenders = {m: sorted(graph[m] & stages) for m in stages if graph[m] & stages}
    assert not offenders, offenders


def test_config_needs_nothing_of_rl_or_the_stages():
    """The config reads and checks a file; RL's registries are consulted when a stage starts."""
    graph = import_graph()
    reach, todo = set(), ["dalign_jax.config"]
    while todo:
        for nxt in graph[todo.pop()] - reach:
            reach.add(nxt)
            todo.append(nxt)
    assert not {m for m in reach if m.startswith(("dalign_jax.rl", "dalign_jax.stages"))}, sorted(reach)


def config_keys(cls, prefix: str = "") -> set[str]:
    """Every dotted key of the typed config (an endpoint's fields under models.<role>)."""
    import dataclasses
    import typing

    from dalign_jax.engine.remote import Endpoint

    keys = set()
    for field in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[field.name]
        sections = [h for h in (typing.get_args(hint) or (hint,)) if dataclasses.is_dataclass(h)]
        key = f"{prefix}{field.name}"
        if sections and sections[0] is not Endpoint:
            keys |= config_keys(sections[0], key + ".")
            if type(None) in typing.get_args(hint):  # an optional section is a key of its own (null: off)
                keys.add(key)
            continue
        keys.add(key)
        if sections:
            keys |= {f"{key}.{f.name}" for f in dataclasses.fields(Endpoint)}
    return keys


def documented_keys(text: str) -> set[str]:
    """The keys the first column of docs/configuration.md's table names: `a.b`, `.c` (a sibling of the
    cell's first key), `*.train.x` (sft and rl), `models.<role>.x` (teacher and judge)."""
    import re

    keys = set()
    for line in text.splitlines():
        if not line.startswith("| `"):
            continue
        names = re.findall(r"`([^`]+)`", line.split("|")[1])
        parent = names[0].rsplit(".", 1)[0] + "." if "." in names[0] else ""
        for name in names:
            if name.endswith(".*"):  # a heading row for a section's keys
                continue
            name = parent + name[1:] if name.startswith(".") else name
            for part, options in (("*", ("sft", "rl")), ("<role>", ("teacher", "judge"))):
                if part in name:
                    keys |= {name.replace(part, o) for o in options}
                    break
            else:
                keys.add(name)
    return keys


def test_configuration_doc_is_generated_from_the_config():
    """docs/configuration.md is what tools/config_doc.py writes from the code, and names every key."""
    import sys

    sys.path.insert(0, str(PACKAGE.parent / "tools"))
    from config_doc import render

    assert (PACKAGE.parent / "docs" / "configuration.md").read_text() == render(), \
        "docs/configuration.md differs from the config: run python tools/config_doc.py"
    from dalign_jax.config import Config

    code = config_keys(Config)
    doc = documented_keys((PACKAGE.parent / "docs" / "configuration.md").read_text())
    assert not code - doc, f"keys missing from docs/configuration.md: {sorted(code - doc)}"
    assert not doc - code, f"docs/configuration.md names keys the config does not have: {sorted(doc - code)}"
