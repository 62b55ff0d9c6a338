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


# mistral: the sliding window crosses the prefix; gemma2: on one layer of two, with soft-capped scores
@pytest.fixture(scope="module", params=["llama2", "mistral", "gemma2"])
def family(request):
    return request.param


@pytest.fixture(scope="module")
def model(family, tiny_models):
    return load_model(str(tiny_models[family][0]))


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


@pytest.mark.parametrize("weights", ["bfloat16", "int8"])
def test_narrow_sampler_with_shared_prefix_decodes_as_without(model, weights):
    """Narrow sampling weights behind a shared prefix, in one batch and batched continuously: the
    greedy tokens of plain prefill with the same weights (a bf16 cache is read as it lies)."""
    mesh = make_mesh(devices=jax.devices()[:1])
    prompts = [PREFIX + s for s in SUFFIXES] * 2
    plain = Sampler(model.cfg, mesh, prefix_min_tokens=0, weights=weights).generate(
        model.params, prompts, 12, jax.random.key(3), GREEDY)
    shared_sampler = Sampler(model.cfg, mesh, prefix_min_tokens=16, weights=weights)
    for rows in (None, 2):
        shared = shared_sampler.generate(model.params, prompts, 12, jax.random.key(3), GREEDY, batch_rows=rows)
        same = np.mean([np.mean(a == b) for a, b in zip(shared.tokens, plain.tokens)])
        assert same >= 0.9, (rows, same)
    assert shared_sampler.prefixes.misses == 1


def test_scorer_with_shared_prefix_matches_plain(model):
    mesh = make_mesh(devices=jax.devices()[:1])
    prompts = [PREFIX + s for s in SUFFIXES]
    ids = list(range(10, 20))
    plain, plain_mass = Scorer(model.cfg, mesh, ids, prefix_min_tokens=0).score(model.params, prompts)
    shared, shared_mass = Scorer(model.cfg, mesh, ids, prefix_min_tokens=16).score(model.params, prompts)
    np.testing.assert_allclose(shared, plain, atol=1e-5)
    np.testing.assert_allclose(shared_mass, plain_mass, atol=1e-6)
    assert ((plain >= 0) & (plain <= 1)).all() and len(set(np.round(plain, 6))) > 1


# Large prefills attend one row of each batch shard at a time (transformer.ROW_TILE_ELEMENTS); tiny
# models never reach the size, so these tests lower the threshold to 0 to take that path.
def row_by_row(monkeypatch):
    from dalign_jax.model import transformer

    monkeypatch.setattr(transformer, "ROW_TILE_ELEMENTS", 0)


def test_row_by_row_prefill_matches_one_tile_and_transformers(model, family, tiny_models, monkeypatch):
    from conftest import hf_logits, padded_batch
    from dalign_jax.model.transformer import forward

    tokens, mask, positions = padded_batch(model.cfg.vocab_size, [150, 7, 90, 150], seed=5)

    def run(shards):  # a new function each time, so that no compiled program is reused
        fn = lambda p, t, q: forward(p, t, q, cfg=model.cfg, batch_shards=shards)[0]  # noqa: E731
        mapped = "scan" in str(jax.make_jaxpr(fn)(model.params, tokens, positions))
        return np.asarray(jax.jit(fn)(model.params, tokens, positions)), mapped

    whole, mapped = run(1)
    assert not mapped
    row_by_row(monkeypatch)
    rows, mapped = run(1)
    assert mapped
    assert not run(None)[1]  # not told the batch's layout (training): one tile
    real = mask.astype(bool)
    assert np.abs(rows[real] - whole[real]).max() <= 1e-5
    assert np.abs(rows[real] - hf_logits(tiny_models[family][1], tokens, mask)[real]).max() <= 1e-4


def test_row_by_row_sampler_and_scorer_behind_a_prefix_match_plain(model, monkeypatch):
    mesh = make_mesh(devices=jax.devices()[:1])
    prompts = [PREFIX + s for s in SUFFIXES]
    ids = list(range(10, 20))
    plain_tokens = Sampler(model.cfg, mesh, prefix_min_tokens=0).generate(
        model.params, prompts, 12, jax.random.key(3), GREEDY).tokens
    plain_scores = Scorer(model.cfg, mesh, ids, prefix_min_tokens=0).score(model.params, prompts)[0]
    row_by_row(monkeypatch)
    tokens = Sampler(model.cfg, mesh, prefix_min_tokens=16).generate(model.params, prompts, 12, jax.random.key(3),
                                                                      GREEDY).tokens
    scores = Scorer(model.cfg, mesh, ids, prefix_min_tokens=16).score(model.params, prompts)[0]
    assert [t.tolist() for t in tokens] == [t.tolist() for t in plain_tokens]
    np.testing.assert_allclose(scores, plain_scores, atol=1e-5)


def test_row_by_row_prefill_stays_on_each_data_shard(model, monkeypatch):
    """Over a batch split 8 ways the row-by-row pass takes each device's own rows: no collective in
    the compiled scorer, and the same scores as one device. Told the batch is whole (batch_shards=1),
    the same pass gathers the batch on every device, which this test would see."""
    from dalign_jax.engine.sampler import left_pad
    from dalign_jax.model.transformer import KVCache, forward
    from dalign_jax.parallel.mesh import batch_sharding, param_shardings, replicated, shard_params

    row_by_row(monkeypatch)
    mesh = make_mesh(8, 1, 1)
    one = make_mesh(devices=jax.devices()[:1])
    prompts = [PREFIX + [int(t) for t in np.random.default_rng(i).integers(1, 250, 3 + i % 5)] for i in range(16)]
    ids = list(range(10, 20))
    params = shard_params(model.params, mesh)
    sharded = Scorer(model.cfg, mesh, ids, prefix_min_tokens=16)
    np.testing.assert_allclose(sharded.score(params, prompts)[0],
                               Scorer(model.cfg, one, ids, prefix_min_tokens=16).score(model.params, prompts)[0],
                               atol=1e-5)

    prefix, shared, own = sharded.prefixes.split(params, prompts)
    tokens, positions = left_pad(own, 16, 16, 0, offset=shared)

    def hlo(batch_shards):
        def run(p, t, q, pre):
            cache = KVCache.empty(model.cfg, t.shape[0], t.shape[1], prefix=pre)
            return forward(p, t, q, cache, cfg=model.cfg, last_only=True, fresh_cache=True,
                           batch_shards=batch_shards)[0]
        fn = jax.jit(run, in_shardings=(param_shardings(params, mesh), batch_sharding(mesh, 2),
                                        batch_sharding(mesh, 2), replicated(mesh)))
        return fn.lower(params, tokens, positions, prefix).compile().as_text()

    assert "all-gather" not in hlo(8)
    assert "all-gather" in hlo(1)
