"""`dalign plan`: every shipped config plans from config.json alone; exact parameter and optimiser
counts; remat and sharding shrink what they should; a config that cannot fit exits 2 naming its
stage and largest item; an SFT step's plan against XLA's buffer assignment."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from conftest import needs_default_model
from dalign_jax.config import Train, load_config
from dalign_jax.model.loader import DEFAULT_MODEL, read_model_config
from dalign_jax.model.transformer import init_params
from dalign_jax.plan import GIB, MeshShape, plan_config, training_items, weight_bytes

ROOT = Path(__file__).resolve().parents[1]

# The published config.json fields of the shipped configs' models (no weights needed to plan).
ARCHITECTURES = {
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False),
    "qwen2.5-14b": dict(model_type="qwen2", vocab_size=152064, hidden_size=5120, intermediate_size=13824,
                        num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8,
                        max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False),
    "gemma3-1b": dict(model_type="gemma3_text", vocab_size=262144, hidden_size=1152, intermediate_size=6912,
                      num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                      max_position_embeddings=32768, rms_norm_eps=1e-6, sliding_window=512,
                      query_pre_attn_scalar=256),
    "gemma2-9b": dict(model_type="gemma2", vocab_size=256000, hidden_size=3584, intermediate_size=14336,
                      num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                      max_position_embeddings=8192, rms_norm_eps=1e-6, sliding_window=4096,
                      query_pre_attn_scalar=256, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
}


def model_dir(tmp_path, name):
    directory = tmp_path / name
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text(json.dumps(ARCHITECTURES[name]))
    return str(directory)


def dalign(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    return subprocess.run([sys.executable, "-m", "dalign_jax.cli", *args], env=env, capture_output=True,
                          text=True, timeout=300)


SHIPPED = {"qwen2.5-7b-8gpu.yaml": ("qwen2.5-7b", "qwen2.5-14b", 8), "qwen2.5-7b-tpu-v5p.yaml":
           ("qwen2.5-7b", "qwen2.5-14b", 16), "gemma3-1b-1gpu.yaml": ("gemma3-1b", "gemma2-9b", 1)}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_accelerator_configs_plan_every_stage(tmp_path, name):
    policy, judge, devices = SHIPPED[name]
    config = load_config(ROOT / "configs" / name, [f"models.policy={model_dir(tmp_path, policy)}",
                                                  f"models.judge={model_dir(tmp_path, judge)}"])
    plans = {p.stage: p for p in plan_config(config, devices)}
    assert set(plans) == {"distill", "judge", "sft", "rl", "eval"}
    for plan in plans.values():
        assert plan.total > 0 and plan.flops > 0
        assert plan.total < 80 * GIB, (name, plan.stage, plan.items)  # each was written for 80 GiB devices


@needs_default_model
@pytest.mark.parametrize("name", ["quickstart.yaml", "smollm2-cpu.yaml", "served.yaml"])
def test_cpu_configs_plan_through_the_cli(name):
    proc = dalign("plan", str(ROOT / "configs" / name), "--peak-tflops", "1")
    assert proc.returncode == 0, proc.stderr
    for stage in ("sft", "rl", "eval"):
        assert f"\n{stage}: " in proc.stdout
    if name == "served.yaml":  # its teacher and judge are endpoints
        assert "distill: served at an endpoint" in proc.stdout


def test_parameters_gradients_and_moments_are_counted_exactly_and_sharded(tmp_path):
    cfg = read_model_config(model_dir(tmp_path, "qwen2.5-7b"))
    one, eight = MeshShape(1, 1, 1), MeshShape(1, 8, 1)
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    n = sum(x.size for x in jax.tree.leaves(params))
    assert weight_bytes(cfg, one) == 4 * n
    assert weight_bytes(cfg, eight) < 4 * n / 7.9  # norms replicated, everything else split 8 ways
    items = training_items(cfg, Train(), one, 4, 1024)
    assert items["gradients"] == 4 * n and items["optimiser state (Adam moments)"] == 8 * n
    lora = training_items(cfg, Train(lora_rank=8), one, 4, 1024)
    assert lora["gradients"] < 4 * n / 100 and "merged weights" in lora
    remat = training_items(cfg, Train(remat=True), one, 4, 1024)
    assert sum(remat.values()) < sum(items.values())
    zero1 = training_items(cfg, Train(), MeshShape(8, 1, 1), 32, 1024)
    assert zero1["optimiser state (Adam moments)"] < 8 * n / 7.9  # split over the data axis (ZeRO-1)


def test_a_config_that_cannot_fit_is_refused_naming_stage_and_item(tmp_path):
    model = model_dir(tmp_path, "qwen2.5-7b")
    config = tmp_path / "big.yaml"
    config.write_text(json.dumps({"run_dir": str(tmp_path / "run"), "models": {"policy": model, "judge": model},
                                  "sft": {"batch_size": 8, "max_seq_len": 4096}}))
    proc = dalign("plan", str(config), "mesh.fsdp=8", "mesh.data=1", "--devices", "8", "--device-memory-gib", "16",
                  "--peak-tflops", "989")
    assert proc.returncode == 2
    assert "dalign: error: plan: stage" in proc.stderr and "largest item" in proc.stderr, proc.stderr
    assert "DOES NOT FIT" in proc.stdout
    assert not (tmp_path / "run").exists()


@needs_default_model
def test_sft_plan_is_within_a_fifth_of_xla_buffer_assignment():
    """The default model's SFT step (no remat), compiled from shapes on one CPU device."""
    sys.path.insert(0, str(ROOT / "tools"))
    from bench_plan import measured_bytes

    cfg = read_model_config(DEFAULT_MODEL)
    planned = sum(training_items(cfg, Train(), MeshShape(1, 1, 1), 4, 512).values())
    measured = measured_bytes(cfg, Train(), 4, 512)
    assert 0.8 < planned / measured < 1.2, (planned / GIB, measured / GIB)


def test_a_stage_refuses_before_reading_weights_where_its_plan_cannot_fit(tmp_path, monkeypatch, tiny_chat_model):
    """As on an accelerator of 1 MiB: the SFT stage stops at its mesh, naming itself, with nothing written."""
    from dalign_jax import plan
    from dalign_jax.errors import UserError
    from dalign_jax.stages.sft import run_sft

    monkeypatch.setattr(plan, "stage_capacity", lambda: 1024.0 ** 2)
    monkeypatch.setattr("dalign_jax.model.loader.load_model", lambda *a, **k: pytest.fail("weights were read"))
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    config = tmp_path / "sft.yaml"
    config.write_text(json.dumps({"run_dir": str(tmp_path / "run"), "models": {"policy": str(tiny_chat_model)},
                                  "sft": {"data": str(data)}}))
    with pytest.raises(UserError, match="stage sft needs .* largest item"):
        run_sft(load_config(config))
    assert not [p for p in (tmp_path / "run").rglob("*") if p.is_file()]


def test_narrow_sampling_weights_add_their_copy_and_halve_the_bf16_cache(tmp_path):
    model = model_dir(tmp_path, "qwen2.5-7b")
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"run_dir": str(tmp_path / "run"), "models": {"policy": model, "judge": model}}))
    plain, narrow = ({p.stage: p.items for p in plan_config(load_config(config, [f"models.sample_dtype={d}"]), 1)}
                     for d in ("float32", "bfloat16"))
    assert "sampler's bfloat16 weights" in narrow["eval"] and "sampler's bfloat16 weights" not in plain["eval"]
    cache = next(k for k in plain["eval"] if k.startswith("KV cache"))
    assert narrow["eval"][cache] == plain["eval"][cache] / 2
