"""Write docs/configuration.md from the typed config: every key, its type, its default, and the comment
beside or above its field in dalign_jax/config.py as its meaning.

  python tools/config_doc.py            # rewrite docs/configuration.md
  python tools/config_doc.py --check    # exit 1 if the file differs from what the code gives

tests/test_structure.py fails when the file and the code differ.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import io
import sys
import tokenize
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "configuration.md"
SOURCE = ROOT / "dalign_jax" / "config.py"

HEADER = """# Configuration

Every key a config file (YAML) or a `key=value` override can set, generated from `dalign_jax/config.py`
by `python tools/config_doc.py`. `dalign config CONFIG` prints a config with every default filled in.
An unknown key is an error with a "did you mean", a value of the wrong type or out of its range an error
naming the key. A section given in part keeps its own defaults for the rest: `rl.train.learning_rate=3e-5`
leaves RL's warm-up at 0 and its checkpoints every 10 steps. `sft.train` and `rl.train` share the keys of
`*.train`, with the defaults shown as SFT / RL where they differ. `models.teacher` and `models.judge`
each take a model name, or an endpoint with the keys of `models.<role>` ([serving.md](serving.md)).
`configs/` also holds configs for GPUs and TPUs; `dalign plan` gives each stage's memory per device
under them ([accelerators.md](accelerators.md)).
"""


def field_comments(source: str) -> dict[tuple[str, str], str]:
    """(class, field) -> its comment: the one on its line, else the block of comment lines just above."""
    comments = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = source.splitlines()
    out = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        for item in node.body:
            if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
                continue
            text = comments.get(item.lineno) if not lines[item.lineno - 1].lstrip().startswith("#") else None
            if text is None:
                above, n = [], item.lineno - 1
                while n in comments and lines[n - 1].lstrip().startswith("#"):
                    above.insert(0, comments[n])
                    n -= 1
                text = " ".join(above)
            out[(node.name, item.target.id)] = text.replace("|", "\\|")
    return out


def type_name(hint) -> str:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Literal:
        return " \\| ".join(repr(a).replace("'", "") for a in args)
    if origin is typing.Union:
        names = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin is list:
        return f"list of {type_name(args[0])}"
    if origin is dict:
        return f"map {type_name(args[0])} -> {type_name(args[1])}"
    if dataclasses.is_dataclass(hint):
        return "endpoint" if hint.__name__ == "Endpoint" else "section"
    if hint is typing.Any:
        return "any"
    names = {str: "string", int: "integer", float: "number", bool: "boolean"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def default_text(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if value == "":
        return '""'
    if isinstance(value, (list, dict)):
        return "`" + (str(value).replace("'", "") if value else ("[]" if isinstance(value, list) else "{}")) + "`"
    if isinstance(value, str):
        return f"`{value}`"
    return f"{value:g}" if isinstance(value, float) else str(value)


def rows(cls, instance, prefix: str, comments: dict, other=None) -> list[str]:
    """One table row per key of `cls` under `prefix`; sections recurse. `other`: a second instance
    whose defaults differ (rl.train beside sft.train), shown as `a / b`."""
    from dalign_jax.config import Endpoint, Train

    out = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        key, hint = prefix + field.name, hints[field.name]
        value = getattr(instance, field.name)
        if dataclasses.is_dataclass(hint) and hint is Train:
            if prefix == "sft.":  # one set of rows for both trainers
                from dalign_jax.config import RL

                out += rows(Train, value, "*.train.", comments, RL().train)
            continue
        if dataclasses.is_dataclass(hint):
            out += rows(hint, value, key + ".", comments)
            continue
        section = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a) and a.__name__ != "Endpoint"]
        if section and value is None:  # an optional section (rl.rollout_mesh): its row, then its keys' defaults
            out.append(f"| `{key}` | section or null | null | {comments.get((cls.__name__, field.name), '')} |")
            out += rows(section[0], section[0](), key + ".", comments)
            continue
        default = default_text(value)
        if other is not None and getattr(other, field.name) != value:
            default = f"{default} / {default_text(getattr(other, field.name))}"
        if key == "distill.force_format":
            default = "true (local teacher), false (endpoint)"
        out.append(f"| `{key}` | {type_name(hint)} | {default} | {comments.get((cls.__name__, field.name), '')} |")
        if key == "models.judge":  # the endpoint's keys, once for both roles
            out += rows(Endpoint, Endpoint(endpoint="URL"), "models.<role>.", comments)
    return out


def render() -> str:
    sys.path.insert(0, str(ROOT))
    from dalign_jax.config import Config

    comments = field_comments(SOURCE.read_text())
    comments.update(field_comments((ROOT / "dalign_jax" / "engine" / "remote.py").read_text()))
    table = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    table += rows(Config, Config(), "", comments)
    return HEADER + "\n" + "\n".join(table) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    text = render()
    if args.check:
        if DOC.read_text() != text:
            print(f"{DOC} differs from the config: run python tools/config_doc.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
