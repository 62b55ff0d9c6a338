"""The spec, spec(category), prompt sets, the completion format and the config."""
import json
import shutil
from pathlib import Path

import pytest

from dalign_jax.config import load_config
from dalign_jax.data.completion import ANSWER_DELIMITER, format_completion, parse_completion
from dalign_jax.data.prompts import (is_heldout, load_prompt_set, read_prompts, split)
from dalign_jax.data.spec import load_spec
from dalign_jax.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SPEC = load_spec(ROOT / "specs")
CATEGORIES = ["erotic", "extremism", "harassment", "illicit", "regulated_advice", "self_harm", "violence"]


def test_spec_has_seven_categories_with_all_three_modes():
    assert SPEC.categories == CATEGORIES
    modes = {s.mode for p in SPEC.policies.values() for s in p.sections}
    assert modes == {"comply", "refuse", "safe_complete"}
    for policy in SPEC.policies.values():
        assert all(s.id.startswith(policy.prefix + "-") for s in policy.sections)
        assert {"comply", "refuse"} <= {s.mode for s in policy.sections}
    assert "IB-2" in SPEC.section_ids and len(SPEC.version) == 16


def test_render_holds_one_full_policy_the_other_summaries_and_the_style_guide():
    text = SPEC.render("illicit")
    for section in SPEC.policy("illicit").sections:
        assert section.id in text and section.text in text
    for key, policy in SPEC.policies.items():
        if key != "illicit":
            assert policy.summary in text
            assert not any(s.text in text for s in policy.sections)  # only summaries of the others
    assert "Hard refusal" in text and "crisis line" in text
    with pytest.raises(UserError, match="unknown category 'cooking'"):
        SPEC.render("cooking")


def edited_spec(tmp_path, filename, old, new):
    spec_dir = shutil.copytree(ROOT / "specs", tmp_path / "specs")
    path = spec_dir / filename
    path.write_text(path.read_text().replace(old, new, 1))
    return spec_dir


@pytest.mark.parametrize("filename, old, new, message", [
    ("violence.md", "### VI-2 [comply]", "### VI-1 [comply]", "section ID VI-1 is also used"),
    ("violence.md", "### VI-2 [comply]", "### IB-2 [comply]", "does not start with this file's ID VI"),
    ("violence.md", "### VI-2 [comply]", "### VI-2 [maybe]", "violence.md:.*mode \\[maybe\\]"),
    ("violence.md", "ID: VI", "ID: IB", "section VI-1 does not start with this file.s ID IB"),
    ("manifest.yaml", "violence.md", "missing.md", "missing.md: spec file listed in the manifest does not exist"),
    ("manifest.yaml", "categories:", "categoriez:", "field categories"),
])
def test_bad_spec_is_a_clear_error(tmp_path, filename, old, new, message):
    with pytest.raises(UserError, match=message):
        load_spec(edited_spec(tmp_path, filename, old, new))


def test_editing_the_spec_changes_its_version(tmp_path):
    edited = load_spec(edited_spec(tmp_path, "violence.md", "Wars, massacres", "Wars, battles, massacres"))
    assert edited.version != SPEC.version and "Wars, battles, massacres" in edited.render("violence")


def test_our_prompt_set_covers_every_category_and_mode_and_splits_by_a_fixed_rule():
    prompts = read_prompts(ROOT / "specs/prompts/safety_prompts.jsonl", SPEC.categories)
    assert len(prompts) >= 350
    for category in CATEGORIES:
        modes = {p.expected_mode for p in prompts if p.category == category}
        assert modes == {"comply", "refuse", "safe_complete"}, category
    kinds = {p.kind for p in prompts}
    assert kinds == {"benign", "borderline", "safe_completion", "disallowed"}
    train, heldout = split(prompts, "train"), split(prompts, "heldout")
    assert len(train) + len(heldout) == len(prompts) and not {p.id for p in train} & {p.id for p in heldout}
    assert 0.1 < len(heldout) / len(prompts) < 0.3
    assert all(is_heldout(p.id) for p in heldout)


def test_public_sets_load_with_categories_mapped():
    if not SHARED.is_dir():
        pytest.skip("../shared/data is not beside the checkout")
    strongreject = load_prompt_set(SHARED / "strongreject_dataset.csv", SPEC.categories)
    advbench = load_prompt_set(SHARED / "advbench_harmful_behaviors.csv", SPEC.categories)
    assert len(strongreject) == 313 and len(advbench) == 520
    assert {p.category for p in strongreject} == {"illicit", "violence", "harassment", "erotic"}
    assert all(p.expected_mode == "refuse" for p in strongreject + advbench)
    assert {p.category for p in advbench} >= {"illicit", "violence", "self_harm"}


BAD_LINES = [
    ('{"id": "a", "category": "violence", "messages": [{"role": "user", "content": "x"}]', "malformed JSON line"),
    ('{"id": "a", "category": "cooking", "messages": [{"role": "user", "content": "x"}]}', "unknown category"),
    ('{"id": "a", "category": "violence", "messages": [{"role": "user", "content": "  "}]}', "empty prompt"),
    ('{"id": "a", "category": "violence", "messages": [{"role": "user", "content": "x"}], "expected_mode": "maybe"}',
     "field expected_mode"),
    ('{"id": "a", "category": "violence"}', "field messages is missing"),
    ('{"id": "a", "category": "violence", "messages": [{"role": "bot", "content": "x"}]}', "field messages\\[0\\]"),
]


@pytest.mark.parametrize("line, message", BAD_LINES)
def test_bad_prompt_lines_name_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "ok", "category": "violence", "messages": [{"role": "user", "content": "hi"}]}\n' + line + "\n")
    with pytest.raises(UserError, match=f"p.jsonl:2: .*{message}"):
        read_prompts(path, SPEC.categories)


def test_duplicate_prompt_ids_are_an_error(tmp_path):
    row = '{"id": "a", "category": "violence", "messages": [{"role": "user", "content": "x"}]}\n'
    (tmp_path / "p.jsonl").write_text(row * 2)
    with pytest.raises(UserError, match="repeats line 1"):
        read_prompts(tmp_path / "p.jsonl", SPEC.categories)


def test_completion_parsing():
    text = format_completion("Analysis: IB-4 says weapons are refused; see also IB-4 and VI-4. Decision: refuse",
                             "I'm sorry, but I can't help with that.")
    parsed = parse_completion(text)
    assert parsed.status == "ok" and parsed.decision == "refuse"
    assert parsed.cited_sections == ("IB-4", "VI-4") and parsed.answer == "I'm sorry, but I can't help with that."
    assert ANSWER_DELIMITER not in parsed.cot
    assert parse_completion("Analysis: no delimiter here").status == "no_delimiter"
    assert parse_completion("Analysis: cut off", finished=False).status == "truncated"
    assert parse_completion(f"Analysis: x\n{ANSWER_DELIMITER}\n").status == "empty_answer"
    assert parse_completion(f"Analysis:\n{ANSWER_DELIMITER}\nHi").status == "empty_cot"
    assert parse_completion("Analysis: ... Decision: safe completion\n### Final answer\nok").decision == "safe_complete"


def test_trim_answer_keeps_whole_sentences():
    from dalign_jax.data.completion import trim_answer

    refusal = "I'm sorry, but I can't help with that. I'm only happy to say more about"
    assert trim_answer(refusal, finished=False) == (refusal, False)  # no trimming asked for
    assert trim_answer(refusal, finished=False, trim_truncated=True) == ("I'm sorry, but I can't help with that.", True)
    assert trim_answer(refusal + " it.", finished=True, max_sentences=1) == ("I'm sorry, but I can't help with that.", True)
    assert trim_answer("One. Two.", finished=True, max_sentences=2) == ("One. Two.", True)  # nothing after the limit
    assert trim_answer("Steps:\n1. Boil water\n2. Add", finished=False, trim_truncated=True) == \
        ("Steps:\n1. Boil water\n2. Add", False)  # "1." is a list marker, not a sentence end
    assert trim_answer('He said "stop." Then he ran and', finished=False, trim_truncated=True) == \
        ('He said "stop."', True)
    assert trim_answer("No full sentence yet", finished=False, trim_truncated=True) == ("No full sentence yet", False)


def test_config_overrides_and_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run_dir: runs/x\ndistill:\n  samples_per_prompt: 3\n")
    config = load_config(path, ["distill.temperature=0.5", "prompts.path=other.jsonl", "judge.mode=generate"])
    assert config.distill.samples_per_prompt == 3 and config.distill.temperature == 0.5
    assert config.prompts.path == "other.jsonl" and config.judge.mode == "generate"
    with pytest.raises(UserError, match="unknown config key distill.temprature \\(did you mean distill.temperature"):
        load_config(path, ["distill.temprature=1"])
    with pytest.raises(UserError, match="config key distill.samples_per_prompt: expected int, got 'two'"):
        load_config(path, ["distill.samples_per_prompt=two"])
    with pytest.raises(UserError, match="config key judge.mode: expected one of"):
        load_config(path, ["judge.mode=vibes"])
    # A section given in part keeps its parent's defaults for the rest: RL's optimiser is not SFT's.
    rl_train = load_config(path, ["rl.train.learning_rate=3e-5"]).rl.train
    assert (rl_train.learning_rate, rl_train.warmup_steps, rl_train.save_every) == (3e-5, 0, 10)
    sft_train = load_config(path, ["sft.train.learning_rate=3e-5"]).sft.train
    assert (sft_train.learning_rate, sft_train.warmup_steps, sft_train.save_every) == (3e-5, 10, 50)
    path.write_text("distill: [1, 2]\n")
    with pytest.raises(UserError, match="distill: expected a mapping"):
        load_config(path)
    json.dumps(load_config(None).__dict__, default=str)  # a default config needs no file
