"""Sharded results equal unsharded ones on an 8-device CPU mesh."""
import jax
import numpy as np
import pytest

from conftest import padded_batch
from dalign_jax.engine.sampler import GREEDY, Sampler
from dalign_jax.errors import UserError
from dalign_jax.model.loader import load_model
from dalign_jax.model.transformer import forward
from dalign_jax.parallel.mesh import batch_sharding, make_mesh, param_shardings, shard_params

LAYOUTS = [(8, 1, 1), (2, 2, 2), (1, 2, 4), (1, 8, 1), (1, 1, 8)]


def test_eight_cpu_devices_are_present():
    assert len(jax.devices()) == 8


@pytest.fixture(scope="module")
def model(tiny_models):
    return load_model(str(tiny_models["qwen2"][0]))  # biases and tied embeddings: every rule is used


def sharded_logits(model, mesh, tokens, positions):
    params = shard_params(model.params, mesh)
    fn = jax.jit(lambda p, t, q: forward(p, t, q, cfg=model.cfg)[0],
                 in_shardings=(param_shardings(params, mesh), batch_sharding(mesh, 2), batch_sharding(mesh, 2)))
    return np.asarray(fn(params, tokens, positions))


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda s: "x".join(map(str, s)))
def test_sharded_logits_and_greedy_tokens_match_one_device(model, layout):
    tokens, mask, positions = padded_batch(model.cfg.vocab_size, [12, 5, 9, 3, 12, 7, 1, 10], seed=4)
    one = make_mesh(devices=jax.devices()[:1])
    mesh = make_mesh(*layout)
    params = shard_params(model.params, mesh)
    if layout[2] > 1:  # the tensor axis really splits the weights
        assert params["layers"][0]["wq"].sharding.spec[1] == "tensor"
    real = mask.astype(bool)
    diff = np.abs(sharded_logits(model, mesh, tokens, positions) - sharded_logits(model, one, tokens, positions))
    assert diff[real].max() <= 1e-5

    prompts = [list(t[m]) for t, m in zip(tokens, real)]
    ref = Sampler(model.cfg, one).generate(model.params, prompts, 12, jax.random.key(0), GREEDY)
    out = Sampler(model.cfg, mesh).generate(params, prompts, 12, jax.random.key(0), GREEDY)
    assert [t.tolist() for t in out.tokens] == [t.tolist() for t in ref.tokens]


def test_gemma3_sharded_over_fsdp_and_tensor_matches_one_device(tiny_models):
    """Gemma's extra norms (post-block, q/k) and per-layer windows and RoPE under a 2x2x2 mesh."""
    gemma = load_model(str(tiny_models["gemma3"][0]))
    tokens, mask, positions = padded_batch(gemma.cfg.vocab_size, [12, 5, 9, 3, 12, 7, 1, 10], seed=4)
    real = mask.astype(bool)
    one, mesh = make_mesh(devices=jax.devices()[:1]), make_mesh(2, 2, 2)
    diff = np.abs(sharded_logits(gemma, mesh, tokens, positions) - sharded_logits(gemma, one, tokens, positions))
    assert diff[real].max() <= 1e-5


def test_mesh_that_does_not_fit_the_devices_is_an_error():
    with pytest.raises(UserError, match="8 devices"):
        make_mesh(3, 1, 1)
    with pytest.raises(UserError, match="at most one"):
        make_mesh(-1, -1, 1)
