"""Fused attention (`jax.nn.dot_product_attention`) gives the results of ours: the same masks (padding,
causality, sliding window), the same cache and shared-prefix semantics, the same gradients."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FAMILIES, hf_logits, padded_batch
from dalign_jax.engine.sampler import GREEDY, Sampler
from dalign_jax.engine.scorer import Scorer
from dalign_jax.model.loader import load_model
from dalign_jax.model.transformer import forward
from dalign_jax.parallel.mesh import make_mesh
from dalign_jax.model.transformer import token_logprobs

PREFIX = list(np.random.default_rng(0).integers(1, 250, 40))
SUFFIXES = [[7, 8, 9], [100, 3, 3, 3, 3, 3, 5], [42], [17, 2]]


def both(family, tiny_models):
    model = load_model(str(tiny_models[family][0]))
    return model, load_model(str(tiny_models[family][0]), attention="fused")


def logits(model, tokens, positions, dtype=jnp.float32):
    params = jax.tree.map(lambda p: p.astype(dtype), model.params)
    out, _ = jax.jit(forward, static_argnames=("cfg", "dtype"))(params, tokens, positions, cfg=model.cfg, dtype=dtype)
    return np.asarray(out)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fused_forward_matches_ours_and_transformers(tiny_models, family):
    ours, fused = both(family, tiny_models)
    assert fused.cfg == dataclasses.replace(ours.cfg, attention="fused")
    tokens, mask, positions = padded_batch(ours.cfg.vocab_size, [11, 7, 3, 11], seed=1)
    real = mask.astype(bool)
    a, b = logits(ours, tokens, positions), logits(fused, tokens, positions)
    assert np.abs(a[real] - b[real]).max() <= 1e-5
    assert np.abs(b[real] - hf_logits(tiny_models[family][1], tokens, mask)[real]).max() <= 1e-4


def test_fused_bfloat16_stays_close_to_float32(tiny_models):
    ours, fused = both("llama2", tiny_models)
    tokens, mask, positions = padded_batch(ours.cfg.vocab_size, [9, 4], seed=2)
    real = mask.astype(bool)
    a = logits(ours, tokens, positions)
    b = logits(fused, tokens, positions, jnp.bfloat16)
    assert np.abs(a[real] - b[real]).max() <= 0.05 * np.abs(a[real]).max()


@pytest.mark.parametrize("family", ["llama2", "mistral"])  # mistral: the window crosses the shared prefix
def test_fused_sampler_and_scorer_with_cache_and_shared_prefix(tiny_models, family):
    ours, fused = both(family, tiny_models)
    mesh = make_mesh(devices=jax.devices()[:1])
    prompts = [PREFIX + s for s in SUFFIXES]
    runs = [Sampler(m.cfg, mesh, prefix_min_tokens=16).generate(m.params, prompts, 12, jax.random.key(3), GREEDY)
            for m in (ours, fused)]
    assert [t.tolist() for t in runs[0].tokens] == [t.tolist() for t in runs[1].tokens]
    for a, b in zip(runs[0].logprobs, runs[1].logprobs):
        np.testing.assert_allclose(a, b, atol=1e-4)
    ids = list(range(10, 20))
    scores = [Scorer(m.cfg, mesh, ids, prefix_min_tokens=16).score(m.params, prompts)[0] for m in (ours, fused)]
    np.testing.assert_allclose(scores[0], scores[1], atol=1e-5)


def test_fused_gradients_match_ours(tiny_models):
    ours, fused = both("llama2", tiny_models)
    tokens, mask, positions = padded_batch(ours.cfg.vocab_size, [12, 5, 9], seed=3, left=False)

    def grads(model):
        real = positions[:, 1:] >= 0
        loss = lambda p: (token_logprobs(p, tokens, positions, cfg=model.cfg) * real).sum()  # noqa: E731
        return jax.grad(loss)(model.params)

    for a, b in zip(jax.tree.leaves(grads(ours)), jax.tree.leaves(grads(fused))):
        np.testing.assert_allclose(a, b, atol=1e-5 * max(1.0, float(np.abs(a).max())))
