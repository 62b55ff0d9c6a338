"""Our forward pass against transformers' PyTorch models, and the HF import/export round trip."""
import jax
import numpy as np
import pytest

from conftest import FAMILIES, hf_logits, padded_batch
from dalign_jax.model.hf_io import export_hf
from dalign_jax.model.loader import load_model
from dalign_jax.model.transformer import KVCache, apply_rope, forward, rope_inv_freq, rope_tables


def our_logits(model, tokens, positions):
    logits, _ = jax.jit(forward, static_argnames="cfg")(model.params, tokens, positions, cfg=model.cfg)
    return np.asarray(logits)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers_on_padded_batch(tiny_models, family):
    directory, torch_model = tiny_models[family]
    model = load_model(str(directory))
    tokens, mask, positions = padded_batch(model.cfg.vocab_size, [11, 7, 3, 11], seed=1)
    ours = our_logits(model, tokens, positions)
    ref = hf_logits(torch_model, tokens, mask)
    real = mask.astype(bool)
    assert np.abs(ours[real] - ref[real]).max() <= 1e-4


@pytest.mark.parametrize("family", list(FAMILIES))
def test_last_only_equals_the_full_pass_last_column(tiny_models, family):
    """`last_only` runs the last layer for the last token alone; its logits, and the cache a prefill
    writes with it, are those of the full pass."""
    model = load_model(str(tiny_models[family][0]))
    tokens, _, positions = padded_batch(model.cfg.vocab_size, [11, 7, 3, 11], seed=2)
    run = jax.jit(forward, static_argnames=("cfg", "last_only", "fresh_cache"))
    full = our_logits(model, tokens, positions)
    last, _ = run(model.params, tokens, positions, cfg=model.cfg, last_only=True)
    np.testing.assert_allclose(np.asarray(last)[:, 0], full[:, -1], rtol=1e-5, atol=1e-5)
    empty = KVCache.empty(model.cfg, tokens.shape[0], tokens.shape[1] + 4)
    last, cache = run(model.params, tokens, positions, empty, cfg=model.cfg, last_only=True, fresh_cache=True)
    full, full_cache = run(model.params, tokens, positions, empty, cfg=model.cfg, fresh_cache=True)
    np.testing.assert_allclose(np.asarray(last)[:, 0], np.asarray(full)[:, -1], rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(cache), jax.tree.leaves(full_cache)):
        np.testing.assert_array_equal(a, b)


def test_family_features_are_read_from_config(tiny_models):
    cfgs = {f: load_model(str(tiny_models[f][0])).cfg for f in FAMILIES}
    assert cfgs["llama3"].rope.factor == 8.0 and cfgs["llama2"].rope.factor == 1.0
    assert cfgs["smollm2"].tie_embeddings and not cfgs["llama2"].tie_embeddings
    assert cfgs["mistral"].sliding_window == 5 and cfgs["llama2"].sliding_window is None
    assert cfgs["qwen2"].qkv_bias and not cfgs["qwen2"].out_bias and not cfgs["qwen3"].qkv_bias
    assert cfgs["qwen3"].qk_norm and cfgs["qwen3"].head_dim == 32
    gemma, gemma2, gemma3 = cfgs["gemma"], cfgs["gemma2"], cfgs["gemma3"]
    assert gemma.norm_offset and gemma.embed_scale and gemma.activation == "gelu_tanh" and not gemma.post_norms
    assert not cfgs["llama2"].norm_offset and cfgs["llama2"].activation == "silu"
    assert gemma2.post_norms and (gemma2.attn_softcap, gemma2.final_softcap) == (0.05, 0.5)
    assert gemma2.sliding_layers == (True, False) and gemma2.query_scale == 24 ** -0.5
    assert gemma3.qk_norm and gemma3.sliding_layers == (False, True)
    assert (gemma3.rope.theta, gemma3.local_rope.theta) == (1e6, 100.0)
    assert gemma3.layer_rope(1) == gemma3.local_rope and gemma3.layer_window(0) is None


@pytest.mark.parametrize("family", ["llama3", "smollm2", "qwen2", "qwen3", "gemma2", "gemma3"])
def test_export_reimport_is_bit_identical_and_transformers_agrees(tiny_models, family, tmp_path):
    import torch
    import transformers

    model = load_model(str(tiny_models[family][0]))
    out = export_hf(tmp_path / "export", model.hf_config, model.cfg, model.params, model.tokenizer,
                    max_shard_bytes=64 * 1024)  # small shards: the sharded index path is exercised too
    assert (out / "model.safetensors.index.json").is_file()
    assert (out / "config.json").is_file() and (out / "generation_config.json").is_file()

    again = load_model(str(out))
    assert again.cfg == model.cfg
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(again.params)):
        assert a.dtype == b.dtype and np.array_equal(a, b)

    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tokens, mask, positions = padded_batch(model.cfg.vocab_size, [9, 4], seed=2)
    with torch.no_grad():
        ref = hf_logits(loaded.eval(), tokens, mask)
    real = mask.astype(bool)
    assert np.abs(our_logits(model, tokens, positions)[real] - ref[real]).max() <= 1e-4


@pytest.mark.parametrize("family", ["llama3", "qwen2"])  # Llama 3's scaled frequencies; a plain theta
def test_rope_tables_rotate_by_the_exact_angle_at_every_position(tiny_models, family):
    model = load_model(str(tiny_models[family][0]))
    cfg = model.cfg
    inv_freq = rope_inv_freq(cfg.layer_rope(0), cfg.head_dim)
    positions = np.arange(-3, cfg.max_position, dtype=np.int32)[None]  # padding (< 0) rotates as position 0
    x = np.random.default_rng(0).normal(size=(1, positions.shape[1], 2, cfg.head_dim)).astype(np.float32)
    ours = np.asarray(apply_rope(x, positions, rope_tables(inv_freq, cfg.max_position)))
    angle = np.maximum(positions, 0)[..., None, None] * inv_freq.astype(np.float64)
    x1, x2 = np.split(x.astype(np.float64), 2, axis=-1)
    exact = np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle), x2 * np.cos(angle) + x1 * np.sin(angle)], -1)
    assert np.abs(ours - exact).max() <= 2e-6


@pytest.mark.parametrize("family", ["llama2", "mistral"])
def test_long_padded_batch_crosses_attention_chunks(tiny_models, family):
    from dalign_jax.model.transformer import ATTENTION_CHUNK

    directory, torch_model = tiny_models[family]
    model = load_model(str(directory))
    lengths = [ATTENTION_CHUNK * 2 + 37, ATTENTION_CHUNK + 5]
    tokens, mask, positions = padded_batch(model.cfg.vocab_size, lengths, seed=6)
    real = mask.astype(bool)
    ref = hf_logits(torch_model, tokens, mask)
    assert np.abs(our_logits(model, tokens, positions)[real] - ref[real]).max() <= 1e-4



def test_llama_with_attention_bias_has_an_output_bias(monkeypatch, tmp_path):
    """Llama's `attention_bias` puts a bias on the output projection too (Qwen2's biases stop at v)."""
    import torch
    import transformers

    from conftest import TINY, make_hf_model

    monkeypatch.setitem(FAMILIES, "llama_bias", ("LlamaConfig", dict(TINY, attention_bias=True)))
    torch_model = make_hf_model("llama_bias", tmp_path / "hf")
    with torch.no_grad():  # zero-initialised biases would hide a missing one
        for name, p in torch_model.named_parameters():
            if name.endswith("proj.bias"):
                p.normal_(0.0, 0.5)
    torch_model.save_pretrained(tmp_path / "hf")
    model = load_model(str(tmp_path / "hf"))
    assert model.cfg.qkv_bias and model.cfg.out_bias
    tokens, mask, positions = padded_batch(model.cfg.vocab_size, [11, 7, 3, 11], seed=1)
    real = mask.astype(bool)
    ref = hf_logits(torch_model, tokens, mask)
    assert np.abs(our_logits(model, tokens, positions)[real] - ref[real]).max() <= 1e-4
    out = export_hf(tmp_path / "export", model.hf_config, model.cfg, model.params, model.tokenizer)
    _, info = transformers.AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


@pytest.mark.parametrize("stored", ["[in, out]", "[out, in]"])
def test_bf16_matmuls_round_their_operands_and_sum_in_float32(stored):
    """`linear_bf16` (and `linear_bf16_t`, for a weight stored [out, in]) and their gradients are
    float32 products of bfloat16-rounded operands."""
    import jax.numpy as jnp

    from dalign_jax.model.transformer import linear_bf16, linear_bf16_t

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 5, 64)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((64, 48)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((3, 5, 48)), jnp.float32)
    r = lambda a: np.asarray(jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float32), np.float64)  # noqa: E731
    if stored == "[in, out]":
        out, pullback = jax.vjp(linear_bf16, x, w)
        dx, dw = pullback(g)
    else:
        out, pullback = jax.vjp(linear_bf16_t, x, w.T)
        dx, dw_t = pullback(g)
        dw = dw_t.T
    np.testing.assert_allclose(out, r(x) @ r(w), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, r(g) @ r(w).T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, np.einsum("bti,bto->io", r(x), r(g)), rtol=1e-5, atol=1e-4)
    # not the exact float32 product: the rounding is there
    assert np.abs(np.asarray(out) - np.asarray(x) @ np.asarray(w)).max() > 1e-3


@pytest.mark.parametrize("family", ["smollm2", "gemma2"])
def test_bf16_matmul_model_stays_near_the_float32_one(tiny_models, family):
    """`models.matmul_dtype: bfloat16` reaches the forward pass and moves the logits by bfloat16's
    rounding only."""
    directory, _ = tiny_models[family]
    exact = load_model(str(directory))
    rounded = load_model(str(directory), matmul_dtype="bfloat16")
    assert rounded.cfg.matmul_dtype == "bfloat16" and exact.cfg.matmul_dtype == "float32"
    tokens, mask, positions = padded_batch(exact.cfg.vocab_size, [11, 7, 3, 11], seed=3)
    a, b = our_logits(exact, tokens, positions), our_logits(rounded, tokens, positions)
    real = mask.astype(bool)
    diff = np.abs(a[real] - b[real])
    assert 1e-5 < diff.max() < 0.05 * np.abs(a[real]).max()
