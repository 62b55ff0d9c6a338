"""The command line as a person uses it."""
import json
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest

from conftest import needs_default_model
from dalign_jax.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "dalign_jax.cli", *args], capture_output=True, text=True,
                          timeout=600)


@needs_default_model
@pytest.mark.slow
def test_generate_answers_paris():
    result = run_cli("generate", "--model", "smollm2-135m", "--prompt", "What is the capital of France?",
                     "--max-new-tokens", "32")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


@needs_default_model
@pytest.mark.slow
def test_export_of_default_model_loads_in_transformers_with_tokenizer(tmp_path):
    import torch
    import transformers

    from conftest import hf_logits, padded_batch
    from dalign_jax.model.loader import load_model

    assert main(["export", "--model", "smollm2-135m", "--out", str(tmp_path / "hf")]) == 0
    model, info = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), output_loading_info=True,
                                                                    dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    ours = load_model("smollm2-135m")
    messages = [{"role": "user", "content": "Name a colour 123."}]
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
        ours.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert tokenizer.encode("Hello world 42") == ours.tokenizer.encode("Hello world 42")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text())["eos_token_id"] == 2

    from dalign_jax.model.transformer import forward
    tokens, mask, positions = padded_batch(49152, [8, 5], seed=5)
    ref = hf_logits(model.eval(), tokens, mask)
    again = load_model(str(tmp_path / "hf"))
    logits, _ = forward(again.params, tokens, positions, cfg=again.cfg)
    # float32 sums over 576-wide rows: the real model gets the 1e-3 bound the tiny models beat by far
    assert np.abs(np.asarray(logits)[mask.astype(bool)] - ref[mask.astype(bool)]).max() <= 1e-3


def test_generate_from_prompts_file_on_tiny_model(tiny_chat_model, tmp_path, capsys):
    directory = tiny_chat_model
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hello"}\n\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    assert main(["generate", "--model", str(directory), "--prompts-file", str(prompts), "--max-new-tokens", "5",
                 "--jsonl", "--mesh", "2,2,2"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [line["messages"][-1]["content"] for line in lines] == ["hello", "hi"]


@pytest.mark.parametrize("args, message", [
    (["generate", "--model", "/no/such/model", "--prompt", "x"], "no such file or directory"),
    (["generate", "--model", "smollm2-135m"], "exactly one of --prompt or --prompts-file"),
    (["generate", "--prompts-file", "/no/such.jsonl"], "prompts file does not exist"),
    (["generate", "--prompt", "x", "--mesh", "3,1,1"], "devices"),
    (["generate", "--prompt", "x", "--mesh", "a,b"], "three integers"),
])
def test_bad_arguments_give_a_clear_error_and_nonzero_exit(args, message, capsys):
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_bad_prompts_file_line_is_named(tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ok"}\n{"prompt": \n')
    assert main(["generate", "--prompts-file", str(path)]) == 2
    assert f"{path}:2: invalid JSON" in capsys.readouterr().err


def test_unsupported_architecture_and_pickle_checkpoints_are_refused(tmp_path, capsys):
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    assert main(["export", "--model", str(gpt2), "--out", str(tmp_path / "o")]) == 2
    assert "GPT2LMHeadModel" in capsys.readouterr().err and not (tmp_path / "o").exists()

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    assert main(["export", "--model", str(pickled), "--out", str(tmp_path / "o")]) == 2
    assert "pickle" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_generate_and_export_run_without_pytorch(tiny_chat_model, tmp_path):
    # `sys.modules["torch"] = None` makes torch look uninstalled to transformers and to imports alike.
    script = ("import sys; sys.modules['torch'] = None\n"
              "from dalign_jax.cli import main\n"
              "rc = main(sys.argv[1:]); assert 'torch' not in [m for m, v in sys.modules.items() if v]; sys.exit(rc)")
    for args in (["generate", "--model", str(tiny_chat_model), "--prompt", "hi", "--max-new-tokens", "4"],
                 ["export", "--model", str(tiny_chat_model), "--out", str(tmp_path / "export")]):
        result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr
    assert (tmp_path / "export" / "model.safetensors").is_file()


@pytest.mark.parametrize("path", sorted(Path(__file__).parent.parent.glob("configs/*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path, tmp_path, capsys):
    from dalign_jax.config import load_config

    config = load_config(path)
    assert config.run_dir.startswith("runs/")
    # `dalign config` prints every key; what it prints reads back as the same configuration.
    assert main(["config", str(path), "rl.train.learning_rate=3e-5"]) == 0
    printed = tmp_path / "resolved.yaml"
    printed.write_text(capsys.readouterr().out)
    resolved = load_config(printed)
    assert resolved == load_config(path, ["rl.train.learning_rate=3e-5"])
    assert resolved.rl.train.learning_rate == 3e-5 and "warmup_steps: " in printed.read_text()


def test_generation_config_names_stop_tokens_and_survives_export(tiny_chat_model, tmp_path):
    """End-of-turn tokens that only generation_config.json names (Gemma's, Llama 3's) stop sampling,
    and an export keeps that file as it was; a broken one is an error naming it."""
    import transformers

    from dalign_jax.engine.chat import stop_token_ids
    from dalign_jax.errors import UserError
    from dalign_jax.model.loader import load_model

    transformers.GenerationConfig(eos_token_id=[251, 7], do_sample=True, temperature=0.6).save_pretrained(
        str(tiny_chat_model))
    assert 7 in stop_token_ids(load_model(str(tiny_chat_model)))
    assert main(["export", "--model", str(tiny_chat_model), "--out", str(tmp_path / "hf")]) == 0
    written = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert written["eos_token_id"] == [251, 7] and written["temperature"] == 0.6
    (tiny_chat_model / "generation_config.json").write_text("{not json")
    with pytest.raises(UserError, match="generation_config.json"):
        load_model(str(tiny_chat_model))


@pytest.mark.parametrize("key, value", [("rl.train.log_every", 5), ("rl.train.peak_flops", 1e12)])
def test_train_keys_rl_ignores_are_refused(key, value):
    from dalign_jax.config import load_config
    from dalign_jax.errors import UserError

    with pytest.raises(UserError, match=f"config key {key}: RL does not use it"):
        load_config(None, [f"{key}={value}"])
    load_config(None, [f"sft.train.{key.split('.')[-1]}={value}"])  # SFT acts on it
