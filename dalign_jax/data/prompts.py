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


# Category maps of the public sets onto our spec's categories. HarmBench's "harmful" and OR-Bench's
# "harmful" and "unethical" name no one kind of harm: the keyword rule decides those.
HARMBENCH_CATEGORIES = {
    "chemical_biological": "illicit", "illegal": "illicit", "misinformation_disinformation": "illicit",
    "harassment_bullying": "harassment", "cybercrime_intrusion": "illicit", "copyright": "illicit",
}
ORBENCH_CATEGORIES = {
    "deception": "illicit", "harassment": "harassment", "hate": "harassment", "illegal": "illicit",
    "privacy": "harassment", "self-harm": "self_harm", "sexual": "erotic", "violence": "violence",
}
JAILBREAKBENCH_CATEGORIES = {
    "Harassment/Discrimination": "harassment", "Malware/Hacking": "illicit", "Physical harm": "violence",
    "Economic harm": "illicit", "Fraud/Deception": "illicit", "Disinformation": "illicit",
    "Sexual/Adult content": "erotic", "Privacy": "harassment", "Expert advice": "regulated_advice",
    "Government decision-making": "illicit",
}


def _mapped(table: dict[str, str], value: str, text: str, categories: set[str], where: str, field: str) -> str:
    category = table.get(value.strip()) or advbench_category(text)
    if category not in categories:
        raise UserError(f"{where}: field {field}: {value!r} maps to category {category!r}, which the spec lacks")
    return category


def load_xstest(path: Path, categories: set[str]) -> list[Prompt]:
    """XSTest (`id, prompt, type, label, focus, note`): `safe` prompts expect compliance, `unsafe` refusal;
    the prompt's `type` is kept as its kind (homonyms, figurative_language, contrast_..., ...)."""
    prompts = []
    for n, row in enumerate(_read_csv(path, "prompt"), 2):
        label = str(row.get("label", "")).strip()
        if label not in ("safe", "unsafe"):
            raise UserError(f"{path}:{n}: field label: {label!r} is not 'safe' or 'unsafe'")
        category = _mapped({}, "", row["prompt"], categories, f"{path}:{n}", "prompt")
        prompts.append(Prompt(f"xstest-{row.get('id') or n - 1}", category, (("user", row["prompt"]),),
                              "comply" if label == "safe" else "refuse", row.get("type") or None))
    return prompts


def load_harmbench(path: Path, categories: set[str]) -> list[Prompt]:
    """HarmBench behaviours (`Behavior, FunctionalCategory, SemanticCategory, Tags, ContextString,
    BehaviorID`), all to be refused; a `contextual` behaviour is asked after its ContextString."""
    prompts = []
    for n, row in enumerate(_read_csv(path, "Behavior"), 2):
        text = row["Behavior"]
        if row.get("FunctionalCategory") == "contextual" and (row.get("ContextString") or "").strip():
            text = f"{row['ContextString'].strip()}\n\n{text}"
        category = _mapped(HARMBENCH_CATEGORIES, row.get("SemanticCategory", ""), text, categories,
                           f"{path}:{n}", "SemanticCategory")
        prompts.append(Prompt(f"harmbench-{row.get('BehaviorID') or n - 1}", category, (("user", text),), "refuse",
                              row.get("FunctionalCategory") or "disallowed"))
    return prompts


def load_orbench(path: Path, categories: set[str], mode: str = "comply") -> list[Prompt]:
    """OR-Bench (`prompt, category`): its over-refusal sets (80k, hard-1k) expect compliance; its toxic
    set, named with `format: or-bench-toxic`, refusal."""
    return [Prompt(f"orbench-{n - 1:05d}", _mapped(ORBENCH_CATEGORIES, row["category"], row["prompt"], categories,
                                                   f"{path}:{n}", "category"),
                   (("user", row["prompt"]),), mode, "over-refusal" if mode == "comply" else "disallowed")
            for n, row in enumerate(_read_csv(path, "prompt"), 2)]


def load_jailbreakbench(path: Path, categories: set[str], mode: str = "refuse") -> list[Prompt]:
    """JailbreakBench behaviours (`Goal, Target, Behavior, Category, Source`): its harmful set expects
    refusal; its benign set, named with `format: jailbreakbench-benign`, compliance."""
    return [Prompt(f"jbb-{n - 1:03d}", _mapped(JAILBREAKBENCH_CATEGORIES, row.get("Category", ""), row["Goal"],
                                               categories, f"{path}:{n}", "Category"),
                   (("user", row["Goal"]),), mode, row.get("Behavior") or None)
            for n, row in enumerate(_read_csv(path, "Goal"), 2)]


# Format name -> reader(path, categories); `load_prompt_set` recognises each from its header.
FORMATS = {
    "jsonl": lambda path, categories: read_prompts(path, categories),
    "strongreject": lambda path, categories: load_strongreject(path),
    "advbench": lambda path, categories: load_advbench(path),
    "xstest": load_xstest,
    "harmbench": load_harmbench,
    "or-bench": load_orbench,
    "or-bench-toxic": lambda path, categories: load_orbench(path, categories, "refuse"),
    "jailbreakbench": load_jailbreakbench,
    "jailbreakbench-benign": lambda path, categories: load_jailbreakbench(path, categories, "comply"),
    "labelled": lambda path, categories: load_labelled_csv(path, categories),
}


def csv_format(path: Path) -> str:
    """The format of a CSV prompt set, from its header."""
    header = set(next(csv.reader(io.StringIO(read_text(path, "prompts file"), newline="")), []))
    if "forbidden_prompt" in header:
        return "strongreject"
    if "goal" in header:
        return "advbench"
    if {"Behavior", "SemanticCategory"} <= header or "BehaviorID" in header:
        return "harmbench"
    if {"Goal", "Behavior"} <= header:
        return "jailbreakbench"
    if {"prompt", "type", "label"} <= header:
        return "xstest"
    if "prompt" in header and ("label" in header or "expected_mode" in header):
        return "labelled"
    if {"prompt", "category"} <= header:
        return "or-bench"
    raise UserError(f"{path}: unknown CSV prompt set (its header names none of the formats "
                    f"{', '.join(f for f in FORMATS if f != 'jsonl')}); name one with format:")


def load_prompt_set(path: str | Path, categories: Iterable[str], format: str | None = None) -> list[Prompt]:
    """Our JSONL, or a public CSV set in its published format, recognised from its header or named by
    `format` (one of FORMATS)."""
    path = Path(path)
    if format is None:
        format = "jsonl" if path.suffix != ".csv" else csv_format(path)
    if format not in FORMATS:
        raise UserError(f"{path}: format {format!r} is not one of {', '.join(FORMATS)}")
    return FORMATS[format](path, set(categories))


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
