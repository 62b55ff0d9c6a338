"""Shared-prefix caching gives the results of plain prefill, for the sampler and the judge scorer."""
import jax
import numpy as np
import pytest

from dalign_jax.engine.sampler import GREEDY, Sampler, SamplingParams, shared_prefix_length
from dalign_jax.engine.scorer import Scorer
from dalign_jax.model.loader import load_model
from dalign_jax.parallel.mesh import make_mesh

PREFIX = list(np.random.default_rng(0).integers(1, 250, 40))
SUFFIXES = [[7, 8, 9], [100, 3, 3, 3, 3, 3, 5], [42], [17, 2]]


@pytest.fixture(scope="module", params=["llama2", "mistral"])  # mistral: the sliding window crosses the prefix
def model(request, tiny_models):
    return load_model(str(tiny_models[request.param][0]))


def test_shared_prefix_length():
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert shared_prefix_length([[1, 2], [1, 2]]) == 1  # every prompt keeps a token of its own
    assert shared_prefix_length([[3], [1, 2]]) == 0


@pytest.mark.parametrize("sampling", [GREEDY, SamplingParams(temperature=1.0)], ids=["greedy", "sampled"])
def test_sampler_with_shared_prefix_matches_plain(model, sampling):
    mesh = make_mesh(devices=jax.devices()[:1])
    prompts = [PREFIX + s for s in SUFFIXES]
    plain = Sampler(model.cfg, mesh, prefix_min_tokens=0).generate(model.params, prompts, 12, jax.random.key(3), sampling)
    shared_sampler = Sampler(model.cfg, mesh, prefix_min_tokens=16)
    shared = shared_sampler.generate(model.params, prompts, 12, jax.random.key(3), sampling)
    shared_sampler.generate(model.params, prompts[:2], 12, jax.random.key(3), sampling)
    assert shared_sampler.prefixes.misses == 1 and shared_sampler.prefixes.hits == 1
    assert [t.tolist() for t in shared.tokens] == [t.tolist() for t in plain.tokens]
    for a, b in zip(shared.logprobs, plain.logprobs):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_scorer_with_shared_prefix_matches_plain(model):
    mesh = make_mesh(devices=jax.devices()[:1])
    prompts = [PREFIX + s for s in SUFFIXES]
    ids = list(range(10, 20))
    plain, plain_mass = Scorer(model.cfg, mesh, ids, prefix_min_tokens=0).score(model.params, prompts)
    shared, shared_mass = Scorer(model.cfg, mesh, ids, prefix_min_tokens=16).score(model.params, prompts)
    np.testing.assert_allclose(shared, plain, atol=1e-5)
    np.testing.assert_allclose(shared_mass, plain_mass, atol=1e-6)
    assert ((plain >= 0) & (plain <= 1)).all() and len(set(np.round(plain, 6))) > 1
