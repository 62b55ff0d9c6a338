"""`models.scan_layers`: the layers stacked and run as one `lax.scan` give the unrolled numbers, in the
forward pass, gradients, sampling, LoRA, sharding, an SFT stage (checkpoints, resume, export)."""
import dataclasses
import json

import jax
import numpy as np
import pytest

from conftest import FAMILIES, padded_batch
from dalign_jax.config import load_config
from dalign_jax.engine.sampler import GREEDY, Sampler, SamplingParams
from dalign_jax.model.families import params_to_hf
from dalign_jax.model.hf_io import load_hf_dir
from dalign_jax.model.loader import load_model
from dalign_jax.model.transformer import KVCache, forward, init_params, stack_layers, unstack_layers
from dalign_jax.parallel.mesh import make_mesh, shard_params
from dalign_jax.stages.sft import run_sft
from dalign_jax.train.lora import LoraConfig, init_adapters, merge
from dalign_jax.train.step import sft_loss

PROMPTS = [[5, 17, 33, 2, 9, 100, 7], [44, 3], [250, 1, 1, 8, 64]]


def both(directory):
    """(unrolled, scanned) loads of one model."""
    return load_model(str(directory)), load_model(str(directory), scan_layers=True)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_scanned_forward_and_cached_decode_equal_unrolled(tiny_models, family):
    unrolled, scanned = both(tiny_models[family][0])
    assert scanned.cfg.scan_layers and isinstance(scanned.params["layers"], dict)
    tokens, _, positions = padded_batch(unrolled.cfg.vocab_size, [7, 4, 9])
    for model in (unrolled, scanned):
        logits, _ = forward(model.params, tokens, positions, cfg=model.cfg)
        cache = KVCache.empty(model.cfg, 3, 12)
        last, cache = forward(model.params, tokens, positions, cache, cfg=model.cfg, last_only=True, fresh_cache=True)
        step, _ = forward(model.params, np.array([[3], [4], [5]]), positions[:, -1:] + 1, cache, cfg=model.cfg)
        model.outputs = (logits, last, step)
    for a, b in zip(unrolled.outputs, scanned.outputs):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("family, remat", [(f, False) for f in FAMILIES] + [("llama3", True), ("gemma3", True)])
def test_scanned_gradients_equal_unrolled(tiny_models, family, remat):
    unrolled, scanned = both(tiny_models[family][0])
    tokens, mask, positions = padded_batch(unrolled.cfg.vocab_size, [9, 6, 9], left=False)
    batch = {"tokens": tokens, "positions": positions, "loss_mask": mask.astype(np.float32)}
    def mean_loss(params, cfg):  # per token, as the train step divides it
        total, weight, _ = sft_loss(params, batch, cfg=cfg, remat=remat)
        return total / weight

    grads = [jax.grad(mean_loss)(m.params, m.cfg) for m in (unrolled, scanned)]
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(unstack_layers(grads[1]))):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_scanned_sampling_equals_unrolled(tiny_models, family):
    """Greedy; and sampled with a seed, each prompt twice (the rows share a prefill)."""
    mesh = make_mesh(devices=jax.devices()[:1])
    outs = []
    for model in both(tiny_models[family][0]):
        sampler = Sampler(model.cfg, mesh)
        out = [sampler.generate(model.params, PROMPTS, 8, jax.random.key(0), GREEDY)]
        if family in ("smollm2", "gemma2"):  # one compilation more each: two families suffice
            out.append(sampler.generate(model.params, PROMPTS * 2, 8, jax.random.key(3), SamplingParams()))
        outs.append(out)
    for a, b in zip(*outs):
        assert [t.tolist() for t in a.tokens] == [t.tolist() for t in b.tokens]
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_scanned_params_export_as_unrolled(tiny_models, family):
    unrolled, scanned = both(tiny_models[family][0])
    exported = params_to_hf(scanned.params, scanned.cfg)
    reference = params_to_hf(unrolled.params, unrolled.cfg)
    assert exported.keys() == reference.keys()
    for name, value in reference.items():
        np.testing.assert_array_equal(exported[name], value)


def test_scanned_params_shard_and_run_as_unrolled(tiny_models):
    unrolled, scanned = both(tiny_models["qwen2"][0])
    sharded = shard_params(scanned.params, make_mesh(2, 2, 2))
    wq = sharded["layers"]["wq"]
    assert wq.shape[0] == scanned.cfg.num_layers and wq.sharding.spec[0] is None and wq.sharding.spec[2] == "tensor"
    tokens, _, positions = padded_batch(unrolled.cfg.vocab_size, [8, 5, 8, 3, 8, 8, 2, 6])
    fwd = jax.jit(forward, static_argnames="cfg")
    np.testing.assert_allclose(fwd(sharded, tokens, positions, cfg=scanned.cfg)[0],
                               fwd(unrolled.params, tokens, positions, cfg=unrolled.cfg)[0], atol=1e-5)


def test_scanned_lora_merges_as_unrolled(tiny_models):
    unrolled, scanned = both(tiny_models["llama2"][0])
    lora = LoraConfig(rank=4, alpha=8.0, targets=("wq", "w_down"))
    adapters = init_adapters(unrolled.params, lora, jax.random.key(1))
    adapters = jax.tree.map(lambda x: x + 0.01, adapters)  # b nonzero, so the merge changes the weights
    stacked = init_adapters(scanned.params, lora, jax.random.key(1))
    assert stacked["layers"]["wq"]["a"].shape == (2, 64, 4)
    stacked = jax.tree.map(lambda x: x + 0.01, stacked)
    for a, b in zip(jax.tree.leaves(merge(unrolled.params, adapters, lora)),
                    jax.tree.leaves(unstack_layers(merge(scanned.params, stacked, lora)))):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_stacked_random_init_and_mismatch_error(tiny_models):
    cfg = load_model(str(tiny_models["llama2"][0])).cfg
    scfg = dataclasses.replace(cfg, scan_layers=True)
    params = init_params(cfg, jax.random.key(0))
    for a, b in zip(jax.tree.leaves(stack_layers(params)), jax.tree.leaves(init_params(scfg, jax.random.key(0)))):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="scan_layers"):
        forward(params, np.zeros((1, 2), np.int32), np.zeros((1, 2), np.int32), cfg=scfg)


def test_scanned_sft_stage_checkpoints_resumes_and_exports_as_unrolled(tmp_path, tiny_chat_model):
    """Four steps with LoRA; the scanned run killed in effect after its checkpoint at step 2 (its later
    checkpoints removed) and resumed: its export equals the unrolled run's."""
    import shutil

    rows = [{"id": f"q{i}-0", "prompt_id": f"q{i}", "messages": [
        {"role": "user", "content": f"question {i}?"}, {"role": "assistant", "content": f"The answer is {i}."}]}
        for i in range(16)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def config(name, scan):
        path = tmp_path / f"{name}.yaml"
        path.write_text(json.dumps({
            "run_dir": str(tmp_path / name), "models": {"policy": str(tiny_chat_model), "scan_layers": scan},
            "sft": {"data": str(data), "batch_size": 8, "steps": 4, "max_seq_len": 64, "eval_every": 4,
                    "train": {"learning_rate": 3e-3, "warmup_steps": 0, "save_every": 2, "peak_flops": 1e11,
                              "lora_rank": 4}}}))
        return load_config(path)

    unrolled = config("unrolled", False)
    run_sft(unrolled)
    scanned = config("scanned", True)
    run_sft(scanned)
    checkpoints = scanned.run_path / "sft" / "checkpoints"
    shutil.rmtree(checkpoints / "4")
    shutil.rmtree(scanned.run_path / "sft" / "export")
    (scanned.run_path / "sft" / "summary.json").unlink(missing_ok=True)
    summary = run_sft(scanned)
    assert summary["complete"] and summary["steps"] == 4
    a, b = (load_hf_dir(c.run_path / "sft" / "export")[2] for c in (unrolled, scanned))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, atol=1e-5)
