"""Prompt sets: our JSONL format, its validation and split, and loaders for public sets.

A line: {"id": str, "category": str, "messages": [{"role", "content"}, ...],
"expected_mode": "comply" | "refuse" | "safe_complete" (optional), "kind": str (optional)}.
"""
from __future__ import annotations

import csv
import io
import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Iterable

from dalign_jax.data.spec import MODES
from dalign_jax.errors import UserError
from dalign_jax.userfiles import read_text

ROLES = ("system", "user", "assistant")
HELDOUT_PERCENT = 20


@dataclasses.dataclass(frozen=True)
class Prompt:
    id: str
    category: str
    messages: tuple[tuple[str, str], ...]  # (role, content), hashable
    expected_mode: str | None = None
    kind: str | None = None

    def chat(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages]

    def to_json(self) -> dict:
        row = {"id": self.id, "category": self.category, "messages": self.chat()}
        if self.expected_mode:
            row["expected_mode"] = self.expected_mode
        if self.kind:
            row["kind"] = self.kind
        return row


def is_heldout(prompt_id: str) -> bool:
    """The fixed split rule: a prompt is held out when the hash of its id falls in the first 20%."""
    return int(hashlib.sha256(prompt_id.encode()).hexdigest()[:8], 16) % 100 < HELDOUT_PERCENT


def split(prompts: Iterable[Prompt], part: str) -> list[Prompt]:
    if part not in ("train", "heldout", "all"):
        raise UserError(f"prompts.split: {part!r} must be train, heldout or all")
    return [p for p in prompts if part == "all" or is_heldout(p.id) == (part == "heldout")]


def grouped(prompts: Iterable[Prompt], key) -> list[list[Prompt]]:
    """The prompts in groups of equal `key`, groups in first-seen order, order within a group kept."""
    groups: dict = {}
    for p in prompts:
        groups.setdefault(key(p), []).append(p)
    return list(groups.values())


def interleave(prompts: Iterable[Prompt], key) -> list[Prompt]:
    """The prompts taken in turn from each group of equal `key`, groups in first-seen order."""
    queues = grouped(prompts, key)
    return [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]


def mixed(prompts: Iterable[Prompt]) -> list[Prompt]:
    """Every category in turn and, within a category, every expected mode in turn: prompt sets are
    sorted by category and mostly by mode, so that any head of this order covers all of them alike."""
    within = [p for group in grouped(prompts, lambda p: p.category)
              for p in interleave(group, lambda p: p.expected_mode)]
    return interleave(within, lambda p: p.category)


def validate_messages(messages, where: str) -> tuple[tuple[str, str], ...]:
    """A conversation to answer, as (role, content) pairs: non-empty texts, the user's turn last."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: field messages: expected a non-empty list")
    parsed = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise UserError(f"{where}: field messages[{i}]: expected {{'role': one of {ROLES}, 'content': string}}")
        if not m["content"].strip():
            raise UserError(f"{where}: field messages[{i}].content: empty prompt")
        parsed.append((m["role"], m["content"]))
    if parsed[-1][0] != "user":
        raise UserError(f"{where}: field messages: the last message must be the user's")
    return tuple(parsed)


def _validate(row, where: str, categories: set[str]) -> Prompt:
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object")
    for field in ("id", "category", "messages"):
        if field not in row:
            raise UserError(f"{where}: field {field} is missing")
    if not isinstance(row["id"], str) or not row["id"].strip():
        raise UserError(f"{where}: field id: expected a non-empty string")
    if row["category"] not in categories:
        raise UserError(f"{where}: field category: unknown category {row['category']!r} "
                        f"(the spec has: {', '.join(sorted(categories))})")
    parsed = validate_messages(row["messages"], where)
    mode = row.get("expected_mode")
    if mode is not None and mode not in MODES:
        raise UserError(f"{where}: field expected_mode: {mode!r} must be one of {', '.join(MODES)}")
    return Prompt(row["id"], row["category"], parsed, mode, row.get("kind"))


def read_prompts(path: str | Path, categories: Iterable[str]) -> list[Prompt]:
    """Every prompt of a JSONL file, validated; errors name the file, line and field."""
    path = Path(path)
    text = read_text(path, "prompts file")
    categories = set(categories)
    prompts, ids = [], {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: malformed JSON line: {e.msg}") from None
        prompt = _validate(row, f"{path}:{n}", categories)
        if prompt.id in ids:
            raise UserError(f"{path}:{n}: field id: {prompt.id!r} repeats line {ids[prompt.id]}")
        ids[prompt.id] = n
        prompts.append(prompt)
    if not prompts:
        raise UserError(f"{path}: no prompts")
    return prompts


# Public sets hold only requests a safe assistant refuses; their categories map onto ours.
STRONGREJECT_CATEGORIES = {
    "Non-violent crimes": "illicit",
    "Violence": "violence",
    "Disinformation and deception": "illicit",
    "Hate, harassment and discrimination": "harassment",
    "Illegal goods and services": "illicit",
    "Sexual content": "erotic",
}
# AdvBench has no categories: the first keyword rule that matches a goal decides (default: illicit).
ADVBENCH_KEYWORDS = [
    (r"suicide|self-harm|self harm|eating disorder|anorexi|bulimi|cut themselves", "self_harm"),
    (r"terror|extremis|radicali|jihad", "extremism"),
    (r"sexual|porn|explicit content|nude", "erotic"),
    (r"hate|racis|harass|bully|cyberbully|discriminat|stalk|dox", "harassment"),
    (r"murder|kill|assault|violen|attack|hurt|harm (a|an|someone|people)|assassinat|shoot", "violence"),
    (r"prescription|medical advice|medication", "regulated_advice"),
]


def _read_csv(path: Path, column: str) -> list[dict]:
    rows = list(csv.DictReader(io.StringIO(read_text(path, "prompts file"), newline="")))
    if not rows or column not in rows[0]:
        raise UserError(f"{path}: expected a CSV with a {column!r} column")
    return rows


def load_strongreject(path: str | Path) -> list[Prompt]:
    path = Path(path)
    prompts = []
    for n, row in enumerate(_read_csv(path, "forbidden_prompt"), 1):
        category = STRONGREJECT_CATEGORIES.get(row.get("category", ""))
        if category is None:
            raise UserError(f"{path}: row {n}: field category: {row.get('category')!r} has no mapping")
        prompts.append(Prompt(f"strongreject-{n:03d}", category, (("user", row["forbidden_prompt"]),), "refuse",
                              "disallowed"))
    return prompts


def advbench_category(goal: str) -> str:
    for pattern, category in ADVBENCH_KEYWORDS:
        if re.search(pattern, goal, re.IGNORECASE):
            return category
    return "illicit"


def load_advbench(path: str | Path) -> list[Prompt]:
    path = Path(path)
    return [Prompt(f"advbench-{n:03d}", advbench_category(row["goal"]), (("user", row["goal"]),), "refuse",
                   "disallowed")
            for n, row in enumerate(_read_csv(path, "goal"), 1)]


def load_prompt_set(path: str | Path, categories: Iterable[str]) -> list[Prompt]:
    """Our JSONL, or a public CSV set recognised by its columns (AdvBench `goal`, StrongREJECT
    `forbidden_prompt`)."""
    path = Path(path)
    if path.suffix != ".csv":
        return read_prompts(path, categories)
    header = next(csv.reader(io.StringIO(read_text(path, "prompts file"), newline="")), [])
    if "forbidden_prompt" in header:
        return load_strongreject(path)
    if "goal" in header:
        return load_advbench(path)
    if "prompt" in header:
        return load_labelled_csv(path, set(categories))
    raise UserError(f"{path}: unknown CSV prompt set (expected a 'prompt', 'goal' or 'forbidden_prompt' column)")


LABELS = {"refuse": "refuse", "harmful": "refuse", "unsafe": "refuse", "1": "refuse", "comply": "comply",
          "benign": "comply", "safe": "comply", "0": "comply", "safe_complete": "safe_complete"}


def load_labelled_csv(path: Path, categories: set[str]) -> list[Prompt]:
    """A CSV with a `prompt` column and a `label` or `expected_mode` column (refuse/comply/safe_complete,
    or harmful/benign, unsafe/safe, 1/0), and optionally `category` (else guessed from the words)."""
    rows = _read_csv(path, "prompt")
    column = "expected_mode" if "expected_mode" in rows[0] else "label" if "label" in rows[0] else None
    if column is None:
        raise UserError(f"{path}: expected a 'label' or 'expected_mode' column beside 'prompt'")
    prompts = []
    for n, row in enumerate(rows, 2):  # line 1 is the header
        mode = LABELS.get(str(row[column]).strip().lower())
        if mode is None:
            raise UserError(f"{path}:{n}: field {column}: {row[column]!r} is not one of {', '.join(LABELS)}")
        if not row["prompt"].strip():
            raise UserError(f"{path}:{n}: field prompt: empty prompt")
        category = row.get("category") or advbench_category(row["prompt"])
        if category not in categories:
            raise UserError(f"{path}:{n}: field category: unknown category {category!r}")
        prompts.append(Prompt(f"{path.stem}-{n - 1:04d}", category, (("user", row["prompt"]),), mode))
    return prompts
