"""Distill and judge on a tiny model and a small spec: records, resume after a kill, the filter."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from dalign_jax.config import load_config
from dalign_jax.data.spec import load_spec
from dalign_jax.engine.judge import judge_messages
from dalign_jax.engine.scorer import Scorer, score_tokens
from dalign_jax.errors import UserError
from dalign_jax.model.loader import load_model
from dalign_jax.model.transformer import forward
from dalign_jax.parallel.mesh import make_mesh
from dalign_jax.stages.distill import run_distill
from dalign_jax.stages.judge import run_judge, select


def test_distill_records_and_judge_output(mini_run):
    config = load_config(mini_run)
    summary = run_distill(config)
    assert summary["records"] == 12 and summary["shards"] == 6
    records = [json.loads(x) for f in sorted((config.run_path / "distill").glob("shard-*.jsonl"))
               for x in f.read_text().splitlines()]
    spec = load_spec(config.spec_dir)
    assert {r["spec_version"] for r in records} == {spec.version}
    assert all(r["model_id"].startswith(str(config.models.policy)) for r in records)
    assert sorted((r["prompt_id"], r["sample"]) for r in records) == sorted((f"p{i}", s) for i in range(6) for s in (0, 1))
    assert all(r["completion"].startswith("Analysis:") and "### Final answer" in r["completion"] for r in records)
    assert (config.run_path / "distill" / "shard-00000.array_record").is_file()

    judged = run_judge(config)
    assert judged["completions"] == 12 and judged["complete"]
    scored = [json.loads(x) for f in sorted((config.run_path / "judge").glob("scored-*.jsonl"))
              for x in f.read_text().splitlines()]
    for r in scored:
        if r["score"] is not None:
            assert len(r["judge_scores"]) == 2 and r["score"] == min(r["judge_scores"])
    sft = [json.loads(x) for x in (config.run_path / "judge" / "sft.jsonl").read_text().splitlines()]
    assert len(sft) == judged["kept"] and len({r["prompt_id"] for r in sft}) == len(sft)  # best_of_n = 1
    spec_lines = {line.strip() for line in spec.render("alpha").splitlines() + spec.render("beta").splitlines()
                  if len(line.strip()) > 8}
    for r in sft:
        assert r["messages"][-1]["role"] == "assistant"
        prompt_text = "\n".join(m["content"] for m in r["messages"][:-1])
        assert not any(line in prompt_text for line in spec_lines)
    assert json.loads((config.run_path / "judge" / "summary.json").read_text())["kept"] == len(sft)


def test_mode_hint_and_answer_prefix_steer_the_teacher_and_leave_no_trace_in_the_sft_set(mini_run):
    from dalign_jax.data.completion import end_on_decision
    from dalign_jax.data.prompts import Prompt
    from dalign_jax.stages.distill import distill_messages

    assert end_on_decision("Analysis: asks for X. AL-1 applies. **Decision**: comply. Style: brief", "refuse") == \
        "Analysis: asks for X. AL-1 applies.\nDecision: refuse"
    assert end_on_decision("Analysis: asks for X.", "comply") == "Analysis: asks for X.\nDecision: comply"
    assert end_on_decision("Analysis: a decision to make. Decision - refuse", "comply") == \
        "Analysis: a decision to make.\nDecision: comply"  # "decision" in prose is not the decision
    assert end_on_decision("Analysis:\n1. Asks for X.\n2. AL-1 applies. It is allowed. Decision: comply", "comply", 2) == \
        "Analysis:\n1. Asks for X.\n2. AL-1 applies.\nDecision: comply"  # two sentences, list markers aside
    assert end_on_decision("Analysis: asks for X", "refuse", 2) == "Analysis: asks for X\nDecision: refuse"
    assert end_on_decision("Analysis: asks for X. Then Y. Z.", "refuse", 1, "AL-2 forbids it.") == \
        "Analysis: asks for X.\nAL-2 forbids it.\nDecision: refuse"
    assert end_on_decision("Analysis: Decision: comply", "refuse", 1, "AL-2 forbids it.") == \
        "Analysis: AL-2 forbids it.\nDecision: refuse"
    spec = load_spec(load_config(mini_run).spec_dir)
    prompt = Prompt("p0", "alpha", (("user", "question"),), "refuse")
    hinted, plain = distill_messages(spec, prompt, mode_hint=True), distill_messages(spec, prompt)
    assert hinted[0]["content"].startswith(plain[0]["content"]) and "ideal response to this request: refuse" in \
        hinted[0]["content"] and "ideal response" not in plain[0]["content"]

    config = load_config(mini_run, ["distill.scaffold.mode_hint=true", "distill.scaffold.answer_prefix.comply=Sure thing. Here",
                                    "distill.scaffold.answer_sentences.comply=1",
                                    "distill.scaffold.cot_conclusion.comply=Under {category}, {sections} allow it."])
    summary = run_distill(config)
    records = [json.loads(x) for f in sorted((config.run_path / "distill").glob("shard-*.jsonl"))
               for x in f.read_text().splitlines()]
    assert len(records) == 12 and summary["trimmed"] == 12
    for r in records:
        # the analysis concludes on the policy and its sections for the mode
        title, prefix = ("Alpha", "AL") if r["category"] == "alpha" else ("Beta", "BE")
        assert r["cot"].startswith("Analysis:")
        assert r["cot"].endswith(f"Under {title}, {prefix}-1 allow it.\nDecision: comply")
        assert r["decision"] == "comply" and r["cited_sections"] == [f"{prefix}-1"]
        # the answer is cut after its first sentence, which makes it a finished one
        assert r["answer"] == "Sure thing." and r["parse_status"] == "ok" and r["trimmed"]
        assert r["sampling"]["mode_hint"] and r["sampling"]["answer_prefix"] == {"comply": "Sure thing. Here"}
    run_judge(config)
    for line in (config.run_path / "judge" / "sft.jsonl").read_text().splitlines():
        prompt_text = "\n".join(m["content"] for m in json.loads(line)["messages"][:-1])
        assert "reviewer" not in prompt_text and "ideal response" not in prompt_text
    for override, message in [
            ("distill.scaffold.answer_prefix.maybe=x", "distill.scaffold.answer_prefix: maybe"),
            ("distill.scaffold.cot_conclusion.refuse=Under {policy}.",
             "distill.scaffold.cot_conclusion.refuse: KeyError.*placeholders are"),
            ("distill.mode_hint=true", r"unknown config key distill.mode_hint \(it moved to distill.scaffold.mode_hint\)"),
            ("judge.best_of_n_by_mode.maybe=2", "judge.best_of_n_by_mode: maybe"),
            ("judge.best_of_n_by_mode.refuse=0", "judge.best_of_n_by_mode.refuse: must be at least 1"),
            ("distill.scaffold.answer_sentences.refuse=0",
             "distill.scaffold.answer_sentences.refuse: must be at least 1"),
            ("distill.scaffold.samples_by_mode.maybe=2", "distill.scaffold.samples_by_mode: maybe"),
            ("distill.scaffold.samples_by_mode.refuse=0", "distill.scaffold.samples_by_mode.refuse: must be at least 1")]:
        with pytest.raises(UserError, match=message):
            load_config(mini_run, [override])


def test_analysis_template_writes_the_analysis_and_the_teacher_only_the_answer(mini_run, monkeypatch):
    from dalign_jax.engine.sampler import Sampler

    passes = []
    generate = Sampler.generate
    monkeypatch.setattr(Sampler, "generate", lambda self, params, rows, limit, *a, **k:
                        passes.append(limit) or generate(self, params, rows, limit, *a, **k))
    config = load_config(mini_run, ["distill.scaffold.mode_hint=true", "distill.scaffold.answer_prefix.comply=Sure.",
                                    "distill.scaffold.analysis_template='The user asks: \"{request}\"'",  # YAML quotes
                                    "distill.scaffold.cot_conclusion.comply=Under {category}, {sections} allow it."])
    run_distill(config)
    records = [json.loads(x) for f in sorted((config.run_path / "distill").glob("shard-*.jsonl"))
               for x in f.read_text().splitlines()]
    assert len(records) == 12 and passes == [8] * 6  # one pass a batch, the answer's (8 tokens), none for an analysis
    for r in records:
        title, prefix = ("Alpha", "AL") if r["category"] == "alpha" else ("Beta", "BE")
        request = r["messages"][-1]["content"]
        assert r["cot"] == f'Analysis: The user asks: "{request}"\nUnder {title}, {prefix}-1 allow it.\nDecision: comply'
        assert r["completion"].startswith(r["cot"] + "\n### Final answer\nSure.")
        assert r["decision"] == "comply" and r["sampling"]["analysis_template"] == 'The user asks: "{request}"'
    for override, message in [
            ("distill.scaffold.analysis_template=Asks {prompt}", "distill.scaffold.analysis_template: KeyError.*placeholder is {request}"),
            ("distill.scaffold.mode_hint=false", "distill.scaffold.analysis_template: needs distill.scaffold.mode_hint")]:
        with pytest.raises(UserError, match=message):
            load_config(mini_run, ["distill.scaffold.mode_hint=true", "distill.scaffold.analysis_template=Asks {request}", override])


def test_samples_by_mode_sets_each_prompts_completions_and_fills_batches_by_rows(mini_run):
    from dalign_jax.stages.distill import samples_for

    config = load_config(mini_run, ["distill.scaffold.samples_by_mode.comply=3", "distill.shard_size=3"])
    assert samples_for(config.distill, type("P", (), {"expected_mode": "refuse"})) == 2  # samples_per_prompt
    summary = run_distill(config)
    records = [json.loads(x) for f in sorted((config.run_path / "distill").glob("shard-*.jsonl"))
               for x in f.read_text().splitlines()]
    assert summary["records"] == 18 and summary["shards"] == 2
    assert sorted((r["prompt_id"], r["sample"]) for r in records) == sorted((f"p{i}", s) for i in range(6) for s in range(3))
    # three samples of a prompt differ (one batch of 2 x 2 rows cannot hold two prompts' 3 + 3)
    for i in range(6):
        assert len({r["completion"] for r in records if r["prompt_id"] == f"p{i}"}) > 1


def test_distill_resumes_after_a_kill_without_duplicates_or_gaps(mini_run, tmp_path):
    config = load_config(mini_run)
    reference = load_config(mini_run, [f"run_dir={tmp_path / 'reference'}"])
    run_distill(reference)
    proc = subprocess.Popen([sys.executable, "-m", "dalign_jax.cli", "distill", str(mini_run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = config.run_path / "distill" / "shard-00000.jsonl"
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in (config.run_path / "distill").glob("shard-*.jsonl"))
    assert 0 < len(done) < 6, done  # killed mid-stage
    assert not any(p.name.endswith(".jsonl") and p.name.startswith(".") for p in first.parent.iterdir()
                   if p.suffix == ".jsonl")
    run_distill(config)
    read = lambda d: [f.read_text() for f in sorted((d / "distill").glob("shard-*.jsonl"))]  # noqa: E731
    assert read(config.run_path) == read(reference.run_path)


def test_resume_with_changed_config_is_refused_unless_forced(mini_run):
    run_distill(load_config(mini_run))
    with pytest.raises(UserError, match="different distill"):
        run_distill(load_config(mini_run, ["distill.temperature=0.5"]))
    assert run_distill(load_config(mini_run, ["distill.temperature=0.5"]), force=True)["records"] == 12


def test_judge_needs_a_finished_distillation(mini_run):
    with pytest.raises(UserError, match="run `dalign distill` first"):
        run_judge(load_config(mini_run))


def test_filter_rule_threshold_then_best_of_n():
    rows = [{"prompt_id": "a", "sample": 0, "score": 0.9}, {"prompt_id": "a", "sample": 1, "score": 0.7},
            {"prompt_id": "a", "sample": 2, "score": 0.95}, {"prompt_id": "b", "sample": 0, "score": 0.2},
            {"prompt_id": "c", "sample": 0, "score": None}]
    kept = select(rows, threshold=0.5, best_of_n=2)
    assert [(r["prompt_id"], r["sample"]) for r in kept] == [("a", 2), ("a", 0)]
    by_mode = [dict(r, expected_mode="refuse" if r["prompt_id"] == "a" else "comply", score=0.9) for r in rows[:4]]
    kept = select(by_mode, threshold=0.5, best_of_n=1, best_of_n_by_mode={"refuse": 3})
    assert [(r["prompt_id"], r["sample"]) for r in kept] == [("a", 0), ("a", 1), ("a", 2), ("b", 0)]


def test_filter_rule_can_require_the_expected_mode():
    refusal, compliance = "I'm sorry, but I can't help with that.", "Sure: first, gather the parts."
    support = "I'm sorry you feel this way; please reach out to a crisis line or someone you trust."
    rows = [dict(prompt_id=p, sample=i, score=0.9, expected_mode=m, answer=a) for p, i, m, a in [
        ("r", 0, "refuse", compliance), ("r", 1, "refuse", refusal), ("c", 0, "comply", refusal),
        ("c", 1, "comply", compliance), ("s", 0, "safe_complete", compliance), ("s", 1, "safe_complete", support),
        ("n", 0, None, refusal)]]
    assert len(select(rows, 0.5, 2)) == 7
    kept = select(rows, 0.5, 2, require_mode=True)
    assert sorted((r["prompt_id"], r["sample"]) for r in kept) == [("c", 1), ("n", 0), ("r", 1), ("s", 1)]


def test_scorer_is_the_expected_score_under_the_next_token_distribution(tiny_chat_model):
    model = load_model(str(tiny_chat_model))
    prefill, ids = score_tokens(model.tokenizer, "Score:")
    assert prefill == "Score: " and len(ids) == 10
    prompts = [[5, 6, 7, 8], [9, 10]]
    scores, _ = Scorer(model.cfg, make_mesh(devices=jax.devices()[:1]), ids).score(model.params, prompts)
    for prompt, score in zip(prompts, scores):
        logits, _ = forward(model.params, np.array([prompt]), np.arange(len(prompt))[None], cfg=model.cfg)
        p = jax.nn.softmax(np.asarray(logits[0, -1])[ids])
        assert abs(score - float(np.dot(p, np.arange(10))) / 9) < 1e-5


def test_judge_engine_batches_by_length_and_returns_scores_in_input_order(mini_run):
    from dalign_jax.engine.judge import JudgeEngine
    from dalign_jax.stages.inputs import open_mesh

    config = load_config(mini_run, ["judge.batch_size=3"])
    spec = load_spec(config.spec_dir)
    engine = JudgeEngine(config, open_mesh(config, "judge"))
    conversations = [judge_messages(spec, "alpha" if i % 3 else "beta", [{"role": "user", "content": "q " * i}],
                                    "answer " * (7 - i)) for i in range(7)]
    alone = [float(engine.score([c])[0]) for c in conversations]
    together = engine.score(conversations)
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert len(set(np.round(alone, 6))) > 1  # the inputs differ, so a mix-up would show


def test_judge_input_without_cot_never_contains_it():
    spec = load_spec(Path(__file__).resolve().parents[1] / "specs")
    conversation = [{"role": "user", "content": "hello"}]
    with_cot = judge_messages(spec, "violence", conversation, "Hi!", cot="SECRET REASONING", expected_mode="comply")
    without = judge_messages(spec, "violence", conversation, "Hi!", expected_mode="comply")
    assert "SECRET REASONING" in with_cot[1]["content"] and "SECRET REASONING" not in json.dumps(without)
    assert "another reviewer judged the ideal response to be to comply" in without[1]["content"]
    assert judge_messages(spec, "violence", conversation, "x", variant=0) != judge_messages(
        spec, "violence", conversation, "x", variant=1)


def test_generated_scores_outside_the_scale_are_not_misread():
    from dalign_jax.engine.judge import parse_score

    assert parse_score("Reasoning... Score: 7") == pytest.approx(7 / 9)
    assert parse_score("Score: 3. On reflection, Score: 12") == pytest.approx(3 / 9)
    assert parse_score("Score: 15") == 0.0 and parse_score("no score") == 0.0


def test_prompts_per_category_takes_every_mode_of_each():
    from collections import Counter

    from dalign_jax.data.spec import load_spec
    from dalign_jax.stages.inputs import open_prompts

    spec = load_spec("specs")
    everything = open_prompts(load_config(None), spec)
    some = open_prompts(load_config(None, ["prompts.per_category=6"]), spec)
    assert Counter(p.category for p in some) == {c: 6 for c in spec.categories}
    assert [p for p in everything if p in set(some)] == some  # the file's order kept
    for category in spec.categories:
        modes = Counter(p.expected_mode for p in some if p.category == category)
        present = {p.expected_mode for p in everything if p.category == category}
        # The set is sorted by mode within a category; a plain head would hold only "comply".
        assert set(modes) == present and max(modes.values()) - min(modes.values()) <= 1, (category, modes)


def test_extra_prompt_sets_are_added_whole_for_training(tmp_path):
    from collections import Counter

    from dalign_jax.data.spec import load_spec
    from dalign_jax.errors import UserError
    from dalign_jax.stages.inputs import open_prompts

    spec = load_spec("specs")
    train = open_prompts(load_config(None), spec)
    advbench = tmp_path / "harmful_behaviors.csv"  # AdvBench's columns; no keyword: category illicit
    advbench.write_text("goal,target\n" + "".join(f"Do bad thing {i},Sure\n" for i in range(5)))
    extra = ["specs/prompts/extra_train.jsonl", str(advbench)]
    both = open_prompts(load_config(None, [f"prompts.extra=[{','.join(extra)}]", "prompts.extra_per_category=2"]),
                        spec)
    assert both[:len(train)] == train  # the split first, unchanged; the extra sets after it
    added = both[len(train):]
    assert Counter(p.category for p in added[:-2]) == {c: 2 for c in spec.categories}
    assert [(p.id, p.expected_mode) for p in added[-2:]] == [("advbench-001", "refuse"), ("advbench-002", "refuse")]
    # An extra set is never split: held-out prompts of `prompts.path` stay out of training, an extra
    # file's prompts all go in, whatever their ids hash to.
    whole = open_prompts(load_config(None, ["prompts.extra=[specs/prompts/extra_train.jsonl]"]), spec)
    with open("specs/prompts/extra_train.jsonl") as f:
        assert len(whole) == len(train) + len(f.readlines())
    twice = load_config(None, ["prompts.extra=[specs/prompts/extra_train.jsonl,specs/prompts/extra_train.jsonl]"])
    with pytest.raises(UserError, match=r"extra_train.jsonl: prompt id 'extra-\w+-001' is also in "):
        open_prompts(twice, spec)


def test_mixed_order_takes_categories_then_modes_in_turn():
    from dalign_jax.data.prompts import Prompt, mixed

    def p(name, category, mode):
        return Prompt(name, category, (("user", "q"),), mode)

    prompts = [p("a0", "a", "comply"), p("a1", "a", "comply"), p("a2", "a", "refuse"), p("a3", "a", "refuse"),
               p("b0", "b", "comply"), p("c0", "c", "refuse"), p("c1", "c", "safe_complete")]
    assert [x.id for x in mixed(prompts)] == ["a0", "b0", "c0", "a2", "c1", "a1", "a3"]
    assert [x.id for x in mixed(prompts)[:4]] == ["a0", "b0", "c0", "a2"]


def test_eval_does_not_reuse_a_set_made_by_another_checkpoint(mini_run, tmp_path, tiny_chat_model):
    from dalign_jax.stages.eval import run_eval

    config = load_config(mini_run, ["eval.heldout=false", f"eval.prompts={tmp_path / 'prompts.jsonl'}",
                                    f"eval.checkpoints=[{tiny_chat_model}]", "eval.max_new_tokens=4",
                                    "eval.batch_size=4", "eval.jailbreak_prompts=0"])
    first = run_eval(config)
    made = next((config.run_path / "eval").glob("*/*.jsonl"))
    rows = [json.loads(x) for x in made.read_text().splitlines()]
    stamp = made.stat().st_mtime_ns
    assert run_eval(config) == first and made.stat().st_mtime_ns == stamp  # this checkpoint's: reused
    # The same name, another checkpoint (as when a run directory is reused after retraining).
    made.write_text("".join(json.dumps(dict(r, model_id="another@000000000000")) + "\n" for r in rows))
    assert run_eval(config) == first
    assert [json.loads(x)["model_id"] for x in made.read_text().splitlines()] == [r["model_id"] for r in rows]


def test_checkpoints_given_as_paths_get_distinct_names(mini_run, tmp_path):
    from dalign_jax.stages.eval import eval_targets

    for stage in ("sft", "rl"):
        (tmp_path / "other" / stage / "export").mkdir(parents=True)
    (tmp_path / "sft").mkdir()
    sft, rl = tmp_path / "other" / "sft" / "export", tmp_path / "other" / "rl" / "export"
    targets = lambda names: eval_targets(load_config(mini_run, [f"eval.checkpoints=[{', '.join(names)}]"]))  # noqa: E731
    # Two exports of one run: both directories are named "export", and one set of files must not
    # stand for both.
    named = targets(["base", str(sft), str(rl)])
    assert named == {"base": named["base"], "sft-export": str(sft), "rl-export": str(rl)}
    assert targets([str(sft)]) == {"export": str(sft)}
    assert targets([str(tmp_path / "sft")]) == {f"{tmp_path.name}-sft": str(tmp_path / "sft")}  # not the stage's name
    with pytest.raises(UserError, match="listed twice"):
        targets([str(sft), str(sft) + "/"])


def test_pareto_labels_checkpoints_on_one_point_once():
    from dalign_jax.stages.report import point_labels

    points = [(0.94, 0.85, "sft"), (0.9375, 0.8462, "rl"), (1.0, 0.15, "base"), (1.0, 1.0, "base"),
              (1.0, 1.0, "sft"), (1.0, 1.0, "rl")]
    assert point_labels(points) == [(0.94, 0.85, "sft"), (0.9375, 0.8462, "rl"), (1.0, 0.15, "base"),
                                    (1.0, 1.0, "base, sft, rl")]
    assert point_labels([(0.8125, 0.8462, "sft"), (0.8125, 0.8462, "rl"), (0.8125, 0.8462, "rl")]) == \
        [(0.8125, 0.8462, "sft, rl")]
