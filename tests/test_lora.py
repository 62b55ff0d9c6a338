"""LoRA: adapters start at the base model, only they are trained and checkpointed, the merged export
loads in transformers with our logits, and RL with adapters keeps its reference frozen."""
import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import hf_logits, padded_batch
from dalign_jax.config import Train, load_config
from dalign_jax.errors import UserError
from dalign_jax.model.loader import load_model
from dalign_jax.model.transformer import forward
from dalign_jax.parallel.mesh import make_mesh
from dalign_jax.stages.rl import run_rl
from dalign_jax.stages.sft import run_sft
from dalign_jax.train.lora import LoraConfig, count, init_adapters, merge
from test_sft import sft_config, sft_data  # noqa: F401  (sft_data is a fixture)

LORA = dict(lora_rank=4, lora_alpha=8.0)


def test_adapters_start_at_the_base_and_count(tiny_chat_model):
    model = load_model(str(tiny_chat_model))
    lora = LoraConfig.from_train(Train(**LORA))
    adapters = init_adapters(model.params, lora, jax.random.key(0))
    cfg = model.cfg
    d, f, qd, kvd = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    # rank * (in + out) per adapted matrix: wq, wk, wv, wo, w_gate, w_up, w_down
    per_layer = 4 * ((d + qd) + 2 * (d + kvd) + (qd + d) + 3 * (d + f))
    assert count(adapters) == cfg.num_layers * per_layer
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(merge(model.params, adapters, lora))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(UserError, match="config key rl.train.lora_targets: w_nope"):
        load_config(None, ["rl.train.lora_rank=4", "rl.train.lora_targets=[wq, w_nope]"])
    assert LoraConfig.from_train(Train()) is None


def test_lora_sft_trains_adapters_only_and_exports_merged(tmp_path, tiny_chat_model, sft_data, capsys):
    import transformers

    config = load_config(sft_config(tmp_path, tiny_chat_model, sft_data, steps=6,
                                    train=dict(LORA, learning_rate=1e-2, save_every=3)))
    summary = run_sft(config)
    base = load_model(str(tiny_chat_model))
    adapters_size = summary["trainable_params"]
    assert 0 < adapters_size < count(base.params) / 5
    assert f"trainable parameters: {adapters_size:,} of {count(base.params):,}" in capsys.readouterr().err
    assert summary["final_eval_loss"] < summary["initial_eval_loss"]

    # The checkpoint holds the adapters and their optimiser moments, not the base weights.
    step_dir = config.run_path / "sft" / "checkpoints" / "6" / "state"
    saved = ocp.StandardCheckpointer().metadata(step_dir)
    saved = getattr(saved, "item_metadata", saved)
    leaves = jax.tree.leaves(saved, is_leaf=lambda x: hasattr(x, "shape"))
    saved_size = sum(int(np.prod(x.shape)) for x in leaves)
    assert 3 * adapters_size <= saved_size < 3 * adapters_size + 100  # adapters, Adam's two moments, counters
    assert not any(tuple(x.shape) == (base.cfg.vocab_size, base.cfg.hidden_size) for x in leaves)

    # The export is the merged model: transformers loads it and agrees with our forward pass on it.
    export = config.run_path / "sft" / "export"
    trained = load_model(str(export))
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(base.params), jax.tree.leaves(trained.params))]
    assert any(changed) and not all(changed)  # projections moved; norms and embeddings did not
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(str(export)).eval()
    tokens, mask, positions = padded_batch(base.cfg.vocab_size, [9, 4], seed=2)
    ours, _ = forward(trained.params, tokens, positions, cfg=trained.cfg)
    real = mask.astype(bool)
    assert np.abs(np.asarray(ours)[real] - hf_logits(torch_model, tokens, mask)[real]).max() <= 1e-4


def test_lora_rl_keeps_the_reference_and_resumes(mini_run):
    overrides = ["rl.steps=2", "rl.prompts_per_step=2", "rl.group_size=2", "rl.max_new_tokens=6",
                 "rl.train.save_every=1", "rl.train.lora_rank=2", "rl.train.learning_rate=1e-2", "mesh.devices=1"]
    config = load_config(mini_run, overrides)
    summary = run_rl(config)
    rows = [json.loads(x) for x in (config.run_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-7)  # adapters start at the reference exactly
    assert all(r["logprob_gap"] < 1e-4 for r in rows)
    assert summary["complete"] and (config.run_path / "rl" / "export" / "config.json").is_file()
    assert run_rl(config) == summary


def test_lora_step_is_sharded_like_one_device(tiny_chat_model):
    from dalign_jax.train.lora import Trainable
    from dalign_jax.train.optim import learning_rate_schedule, make_optimizer
    from dalign_jax.train.step import compile_train_step, device_batch, init_state, sft_loss
    from test_sft import _batch, conversations

    model = load_model(str(tiny_chat_model))
    local = _batch(model.tokenizer, conversations(8))
    train = Train(**LORA, learning_rate=1e-2, warmup_steps=0)
    results = []
    for mesh in (make_mesh(1, 1, 1, devices=jax.devices()[:1]), make_mesh(2, 2, 2)):
        trainable = Trainable(model.params, LoraConfig.from_train(train), mesh, 0)
        optimizer = make_optimizer(train, 2)
        state, sharding = init_state(trainable.take_initial(), optimizer, mesh)
        step = compile_train_step(lambda p, b: sft_loss(p, b, cfg=model.cfg), optimizer,
                                  learning_rate_schedule(train, 2), sharding, mesh, trainable)
        for _ in range(2):
            state, metrics = step(state, device_batch(local, mesh, 1))
        results.append((float(metrics["loss"]), jax.device_get(state.params)))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
        np.testing.assert_allclose(a, b, atol=5e-6)

