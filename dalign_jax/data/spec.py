"""The safety spec: Markdown policies a person edits, parsed into citable sections.

A category file reads:

    # Title
    ID: IB
    Summary: one paragraph (may run over several lines)
    ## Definitions
    ...free text...
    ## Rules
    ### IB-1 [comply] Short title
    body text

Modes are `comply`, `refuse` and `safe_complete`. Section IDs are unique across the spec and start
with their category's ID. `spec.render(category)` is the paper's spec(category): the full policy of
one category, a summary of every other, and the style guidelines.
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path

from dalign_jax.errors import UserError
from dalign_jax.userfiles import load_yaml, read_text

MODES = ("comply", "refuse", "safe_complete")
_SECTION = re.compile(r"^###\s+([A-Z]+)-(\d+)\s+\[(\w+)\]\s+(.+?)\s*$")


@dataclasses.dataclass(frozen=True)
class Section:
    id: str
    mode: str
    title: str
    text: str


@dataclasses.dataclass(frozen=True)
class Policy:
    key: str  # manifest key, the `category` of prompts
    title: str
    prefix: str  # section ID prefix, e.g. IB
    summary: str
    definitions: str
    sections: tuple[Section, ...]

    def render_full(self) -> str:
        rules = "\n\n".join(f"{s.id} ({s.mode}) {s.title}: {s.text}" for s in self.sections)
        return f"## {self.title} ({self.prefix}): the policy for this request\n{self.definitions}\n\n{rules}"


@dataclasses.dataclass(frozen=True)
class Spec:
    name: str
    policies: dict[str, Policy]
    style: str
    version: str  # sha256 of the manifest and every file it lists, first 16 hex digits

    @property
    def categories(self) -> list[str]:
        return list(self.policies)

    @property
    def section_ids(self) -> set[str]:
        return {s.id for p in self.policies.values() for s in p.sections}

    def policy(self, category: str) -> Policy:
        if category not in self.policies:
            raise UserError(f"unknown category {category!r} (the spec has: {', '.join(self.policies)})")
        return self.policies[category]

    def render(self, category: str) -> str:
        """spec(category): the full policy of `category`, summaries of the others, the style guide."""
        policy = self.policy(category)
        others = "\n".join(f"- {p.title} ({p.prefix}): {p.summary}" for k, p in self.policies.items() if k != category)
        return (f"# Safety specification\n\n{policy.render_full()}\n\n"
                f"## Other categories (summaries)\n{others}\n\n{self.style}")


def _parse_policy(key: str, path: Path) -> Policy:
    lines = read_text(path, "spec file listed in the manifest").splitlines()
    title = prefix = None
    summary: list[str] = []
    definitions: list[str] = []
    sections: list[list] = []
    part = "head"
    for n, line in enumerate(lines, 1):
        where = f"{path}:{n}"
        if part == "head" and line.startswith("# ") and title is None:
            title = line[2:].strip()
        elif part == "head" and line.startswith("ID:"):
            prefix = line[3:].strip()
            if not re.fullmatch(r"[A-Z]+", prefix):
                raise UserError(f"{where}: ID must be capital letters, got {prefix!r}")
        elif part == "head" and line.startswith("Summary:"):
            summary.append(line[8:].strip())
            part = "summary"
        elif part == "summary" and line.strip() and not line.startswith("#"):
            summary.append(line.strip())
        elif line.startswith("## "):
            heading = line[3:].strip().lower()
            if heading not in ("definitions", "rules"):
                raise UserError(f"{where}: unknown heading {line.strip()!r} (expected '## Definitions' or '## Rules')")
            part = heading
        elif line.startswith("###"):
            m = _SECTION.match(line)
            if part != "rules" or not m:
                raise UserError(f"{where}: a rule heading reads '### {prefix or 'XX'}-1 [comply] Title' under '## Rules'")
            sec_prefix, number, mode, sec_title = m.groups()
            if sec_prefix != prefix:
                raise UserError(f"{where}: section {sec_prefix}-{number} does not start with this file's ID {prefix}")
            if mode not in MODES:
                raise UserError(f"{where}: mode [{mode}] must be one of {', '.join(MODES)}")
            sections.append([f"{sec_prefix}-{number}", mode, sec_title, [], n])
        elif part == "definitions":
            definitions.append(line)
        elif part == "rules" and sections:
            sections[-1][3].append(line.strip())
        elif line.strip() and part != "summary":
            raise UserError(f"{where}: unexpected text {line.strip()[:40]!r}")
    for field, value in (("'# Title'", title), ("'ID:'", prefix), ("'Summary:'", summary), ("rules", sections)):
        if not value:
            raise UserError(f"{path}: missing {field}")
    built = []
    for sid, mode, sec_title, body, n in sections:
        text = " ".join(x for x in body if x)
        if not text:
            raise UserError(f"{path}:{n}: section {sid} has no text")
        built.append(Section(sid, mode, sec_title, text))
    return Policy(key, title, prefix, " ".join(summary), "\n".join(definitions).strip(), tuple(built))


def _check_citations(policies: dict[str, Policy], seen: dict[str, Path]) -> None:
    """A rule that cites another ("see IB-3") must cite one that exists: a renumbered spec would
    otherwise teach the model to cite sections that are gone."""
    prefixes = "|".join(sorted(p.prefix for p in policies.values()))
    citation = re.compile(rf"\b(?:{prefixes})-\d+\b")
    for policy in policies.values():
        for section in policy.sections:
            for cited in citation.findall(f"{section.title} {section.text}"):
                if cited not in seen:
                    raise UserError(f"{seen[section.id]}: section {section.id} cites {cited}, which does not exist")


def _inside(spec_dir: Path, filename, manifest_path: Path, field: str) -> Path:
    """A manifest entry's file, which must lie in the spec directory: the spec's hash covers only it."""
    path = spec_dir / str(filename)
    if not path.resolve().is_relative_to(spec_dir.resolve()):
        raise UserError(f"{manifest_path}: field {field}: {filename!r} lies outside the spec directory {spec_dir}")
    return path


def load_spec(spec_dir: str | Path) -> Spec:
    spec_dir = Path(spec_dir)
    manifest_path = spec_dir / "manifest.yaml"
    if not manifest_path.is_file():
        raise UserError(f"{manifest_path}: spec manifest does not exist")
    manifest = load_yaml(read_text(manifest_path, "spec manifest"), str(manifest_path))
    if not isinstance(manifest, dict) or not isinstance(manifest.get("categories"), dict) or not manifest["categories"]:
        raise UserError(f"{manifest_path}: field categories: expected a mapping of category -> file")
    if not isinstance(manifest.get("style"), str):
        raise UserError(f"{manifest_path}: field style: expected the style guide's file name")
    digest = hashlib.sha256(manifest_path.read_bytes())
    policies, seen = {}, {}
    for key, filename in manifest["categories"].items():
        path = _inside(spec_dir, filename, manifest_path, f"categories.{key}")
        policy = _parse_policy(str(key), path)
        for section in policy.sections:
            if section.id in seen:
                raise UserError(f"{path}: section ID {section.id} is also used in {seen[section.id]}")
            seen[section.id] = path
        if policy.prefix in {p.prefix for p in policies.values()}:
            raise UserError(f"{path}: ID {policy.prefix} is used by another category")
        policies[str(key)] = policy
        digest.update(path.read_bytes())
    _check_citations(policies, seen)
    style_path = _inside(spec_dir, manifest["style"], manifest_path, "style")
    style = read_text(style_path, "style guide listed in the manifest").strip()
    digest.update(style_path.read_bytes())
    return Spec(str(manifest.get("name", spec_dir.name)), policies, style, digest.hexdigest()[:16])
