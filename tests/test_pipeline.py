"""`dalign run` end to end on the tiny model: every stage, the report, and an export transformers loads."""
import json
import os
import subprocess
import sys

import numpy as np

from dalign_jax.cli import main


def pipeline_overrides(tmp_path) -> list[str]:
    """Tiny sizes for every stage, an eval set with two allowed and two disallowed prompts, and an SFT
    fixture (the tiny random model's completions never parse, so the judge keeps none)."""
    prompts = tmp_path / "eval.jsonl"
    rows = [{"id": f"e{i}", "category": "alpha", "expected_mode": "refuse" if i % 2 else "comply",
             "messages": [{"role": "user", "content": f"eval question {i}"}]} for i in range(4)]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sft_data = tmp_path / "sft.jsonl"
    sft_data.write_text("".join(json.dumps({"id": f"s{i}", "messages": [
        {"role": "user", "content": f"question {i}"},
        {"role": "assistant", "content": f"Analysis: AL-1 applies.\n### Final answer\nAnswer {i}."}]}) + "\n"
        for i in range(8)))
    return ["mesh.devices=1", f"sft.data={sft_data}", "sft.steps=2", "sft.batch_size=2", "rl.steps=2",
            "rl.prompts_per_step=1", "rl.group_size=2", "rl.max_new_tokens=8", "eval.heldout=false",
            f"eval.prompts={prompts}", "eval.max_new_tokens=8", "eval.jailbreak_prompts=1", "eval.batch_size=8"]


def test_run_every_stage_then_report(mini_run, tmp_path, capsys):
    overrides = pipeline_overrides(tmp_path)
    assert main(["run", str(mini_run)] + overrides) == 0
    result = json.loads(capsys.readouterr().out)
    run = tmp_path / "run"
    assert set(result) == {"distill", "judge", "sft", "rl", "eval", "report", "export"}
    metrics = json.loads((run / "eval" / "metrics.json").read_text())["metrics"]
    assert set(metrics) == {"base", "sft", "rl"}
    for per_set in metrics.values():
        rule = per_set["eval"]["rule"]
        assert rule["not_unsafe"]["n"] == 2 and rule["not_overrefuse"]["n"] == 2
        assert rule["goodness_at_0.1"]["n"] == 1 and "judge" in per_set["eval"]
    responses = (run / "eval" / "rl" / "eval.jsonl").read_text().splitlines()
    assert len(responses) == 4 + 10  # four prompts, one disallowed prompt in ten jailbreak templates
    report = (run / "report.md").read_text()
    assert "not_unsafe" in report and "pareto.png" in report
    assert (run / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert "data:image/png;base64," in (run / "report.html").read_text()

    import torch
    import transformers

    exported = transformers.AutoModelForCausalLM.from_pretrained(result["export"])
    with torch.no_grad():
        logits = exported(torch.tensor([[1, 2, 3]])).logits
    assert np.isfinite(logits.numpy()).all()
    # A second run finds every stage complete and does no work.
    assert main(["run", str(mini_run)] + overrides) == 0


def test_run_trains_in_child_processes_that_reuse_freed_memory(mini_run, tmp_path, monkeypatch):
    """On Linux with glibc and XLA:CPU, `dalign run` runs sft and rl as `dalign sft` / `dalign rl`
    child processes (which re-execute under the heap-reuse tunables); a failing child is an error
    naming its stage, and the opt-out keeps them in the process."""
    import pytest

    from dalign_jax.config import load_config
    from dalign_jax.errors import UserError
    from dalign_jax.hostmem import heap_reuse_supported
    from dalign_jax.stages.pipeline import run_in_child_process, training_in_child_process

    if not heap_reuse_supported():
        pytest.skip("heap reuse is for Linux with glibc")
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("DALIGN_SYSTEM_MALLOC", raising=False)
    assert training_in_child_process()
    monkeypatch.setenv("DALIGN_SYSTEM_MALLOC", "1")
    assert not training_in_child_process()
    monkeypatch.delenv("DALIGN_SYSTEM_MALLOC")
    config = load_config(mini_run, pipeline_overrides(tmp_path) + [f"sft.data={tmp_path / 'missing.jsonl'}"])
    with pytest.raises(UserError, match=r"^sft: its process exited with status 2"):
        run_in_child_process("sft", config, force=False)
    assert not list(config.run_path.glob(".sft-config-*"))  # the resolved config it was given is gone


def test_run_every_stage_on_gemma2_whose_template_has_no_system_role(tiny_models, tmp_path, capsys):
    """Distill and judge put the spec in a system turn, which Gemma 2's template refuses; the run
    completes, and its export is a Gemma 2 directory that transformers loads and agrees with."""
    import shutil

    import transformers

    from conftest import NO_SYSTEM_TEMPLATE, add_byte_tokenizer, hf_logits, padded_batch, write_mini_run
    from dalign_jax.model.loader import load_model
    from dalign_jax.model.transformer import forward

    gemma = add_byte_tokenizer(shutil.copytree(tiny_models["gemma2"][0], tmp_path / "gemma"), NO_SYSTEM_TEMPLATE)
    assert main(["run", str(write_mini_run(tmp_path, gemma))] + pipeline_overrides(tmp_path)) == 0
    result = json.loads(capsys.readouterr().out)
    distilled = [line for f in sorted((tmp_path / "run" / "distill").glob("shard-*.jsonl"))
                 for line in f.read_text().splitlines()]
    assert len(distilled) == 6 * 2  # every prompt, k = 2, though the spec had no system turn to go in
    exported = transformers.AutoModelForCausalLM.from_pretrained(result["export"]).eval()
    assert type(exported).__name__ == "Gemma2ForCausalLM"
    ours = load_model(result["export"])
    tokens, mask, positions = padded_batch(ours.cfg.vocab_size, [9, 4], seed=2)
    logits, _ = forward(ours.params, tokens, positions, cfg=ours.cfg)
    real = mask.astype(bool)
    assert np.abs(np.asarray(logits)[real] - hf_logits(exported, tokens, mask)[real]).max() <= 1e-4


def test_run_needs_no_pytorch(mini_run, tmp_path):
    """The whole pipeline with torch made unimportable (`sys.modules["torch"] = None`)."""
    script = ("import sys; sys.modules['torch'] = None\n"
              "from dalign_jax.cli import main\n"
              "rc = main(sys.argv[1:]); assert 'torch' not in [m for m, v in sys.modules.items() if v]; sys.exit(rc)")
    # DALIGN_SYSTEM_MALLOC keeps sft and rl in this process too, where torch is made unimportable.
    result = subprocess.run([sys.executable, "-c", script, "run", str(mini_run)] + pipeline_overrides(tmp_path),
                            capture_output=True, text=True, timeout=900,
                            env={**os.environ, "DALIGN_SYSTEM_MALLOC": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "report.html").is_file()
