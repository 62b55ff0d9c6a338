"""The compiled sampler against a plain reference: full forward passes without a cache."""
import jax
import numpy as np
import pytest

from conftest import needs_default_model
from dalign_jax.engine.sampler import GREEDY, SampleOutput, Sampler, SamplingParams, select_tokens
from dalign_jax.errors import UserError
from dalign_jax.model.loader import load_model
from dalign_jax.model.transformer import forward
from dalign_jax.parallel.mesh import make_mesh

PROMPTS = [[5, 17, 33, 2, 9, 100, 7], [44, 3], [250, 1, 1, 8, 64]]


@pytest.fixture(scope="module")
def model(tiny_models):
    return load_model(str(tiny_models["llama2"][0]))


@pytest.fixture(scope="module")
def sampler(model):
    return Sampler(model.cfg, make_mesh(devices=jax.devices()[:1]))


def reference_greedy(model, prompt, steps):
    """Greedy decoding by re-running the whole sequence each step; returns tokens and logprobs."""
    fwd = jax.jit(forward, static_argnames="cfg")
    seq, logps = list(prompt), []
    for _ in range(steps):
        logits, _ = fwd(model.params, np.array([seq], np.int32), np.arange(len(seq), dtype=np.int32)[None], cfg=model.cfg)
        logp = jax.nn.log_softmax(np.asarray(logits[0, -1]))
        seq.append(int(np.argmax(logp)))
        logps.append(float(logp[seq[-1]]))
    return seq[len(prompt):], np.array(logps)


def test_greedy_matches_uncached_reference_for_prompts_of_different_lengths(model, sampler):
    out = sampler.generate(model.params, PROMPTS, 10, jax.random.key(0), GREEDY)
    for prompt, tokens, logps in zip(PROMPTS, out.tokens, out.logprobs):
        ref_tokens, ref_logps = reference_greedy(model, prompt, 10)
        assert tokens.tolist() == ref_tokens
        np.testing.assert_allclose(logps, ref_logps, atol=1e-4)
    assert out.lengths.tolist() == [10, 10, 10] and not out.stopped.any()


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_greedy_matches_uncached_reference_for_gemma(tiny_models, family):
    """The cache with per-layer windows (and Gemma 3's RoPE per layer type) decodes as full passes do."""
    gemma = load_model(str(tiny_models[family][0]))
    out = Sampler(gemma.cfg, make_mesh(devices=jax.devices()[:1])).generate(
        gemma.params, PROMPTS, 10, jax.random.key(0), GREEDY)
    for prompt, tokens, logps in zip(PROMPTS, out.tokens, out.logprobs):
        ref_tokens, ref_logps = reference_greedy(gemma, prompt, 10)
        assert tokens.tolist() == ref_tokens
        np.testing.assert_allclose(logps, ref_logps, atol=1e-4)


def test_repetition_penalty_decodes_as_transformers_does(tiny_models, model):
    """Greedy decoding with a repetition penalty against transformers' `generate` on the same weights,
    with a shared prefix whose tokens count as seen (transformers sees the whole input); the reported
    log-probabilities stay the model's own, as an RL trainer recomputes them."""
    import torch
    import transformers

    hf = tiny_models["llama2"][1]
    shared = list(range(3, 200, 3))  # many distinct tokens, so that repeating one of them is likely
    prompts = [shared + [100, 7], shared + [44, 2]]
    sampler = Sampler(model.cfg, make_mesh(devices=jax.devices()[:1]), prefix_min_tokens=4)
    penalised = sampler.generate(model.params, prompts, 12, jax.random.key(0),
                                 SamplingParams(temperature=0.0, repetition_penalty=1.8))
    assert sampler.prefixes.misses == 1  # the shared tokens went through the prefix cache
    plain = sampler.generate(model.params, prompts, 12, jax.random.key(0), GREEDY)
    assert any(a.tolist() != b.tolist() for a, b in zip(penalised.tokens, plain.tokens))
    settings = transformers.GenerationConfig(max_new_tokens=12, do_sample=False, repetition_penalty=1.8,
                                             pad_token_id=0)
    fwd = jax.jit(forward, static_argnames="cfg")
    for prompt, tokens, logps in zip(prompts, penalised.tokens, penalised.logprobs):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              generation_config=settings)[0, len(prompt):].tolist()
        assert len(ref) >= 4 and tokens.tolist()[:len(ref)] == ref  # (transformers stops at its EOS)
        seq = np.array([prompt + tokens.tolist()], np.int32)
        logits, _ = fwd(model.params, seq, np.arange(seq.shape[1], dtype=np.int32)[None], cfg=model.cfg)
        own = jax.nn.log_softmax(np.asarray(logits[0, len(prompt) - 1:-1]), axis=-1)
        np.testing.assert_allclose(logps, np.take_along_axis(np.asarray(own), tokens[:, None], 1)[:, 0], atol=1e-4)


def test_per_row_stop_tokens_and_length_limits(model, sampler):
    free = sampler.generate(model.params, PROMPTS, 10, jax.random.key(0), GREEDY)
    stop_row0 = int(free.tokens[0][3])
    first = free.tokens[0].tolist().index(stop_row0)
    out = sampler.generate(model.params, PROMPTS, [10, 4, 10], jax.random.key(0), GREEDY,
                           stop_tokens=[[stop_row0], [], [-5]])
    assert out.tokens[0].tolist() == free.tokens[0][:first + 1].tolist() and out.stopped[0]
    assert out.tokens[1].tolist() == free.tokens[1][:4].tolist() and not out.stopped[1]
    assert out.lengths.tolist() == [first + 1, 4, 10]


def test_sampling_is_deterministic_per_key_and_independent_of_batch(model, sampler):
    hot = SamplingParams(temperature=1.5)
    a = sampler.generate(model.params, PROMPTS, 12, jax.random.key(7), hot)
    b = sampler.generate(model.params, PROMPTS, 12, jax.random.key(7), hot)
    c = sampler.generate(model.params, PROMPTS, 12, jax.random.key(8), hot)
    alone = sampler.generate(model.params, PROMPTS[:1], 12, jax.random.key(7), hot)
    assert [t.tolist() for t in a.tokens] == [t.tolist() for t in b.tokens]
    assert [t.tolist() for t in a.tokens] != [t.tolist() for t in c.tokens]
    assert alone.tokens[0].tolist() == a.tokens[0].tolist()


def test_sampled_logprobs_are_the_temperature_scaled_model_logprobs(model, sampler):
    hot = SamplingParams(temperature=0.7)
    out = sampler.generate(model.params, PROMPTS[:1], 6, jax.random.key(3), hot)
    seq = PROMPTS[0] + out.tokens[0].tolist()
    logits, _ = forward(model.params, np.array([seq], np.int32), np.arange(len(seq), dtype=np.int32)[None],
                        cfg=model.cfg)
    logp = jax.nn.log_softmax(np.asarray(logits[0]) / 0.7, axis=-1)
    n = len(PROMPTS[0])
    expected = [logp[n - 1 + i, tok] for i, tok in enumerate(out.tokens[0])]
    np.testing.assert_allclose(out.logprobs[0], expected, atol=1e-4)


def test_top_k_and_top_p_filters():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]] * 2000, np.float32))
    keys = jax.random.split(jax.random.key(0), 2000)
    top1, _ = select_tokens(logits, keys, SamplingParams(temperature=1.0, top_k=1))
    assert set(np.asarray(top1).tolist()) == {0}
    top2, _ = select_tokens(logits, keys, SamplingParams(temperature=1.0, top_k=2))
    assert set(np.asarray(top2).tolist()) == {0, 1}
    nucleus, _ = select_tokens(logits, keys, SamplingParams(temperature=1.0, top_p=0.85))
    assert set(np.asarray(nucleus).tolist()) == {0, 1, 2}  # 0.5 + 0.3 < 0.85: the third token is needed
    full, _ = select_tokens(logits, keys, SamplingParams(temperature=1.0))
    frequencies = np.bincount(np.asarray(full), minlength=4) / 2000
    np.testing.assert_allclose(frequencies, [0.5, 0.3, 0.15, 0.05], atol=0.04)
    cold, _ = select_tokens(logits, keys, SamplingParams(temperature=0.5))  # p^2, renormalised
    expected = np.array([0.25, 0.09, 0.0225, 0.0025]) / 0.365
    np.testing.assert_allclose(np.bincount(np.asarray(cold), minlength=4) / 2000, expected, atol=0.04)
    both, _ = select_tokens(logits, keys, SamplingParams(temperature=1.0, top_k=3, top_p=0.6))
    assert set(np.asarray(both).tolist()) == {0, 1}  # top-k keeps 3 (mass 0.95), top-p 0.6 of that: 2
    # min-p 0.25: tokens at least 0.125 likely (a quarter of 0.5); 0.15 / 0.95 of the mass is the third's.
    floor, _ = select_tokens(logits, keys, SamplingParams(temperature=1.0, min_p=0.25))
    np.testing.assert_allclose(np.bincount(np.asarray(floor), minlength=4) / 2000,
                               np.array([0.5, 0.3, 0.15, 0.0]) / 0.95, atol=0.04)
    assert set(np.asarray(select_tokens(logits, keys, SamplingParams(temperature=1.0, min_p=0.5))[0]).tolist()) == {0, 1}


def test_shapes_are_bucketed_and_compilations_counted(model):
    sampler = Sampler(model.cfg, make_mesh(devices=jax.devices()[:1]))
    sampler.generate(model.params, PROMPTS, 10, jax.random.key(0), GREEDY)
    assert sampler.compile_count == 1
    # Other prompt lengths, batch sizes and limits inside the same buckets reuse the compilation.
    sampler.generate(model.params, [[1, 2, 3], [1, 2, 4], [2, 3], [7]], 16, jax.random.key(1), GREEDY)
    sampler.generate(model.params, [[9] * 16, [4], [5]], [3, 12, 1], jax.random.key(2), GREEDY)
    assert sampler.compile_count == 1
    sampler.generate(model.params, [[9] * 40], 10, jax.random.key(0), GREEDY)  # next prompt bucket
    assert sampler.compile_count == 2
    # Repeated prompts (prefilled once, then copied to their rows) are one more program, reused.
    sampler.generate(model.params, [[1, 2, 3]] * 4, 16, jax.random.key(1), GREEDY)
    sampler.generate(model.params, [[5, 6]] * 3, 10, jax.random.key(1), GREEDY)
    assert sampler.compile_count == 3


def test_bad_requests_are_errors(model, sampler):
    with pytest.raises(UserError, match="empty prompt"):
        sampler.generate(model.params, [[1], []], 4, jax.random.key(0))
    with pytest.raises(UserError, match="context"):
        sampler.generate(model.params, [[1] * 4090], 64, jax.random.key(0))


def test_long_prompt_prefill_in_chunks_matches_reference(model, sampler):
    from dalign_jax.model.transformer import ATTENTION_CHUNK

    prompt = list(np.random.default_rng(1).integers(1, 250, ATTENTION_CHUNK + 100))
    out = sampler.generate(model.params, [prompt, prompt[:50]], 4, jax.random.key(0), GREEDY)
    assert out.tokens[0].tolist() == reference_greedy(model, prompt, 4)[0]
    assert out.tokens[1].tolist() == reference_greedy(model, prompt[:50], 4)[0]


def test_repeated_prompts_share_their_prefill(model, sampler):
    """k samples of one prompt: one prefill, copied to its rows; greedy rows equal the prompt alone,
    sampled rows differ from each other and report the model's own log-probabilities."""
    rows = [PROMPTS[0]] * 3 + [PROMPTS[1]] * 2 + [PROMPTS[2]]
    greedy = sampler.generate(model.params, rows, 8, jax.random.key(0), GREEDY)
    for prompt, out in zip(rows, greedy.tokens):
        alone = sampler.generate(model.params, [prompt], 8, jax.random.key(0), GREEDY)
        assert out.tolist() == alone.tokens[0].tolist()
    hot = SamplingParams(temperature=1.5)
    sampled = sampler.generate(model.params, rows, 10, jax.random.key(5), hot)
    assert len({tuple(t.tolist()) for t in sampled.tokens[:3]}) > 1
    for prompt, tokens, logprobs in zip(rows, sampled.tokens, sampled.logprobs):
        seq = prompt + tokens.tolist()
        logits, _ = forward(model.params, np.array([seq], np.int32), np.arange(len(seq), dtype=np.int32)[None],
                            cfg=model.cfg)
        logp = jax.nn.log_softmax(np.asarray(logits[0]) / 1.5, axis=-1)
        expected = [logp[len(prompt) - 1 + i, t] for i, t in enumerate(tokens)]
        np.testing.assert_allclose(logprobs, expected, atol=1e-4)


@needs_default_model
def test_narrow_sampling_weights_decode_as_float32_does_on_most_positions():
    """bf16 and int8 copies of the default model against its float32 weights, teacher-forced on the
    float32 greedy continuations of six prompts (64 tokens each): the share of positions whose greedy
    token is the same, and the log-probability each gives the float32 choice. Measured on 2026-12-08
    (bf16 products summed in float32): bf16 0.992 (381 of 384), mean |diff| 0.019, max 0.14; int8
    0.982 (377), 0.033, 0.28."""
    from dalign_jax.engine.chat import encode_chat
    from dalign_jax.model.loader import DEFAULT_MODEL

    model = load_model(DEFAULT_MODEL, need_tokenizer=True)
    questions = ["What is the capital of France?", "How do I bake bread?", "Explain photosynthesis briefly.",
                 "Write a haiku about rain.", "How do I pick a lock?", "Give me three tips for studying."]
    prompts = [encode_chat(model.tokenizer, [{"role": "user", "content": q}]) for q in questions]
    mesh = make_mesh(devices=jax.devices()[:1])
    reference = Sampler(model.cfg, mesh).generate(model.params, prompts, 64, jax.random.key(0), GREEDY)
    seqs = [p + list(t) for p, t in zip(prompts, reference.tokens)]
    width = max(map(len, seqs))
    tokens, positions = np.zeros((len(seqs), width), np.int32), np.full((len(seqs), width), -1, np.int32)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)], positions[i, :len(s)] = s, np.arange(len(s))
    fwd = jax.jit(forward, static_argnames="cfg")
    logp = lambda p: np.asarray(jax.nn.log_softmax(fwd(p, tokens, positions, cfg=model.cfg)[0]))  # noqa: E731
    base = logp(model.params)
    for weights, share, mean_diff in (("bfloat16", 0.97, 0.04), ("int8", 0.96, 0.06)):
        narrow = logp(Sampler(model.cfg, mesh, weights=weights).narrow(model.params))
        same, diffs = [], []
        for i, s in enumerate(seqs):
            cols, chosen = slice(len(prompts[i]) - 1, len(s) - 1), np.array(s[len(prompts[i]):])[:, None]
            same.append(base[i, cols].argmax(-1) == narrow[i, cols].argmax(-1))
            picked = [np.take_along_axis(x[i, cols], chosen, 1) for x in (base, narrow)]
            diffs.append(np.abs(picked[0] - picked[1]))
        same, diffs = np.concatenate(same), np.concatenate(diffs)
        assert same.mean() >= share and diffs.mean() <= mean_diff and diffs.max() < 1.0, \
            (weights, same.mean(), diffs.mean())


def test_int8_sampling_weights_shard_and_decode_alike(model):
    """The int8 copy laid out on a data x fsdp x tensor mesh decodes the tokens it does on one device."""
    one = Sampler(model.cfg, make_mesh(devices=jax.devices()[:1]), weights="int8")
    eight = Sampler(model.cfg, make_mesh(1, 2, 4), weights="int8")
    a = one.generate(model.params, PROMPTS, 8, jax.random.key(0), GREEDY)
    b = eight.generate(model.params, PROMPTS, 8, jax.random.key(0), GREEDY)
    assert [t.tolist() for t in a.tokens] == [t.tolist() for t in b.tokens]
    assert eight.narrow(model.params) is eight.narrow(model.params)  # made once per parameter tree
    assert eight.narrow(model.params)["layers"][0]["wq"]["int8"].dtype == np.int8
    with pytest.raises(UserError, match="sampler: weights 'fp8'"):
        Sampler(model.cfg, make_mesh(devices=jax.devices()[:1]), weights="fp8")


QUEUE = [[int(t) for t in np.random.default_rng(i).integers(1, 250, 2 + 3 * i % 23)] for i in range(11)]


def assert_same_rows(out, expected):
    assert [t.tolist() for t in out.tokens] == [t.tolist() for t in expected.tokens]
    for a, b in zip(out.logprobs, expected.logprobs):
        np.testing.assert_allclose(a, b, atol=1e-4)
    assert out.lengths.tolist() == expected.lengths.tolist() and out.stopped.tolist() == expected.stopped.tolist()


@pytest.mark.parametrize("sampling", [GREEDY, SamplingParams(temperature=1.3, top_p=0.9)], ids=["greedy", "sampled"])
def test_continuous_batching_gives_each_prompt_its_own_tokens(model, sampler, sampling):
    """A queue of 11 prompts on 4 rows, with mixed limits and stop tokens: every prompt gets the tokens
    it gets alone, with the same key and index; more rows or another order change nothing."""
    limits = [3 + 5 * i % 17 for i in range(len(QUEUE))]
    key = jax.random.key(4)
    free = sampler.generate(model.params, QUEUE, limits, key, sampling, batch_rows=4)
    stops = [[int(t[1]), -3] if i % 2 else [] for i, t in enumerate(free.tokens)]  # every other row stops early
    out = sampler.generate(model.params, QUEUE, limits, key, sampling, stops, batch_rows=4)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(np.arange(len(QUEUE)))
    for i, prompt in enumerate(QUEUE):
        alone = sampler.generate(model.params, [prompt], limits[i], keys[i:i + 1], sampling, [stops[i]])
        assert_same_rows(SampleOutput([out.tokens[i]], [out.logprobs[i]], out.lengths[i:i + 1], out.stopped[i:i + 1]),
                         alone)
    assert out.stopped[1::2].all() and not out.stopped[::2].any()
    assert_same_rows(sampler.generate(model.params, QUEUE, limits, key, sampling, stops, batch_rows=2), out)
    order = np.random.default_rng(0).permutation(len(QUEUE))
    shuffled = sampler.generate(model.params, [QUEUE[i] for i in order], [limits[i] for i in order], keys[order],
                                sampling, [stops[i] for i in order], batch_rows=4)
    back = np.argsort(order)
    assert_same_rows(SampleOutput([shuffled.tokens[i] for i in back], [shuffled.logprobs[i] for i in back],
                                  shuffled.lengths[back], shuffled.stopped[back]), out)


def test_continuous_batching_shares_repeated_prompts_and_a_prefix(model):
    """k samples per prompt behind a shared prefix (distill's case), with the repetition penalty."""
    sampler = Sampler(model.cfg, make_mesh(devices=jax.devices()[:1]), prefix_min_tokens=8)
    spec = list(range(30, 50))
    rows = [spec + p for p in QUEUE[:6] for _ in range(2)]
    sampling = SamplingParams(temperature=0.8, repetition_penalty=1.3)
    out = sampler.generate(model.params, rows, 9, jax.random.key(2), sampling, batch_rows=4)
    assert_same_rows(out, sampler.generate(model.params, rows, 9, jax.random.key(2), sampling))
    assert len({tuple(t.tolist()) for t in out.tokens[:2]}) == 2  # the two samples of a prompt differ


def test_continuous_batching_compiles_once_per_refill_size(model):
    """Programs per batch shape, never per refill: open, a refill per distinct-prompt bucket (1, 2, 4),
    and decode and keep-rows per batch the rows shrink to (4, 2, 1): at most 9, however long the queue."""
    sampler = Sampler(model.cfg, make_mesh(devices=jax.devices()[:1]))
    limits = [2 + 7 * i % 15 for i in range(len(QUEUE))]
    sampler.generate(model.params, QUEUE, limits, jax.random.key(0), GREEDY, batch_rows=4)
    assert 3 <= sampler.compile_count <= 9
    longer = QUEUE * 3
    sampler.generate(model.params, longer, limits[::-1] * 3, jax.random.key(1), GREEDY, batch_rows=4)
    assert sampler.compile_count <= 9


def test_continuous_batching_on_a_sharded_mesh_equals_one_device(model, sampler):
    limits = [4 + 3 * i % 11 for i in range(len(QUEUE))]
    sharded = Sampler(model.cfg, make_mesh(data=4, fsdp=2))
    hot = SamplingParams(temperature=1.0)
    assert_same_rows(sharded.generate(model.params, QUEUE, limits, jax.random.key(3), hot, batch_rows=8),
                     sampler.generate(model.params, QUEUE, limits, jax.random.key(3), hot, batch_rows=8))
