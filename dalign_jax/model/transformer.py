"""The decoder: one pure forward function that every stage calls (sampler, judge, SFT, RL).

Parameters are a plain pytree with one dict per layer. The layers are unrolled by default rather
than stacked under `lax.scan`: on CPU, slicing a stacked weight or cache per scan step copies it, and
those copies cost as much as the matmuls; separate arrays are read in place, and each layer's cache is
updated in place (the new keys are written first, then attended to). Under `cfg.scan_layers` the
layers are one dict of stacked arrays [num_layers, ...] (`stack_layers`) and run as one `lax.scan`,
so that compile time does not grow with depth (accelerators); both forms give the same numbers.

Padding is expressed through positions: a token whose position is negative is padding. Attention
masks are derived from positions alone (a key is visible when it is real, not later than the query,
and inside the sliding window), so left-padded prompts, shared prefixes and cached decoding share one
rule.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from dalign_jax.model.config import ModelConfig, RopeConfig

Params = dict


class KVCache(NamedTuple):
    """Keys and values per layer. A shared prefix (one spec, many prompts) is held once, unbatched,
    in `prefix_*`: every row attends to it, and it is never copied per row."""

    # per layer [batch, kv_heads, slots, head_dim]; under `cfg.scan_layers` one stacked array
    # [layers, batch, kv_heads, slots, head_dim] (and the prefix's [layers, kv_heads, prefix, head_dim])
    k: tuple[jax.Array, ...] | jax.Array
    v: tuple[jax.Array, ...] | jax.Array
    positions: jax.Array  # [batch, slots] int32; -1 marks an empty slot
    index: jax.Array  # int32 scalar: the next slot to write
    prefix_k: tuple[jax.Array, ...] | None = None  # per layer [kv_heads, prefix, head_dim]
    prefix_v: tuple[jax.Array, ...] | None = None
    prefix_positions: jax.Array | None = None  # [prefix] int32; -1 marks padding

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, slots: int, dtype=jnp.float32, prefix=None) -> "KVCache":
        """`prefix`: (k, v, positions) from `prefill_prefix`, shared by every row."""
        shape = (batch, cfg.num_kv_heads, slots, cfg.head_dim)
        prefix = prefix or (None, None, None)
        if cfg.scan_layers:
            k = v = jnp.zeros((cfg.num_layers,) + shape, dtype)
        else:
            k = v = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
        return cls(k=k, v=v, positions=jnp.full((batch, slots), -1, jnp.int32), index=jnp.zeros((), jnp.int32),
                   prefix_k=prefix[0], prefix_v=prefix[1], prefix_positions=prefix[2])

    def take_rows(self, rows: jax.Array) -> "KVCache":
        """The cache of the given rows (a row may repeat: the k samples of one prompt share its prefill)."""
        stacked = not isinstance(self.k, tuple)
        take = lambda x: jnp.take(x, rows, axis=1 if stacked else 0)  # noqa: E731
        k, v = (take(self.k), take(self.v)) if stacked else (tuple(map(take, self.k)), tuple(map(take, self.v)))
        return self._replace(k=k, v=v, positions=jnp.take(self.positions, rows, axis=0))


def is_stacked(params: Params) -> bool:
    return isinstance(params["layers"], dict)


def stack_layers(params: Params) -> Params:
    """The per-layer dicts as one dict of arrays [num_layers, ...] (the `cfg.scan_layers` form)."""
    if is_stacked(params):
        return params
    on_host = isinstance(jax.tree.leaves(params["layers"][0])[0], np.ndarray)  # stays on the host if it was
    return dict(params, layers=jax.tree.map(lambda *xs: (np if on_host else jnp).stack(xs), *params["layers"]))


def unstack_layers(params: Params) -> Params:
    """The inverse of `stack_layers`: one dict per layer (export and the unrolled form)."""
    if not is_stacked(params):
        return params
    n = len(next(iter(params["layers"].values())))
    return dict(params, layers=[jax.tree.map(lambda x: x[i], params["layers"]) for i in range(n)])


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """Inverse frequencies, with Llama 3's wavelength-dependent scaling when `rope.factor != 1`."""
    inv_freq = 1.0 / (rope.theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    if rope.factor == 1.0:
        return inv_freq.astype(np.float32)
    low_wavelen = rope.original_max_position / rope.low_freq_factor
    high_wavelen = rope.original_max_position / rope.high_freq_factor
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (rope.original_max_position / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


# cos/sin of position x frequency from two small float64 tables (p = high * ROPE_STEP + low, angle
# addition): loads instead of transcendentals in every fused rotation, and the exact angle.
ROPE_STEP = 128


def rope_tables(inv_freq: np.ndarray, max_position: int) -> tuple[np.ndarray, ...]:
    """cos and sin of (high x ROPE_STEP x f) for every high step up to `max_position`, and of (low x f)."""
    freq = inv_freq.astype(np.float64)
    low = np.arange(ROPE_STEP, dtype=np.float64)[:, None] * freq
    high = np.arange(-(-max_position // ROPE_STEP) + 1, dtype=np.float64)[:, None] * ROPE_STEP * freq
    return tuple(x.astype(np.float32) for x in (np.cos(high), np.sin(high), np.cos(low), np.sin(low)))


def apply_rope(x: jax.Array, positions: jax.Array, tables: tuple[np.ndarray, ...]) -> jax.Array:
    """Rotate `x` [batch, time, heads, head_dim] in the half-split layout that HF checkpoints use.
    Padding (a negative position) rotates as position 0; the tables end a step past the model's context."""
    cos_high, sin_high, cos_low, sin_low = (jnp.asarray(t) for t in tables)
    p = jnp.clip(positions, 0, cos_high.shape[0] * ROPE_STEP - 1)
    high, low = p // ROPE_STEP, p % ROPE_STEP
    ch, sh, cl, sl = cos_high[high], sin_high[high], cos_low[low], sin_low[low]  # [b, t, hd/2]
    cos = (ch * cl - sh * sl)[:, :, None, :]
    sin = (sh * cl + ch * sl)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


@jax.custom_vjp
def linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """`x @ w` for x [..., in] and a weight [in, out]. Differentiated by hand so that the weight's
    gradient is contracted as x^T @ g: XLA's CPU matmul wants the contracted axis of its left operand
    innermost, and autodiff's own form (g^T @ x, then a transpose) made it transpose the wide gradient
    of the MLP (fused with the activation's derivative, twice per layer) where it now transposes the
    narrower x (the SFT benchmark's step on 2 CPU devices: 3.4 s before, 2.9-3.0 s after, with the
    loss's projection cut to the columns that have a target; see docs/benchmarks.md)."""
    return x @ w


def _linear_forward(x, w):
    return x @ w, (x, w)


def _linear_backward(saved, g):
    x, w = saved
    return jnp.einsum("...o,io->...i", g, w), jnp.einsum("...i,...o->io", x, g)


linear.defvjp(_linear_forward, _linear_backward)


def _bf16_dot(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum(spec, a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), preferred_element_type=jnp.float32)


def _bf16_linear(forward_spec: str, input_grad_spec: str, weight_grad_spec: str):
    """A matmul of x and a weight with both operands rounded to bfloat16 and the products summed in
    float32, in x's dtype, with its gradients in the same form; the einsum specs name the weight's
    layout (the weight's gradient spec takes the output gradient first, then x)."""

    @jax.custom_vjp
    def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
        return _bf16_dot(forward_spec, x, w).astype(x.dtype)

    def backward(saved, g):
        x, w = saved
        return _bf16_dot(input_grad_spec, g, w).astype(x.dtype), _bf16_dot(weight_grad_spec, g, x).astype(w.dtype)

    matmul.defvjp(lambda x, w: (matmul(x, w), (x, w)), backward)
    return matmul


# `linear` with bf16 operands and float32 sums (`matmul_dtype: bfloat16`), a TPU's default precision;
# XLA:CPU ignores precision settings but runs this form through its bf16 kernels.
linear_bf16 = _bf16_linear("...i,io->...o", "...o,io->...i", "...o,...i->io")
# The same for a weight stored [out, in] (tied embeddings): through `.T`, XLA:CPU could not run the
# gradient's doubly transposed bf16 contraction.
linear_bf16_t = _bf16_linear("...i,oi->...o", "...o,oi->...i", "...o,...i->oi")


def _sums_in_float32(cfg: ModelConfig, dtype) -> bool:
    """Whether matmuls take bfloat16 operands and sum in float32. A bfloat16 compute dtype does too:
    XLA:CPU runs a dot with a bfloat16 result 3-4x slower than the same dot summed in float32 (its
    bf16 kernels), and a TPU sums bf16 products in float32 anyway."""
    return cfg.matmul_dtype == "bfloat16" or jnp.dtype(dtype) == jnp.bfloat16


def projection(cfg: ModelConfig, dtype):
    """x @ w for the layer's weights: in `dtype` (the weights cast to it), or with
    `cfg.matmul_dtype` bfloat16 or a bfloat16 `dtype` through `linear_bf16` (whose result is in x's
    dtype already). A weight may be int8 with a scale per output column (`quantize_int8`, the
    sampler's narrow copy)."""
    plain = linear_bf16 if _sums_in_float32(cfg, dtype) else (lambda x, w: linear(x, w.astype(dtype)))

    def mm(x, w):
        if isinstance(w, dict):  # {"int8": [in, out], "scale": [out]}: the scale applies after the sum
            # int8 values are exact in bfloat16, and XLA:CPU's bf16 dot beats widening them to float32.
            return (_bf16_dot("...i,io->...o", x, w["int8"]) * w["scale"]).astype(x.dtype)
        return plain(x, w)

    return mm


INT8_WEIGHTS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


def quantize_int8(params: Params) -> Params:
    """The layers' projection matrices as int8 with a float32 scale per output column (symmetric,
    weight-only: activations stay in their dtype); norms, biases and embeddings unchanged."""
    def quantize(w):
        scale = jnp.maximum(jnp.abs(w).max(axis=-2), 1e-12) / 127.0  # per output column
        q = jnp.clip(jnp.round(w / scale[..., None, :]), -127, 127).astype(jnp.int8)
        return {"int8": q, "scale": scale.astype(jnp.float32)}

    def layer(lp):
        return {k: quantize(v) if k in INT8_WEIGHTS else v for k, v in lp.items()}

    layers = params["layers"]
    return dict(params, layers=layer(layers) if isinstance(layers, dict) else [layer(lp) for lp in layers])


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, offset: bool = False) -> jax.Array:
    """`offset`: the weight is stored as w - 1 (Gemma) and applied as 1 + w."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    weight = weight.astype(jnp.float32)
    return (normed * (1.0 + weight if offset else weight)).astype(x.dtype)


def _norm(cfg: ModelConfig, x: jax.Array, weight: jax.Array) -> jax.Array:
    return rms_norm(x, weight, cfg.rms_norm_eps, cfg.norm_offset)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """Gemma 2's soft cap: values squashed into (-cap, cap), nearly unchanged well inside it."""
    return x if cap is None else cap * jnp.tanh(x / cap)


class ScoreRule(NamedTuple):
    """How attention scores come from q . k: times `scale`, then soft-capped (Gemma 2)."""
    scale: float
    cap: float | None = None

    @classmethod
    def of(cls, cfg: ModelConfig) -> "ScoreRule":
        return cls(cfg.query_scale or 1.0 / np.sqrt(cfg.head_dim), cfg.attn_softcap)


_ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
                "gelu": functools.partial(jax.nn.gelu, approximate=False)}


def attention_mask(q_pos: jax.Array, k_pos: jax.Array, window: int | None) -> jax.Array:
    """[batch, q, k] bool: the key is a real token, not after the query, and inside the window."""
    q = q_pos[:, :, None]
    k = k_pos[:, None, :]
    visible = (k >= 0) & (q >= 0) & (k <= q)
    if window is not None:
        visible &= k > q - window
    return visible


# Prefill attends in query chunks, each against the keys up to its end, so the score matrix never exists
# whole; behind a shared prefix, whose keys dominate, chunks are twice as long (docs/benchmarks.md).
ATTENTION_CHUNK = 128


def _attend(q, blocks, rule: ScoreRule):
    """Grouped-query attention over key/value blocks, joined at the score level (never copied).

    q: [batch, kv_heads, group, time, head_dim]. Each block is (k, v, mask): k, v are [batch, kv_heads,
    slots, head_dim] (per row) or [kv_heads, slots, head_dim] (shared by all rows), layouts in which
    both products are plain batched matmuls; mask is [batch, 1, 1, time, slots].
    """
    q = q.astype(jnp.float32) * rule.scale
    scores = []
    for k, _, mask in blocks:
        spec = "bkgtd,ksd->bkgts" if k.ndim == 3 else "bkgtd,bksd->bkgts"
        s = softcap(_cached_product(spec, q, k), rule.cap)
        # Masked by adding -1e30 (the values a select gives, for any |s| below 1e22): on a CPU a select
        # over the whole score tile cost more.
        scores.append(s + jnp.where(mask, 0.0, -1e30))
    probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1)
    out, start = 0.0, 0
    for (k, v, _), s in zip(blocks, scores):
        p = probs[..., start:start + s.shape[-1]]
        start += s.shape[-1]
        spec = "bkgts,ksd->bkgtd" if v.ndim == 3 else "bkgts,bksd->bkgtd"
        out = out + _cached_product(spec, p, v)
    return out


def _cached_product(spec: str, a: jax.Array, cached: jax.Array) -> jax.Array:
    """A product with a block of keys or values summed in float32. A per-row block is read in its own
    dtype, `a` rounded to it: widening a bf16 cache made XLA convert all of it every decode step. A
    shared prefix block ([kv_heads, slots, head_dim]) is widened: XLA:CPU has no bf16 kernel for that
    product's shape."""
    if cached.ndim == 3:
        return jnp.einsum(spec, a, cached.astype(jnp.float32))
    return jnp.einsum(spec, a.astype(cached.dtype), cached, preferred_element_type=jnp.float32)


def _attend_fused(q, blocks, rule: ScoreRule):
    """`_attend` through `jax.nn.dot_product_attention`, which uses a fused kernel where the platform
    has one (cuDNN flash attention for 16-bit inputs on GPUs) and XLA's otherwise. Shared prefix blocks
    are broadcast over the rows (the kernel takes one key sequence per row); masks are the same. It has
    no soft cap: models with one (Gemma 2) attend through `_attend`."""
    b, kvh, group, t, hd = q.shape
    keys, values, masks = [], [], []
    for k, v, mask in blocks:
        if k.ndim == 3:
            k, v = (jnp.broadcast_to(x, (b,) + x.shape) for x in (k, v))
        keys.append(k.transpose(0, 2, 1, 3).astype(q.dtype))  # [b, slots, kv_heads, hd]
        values.append(v.transpose(0, 2, 1, 3).astype(q.dtype))
        masks.append(jnp.broadcast_to(mask[:, :, 0], (b, 1, t, k.shape[2])))
    # Query head n = kv_head * group + g uses kv head n // group: the grouping the kernel expects.
    query = q.transpose(0, 3, 1, 2, 4).reshape(b, t, kvh * group, hd)
    args = (query, jnp.concatenate(keys, axis=1), jnp.concatenate(values, axis=1))
    mask = jnp.concatenate(masks, axis=-1)
    out = None
    if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
        try:  # cuDNN's kernel turns the mask into a bias; it refuses shapes it lacks (said at trace time)
            out = jax.nn.dot_product_attention(*args, mask=mask, scale=rule.scale, implementation="cudnn")
        except (ValueError, NotImplementedError, RuntimeError):
            out = None
    if out is None:  # XLA's implementation: the same arithmetic as `_attend`, in the input dtype
        out = jax.nn.dot_product_attention(*args, mask=mask, scale=rule.scale)
    return out.reshape(b, t, kvh, group, hd).transpose(0, 2, 3, 1, 4)


# A prefill score tile past this many elements per batch shard is attended a row at a time, as it
# outgrows the caches; training tiles stay whole, where the map's backward pass cost more than it saved.
ROW_TILE_ELEMENTS = 1 << 22


def _attend_causal(q, k, v, mask, prefix_blocks, rule: ScoreRule, batch_shards: int | None = None):
    """Attention of new tokens to themselves (slot order is time order) and to shared prefix blocks,
    in query chunks that skip the keys after each chunk's end. `batch_shards`: how many pieces the
    mesh splits the batch axis into, so that a row-by-row pass stays on each shard's own rows; None
    (not said) keeps the rows in one tile."""
    b, kvh, group, t, _ = q.shape
    if batch_shards and b % batch_shards == 0 and b > batch_shards:
        keys = t + sum(pk.shape[-2] for pk, _, _ in prefix_blocks)
        if b // batch_shards * kvh * group * min(ATTENTION_CHUNK, t) * keys > ROW_TILE_ELEMENTS:
            return _attend_by_row(q, k, v, mask, prefix_blocks, rule, batch_shards)
    return _attend_chunks(q, k, v, mask, prefix_blocks, rule, ATTENTION_CHUNK * (2 if prefix_blocks else 1))


def _attend_chunks(q, k, v, mask, prefix_blocks, rule: ScoreRule, chunk: int):
    outs = []
    for a in range(0, q.shape[3], chunk):
        end = min(a + chunk, q.shape[3])
        blocks = [(pk, pv, pm[..., a:end, :]) for pk, pv, pm in prefix_blocks]
        blocks.append((k[:, :, :end], v[:, :, :end], mask[..., a:end, :end]))
        outs.append(_attend(q[:, :, :, a:end], blocks, rule))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)


def _attend_by_row(q, k, v, mask, prefix_blocks, rule: ScoreRule, shards: int):
    """`_attend_chunks` one row of each batch shard at a time. The batch axis [b] is viewed as
    [shards, b / shards] and the map runs over the second, so each step takes the same local row from
    every shard: mapping over the sharded axis itself would gather the whole batch on every device."""
    b = q.shape[0]

    def split(x):  # [b, ...] -> [b / shards, shards, ...]
        return jnp.swapaxes(x.reshape((shards, b // shards) + x.shape[1:]), 0, 1)

    shared = [(pk, pv) for pk, pv, _ in prefix_blocks]
    per_row = (q, k, v, mask, tuple(pm for _, _, pm in prefix_blocks))

    def step(rows):
        q, k, v, mask, prefix_masks = rows
        blocks = [(pk, pv, pm) for (pk, pv), pm in zip(shared, prefix_masks)]
        # One row's tiles are small, and shorter query chunks skip more keys above the diagonal:
        # behind a 1,024-token prefix 64 took 79 ms a layer, 128 took 93 and 256, 131.
        return _attend_chunks(q, k, v, mask, blocks, rule, ATTENTION_CHUNK // 2)

    out = jax.lax.map(step, jax.tree.map(split, per_row))
    return jnp.swapaxes(out, 0, 1).reshape((b,) + out.shape[2:])


def _layer(cfg: ModelConfig, rotary, batch_shards: int | None, x, positions, lp, mask, cache_kv, prefix_kv, fresh,
           last_row=False):
    """One decoder block; returns the new residual stream and this layer's keys and values (the
    cache with the new tokens written in, or the new tokens' own when there is no cache).

    `prefix_kv` is (k, v, mask) of a shared prefix, or None. `fresh`: the cache held nothing before
    these tokens, so they attend to themselves (and the prefix) only, in causal chunks. `last_row`: only
    the last token's output is wanted (the last layer under `forward(last_only=True)`): every token's
    keys and values are still made, but only the last token queries them and goes through the MLP.
    """
    b, t, _ = x.shape
    tq = 1 if last_row else t  # the tokens whose outputs are computed
    dtype = x.dtype
    mm = projection(cfg, dtype)
    h = _norm(cfg, x, lp["attn_norm"])
    q = mm(h[:, t - tq:], lp["wq"])
    k = mm(h, lp["wk"])
    v = mm(h, lp["wv"])
    if cfg.qkv_bias:
        q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
    q = q.reshape(b, tq, cfg.num_heads, cfg.head_dim)
    k = k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
        q = _norm(cfg, q, lp["q_norm"])
        k = _norm(cfg, k, lp["k_norm"])
    q = apply_rope(q, positions[:, t - tq:], rotary)
    k = apply_rope(k, positions, rotary)
    group = cfg.num_heads // cfg.num_kv_heads
    # [b, t, kv*group, hd] -> [b, kv, group, t, hd]: the query rows of one KV head side by side.
    q = q.reshape(b, tq, cfg.num_kv_heads, group, cfg.head_dim).transpose(0, 2, 3, 1, 4)
    k = k.transpose(0, 2, 1, 3)
    v = v.transpose(0, 2, 1, 3)
    prefix_blocks = [prefix_kv] if prefix_kv is not None else []
    if last_row:
        mask = mask[..., -1:, :]
        prefix_blocks = [(pk, pv, pm[..., -1:, :]) for pk, pv, pm in prefix_blocks]
    fused = cfg.attention == "fused" and cfg.attn_softcap is None
    rule = ScoreRule.of(cfg)
    if cache_kv is None or fresh:
        if fused or last_row:
            attn = (_attend_fused if fused else _attend)(q, prefix_blocks + [(k, v, mask)], rule)
        else:
            attn = _attend_causal(q, k, v, mask, prefix_blocks, rule, batch_shards)
    if cache_kv is not None:
        ck, cv, index = cache_kv
        k, v = _written(ck, k, index), _written(cv, v, index)
        if not fresh:
            attn = (_attend_fused if fused else _attend)(q, prefix_blocks + [(k, v, mask)], rule)
    attn = attn.transpose(0, 3, 1, 2, 4).reshape(b, tq, cfg.num_heads * cfg.head_dim)
    out = mm(attn.astype(dtype), lp["wo"])
    if cfg.out_bias:
        out = out + lp["bo"]
    x = x[:, t - tq:] + (_norm(cfg, out, lp["post_attn_norm"]) if cfg.post_norms else out)
    h = _norm(cfg, x, lp["mlp_norm"])
    gate = _ACTIVATIONS[cfg.activation](mm(h, lp["w_gate"]))
    out = mm(gate * mm(h, lp["w_up"]), lp["w_down"])
    x = x + (_norm(cfg, out, lp["post_mlp_norm"]) if cfg.post_norms else out)
    return x, k, v


def _written(cache: jax.Array, new: jax.Array, index) -> jax.Array:
    """`new` written into a layer's cache at slot `index`. A bf16 cache is written through its 16-bit
    pattern: XLA:CPU widens a bf16 update-slice to float32, which rewrites the whole cache every step."""
    new = new.astype(cache.dtype)
    if cache.dtype != jnp.bfloat16:
        return jax.lax.dynamic_update_slice(cache, new, (0, 0, index, 0))
    bits = jax.lax.dynamic_update_slice(jax.lax.bitcast_convert_type(cache, jnp.uint16),
                                        jax.lax.bitcast_convert_type(new, jnp.uint16), (0, 0, index, 0))
    return jax.lax.bitcast_convert_type(bits, jnp.bfloat16)


def forward(
    params: Params,
    tokens: jax.Array,
    positions: jax.Array,
    cache: KVCache | None = None,
    *,
    cfg: ModelConfig,
    dtype=None,
    last_only: bool = False,
    fresh_cache: bool = False,
    remat: bool = False,
    segments: jax.Array | None = None,
    logits_from: int = 0,
    logits_to: int | None = None,
    batch_shards: int | None = None,
    embed_noise: jax.Array | None = None,
) -> tuple[jax.Array, KVCache | None]:
    """Logits [batch, time, vocab] (float32) for `tokens`, and the cache with them written in.

    tokens, positions: [batch, time] int32; a negative position marks padding. With a cache, the new
    tokens go to slots [cache.index, cache.index + time) and attend to everything cached before them.

    `last_only` computes logits for the last column only ([batch, 1, vocab]): a prefill needs no
    more, and the vocabulary projection of every prompt token would cost more than a layer.
    `logits_from` computes them for columns from that one on ([batch, time - logits_from, vocab]): RL
    scores completions only.
    `logits_to` (exclusive, may be negative) ends those columns: a loss has no target for the last.
    `fresh_cache` promises that the cache holds nothing yet (apart from a shared prefix), which lets a
    prefill attend causally in chunks instead of to every slot.
    `remat` recomputes each layer in the backward pass instead of keeping its activations (training).
    `dtype`: the compute dtype; None computes in the parameters' own (bfloat16 weights run in bfloat16).
    `segments` ([batch, time] int32, without a cache): rows packed with several sequences, each
    numbered and with positions counted from 0; a token sees only its own sequence.
    `batch_shards`: the pieces the mesh splits the batch into (data x fsdp). Given, a large prefill
    attends one row of each at a time (it must know them to stay on each device's own rows); None
    keeps the rows together, as training does (see ROW_TILE_ELEMENTS).
    `embed_noise` ([batch, time, hidden]) is added to the looked-up embeddings, before any scaling
    (NEFTune, in SFT's training steps only).
    """
    chex.assert_rank([tokens, positions], 2)
    chex.assert_equal_shape([tokens, positions])
    if is_stacked(params) != cfg.scan_layers:
        raise ValueError(f"forward: cfg.scan_layers is {cfg.scan_layers} but the layers are "
                         f"{'stacked' if is_stacked(params) else 'one dict each'} (see stack_layers)")
    dtype = dtype or params["embed"].dtype
    x = params["embed"][tokens].astype(dtype)
    if embed_noise is not None:
        x = x + embed_noise.astype(dtype)
    if cfg.embed_scale:  # the scale in the compute dtype, as Gemma's reference rounds it
        x = x * jnp.asarray(np.sqrt(cfg.hidden_size), dtype)
    key_positions = positions
    if cache is not None:
        key_positions = jax.lax.dynamic_update_slice(cache.positions, positions.astype(jnp.int32), (0, cache.index))
    windows = {cfg.layer_window(i) for i in range(cfg.num_layers)}
    # [b, t, s] -> [b, 1, 1, t, s], broadcasting over KV heads and the query group; one per window.
    visible = lambda keys: {w: attention_mask(positions, keys, w)[:, None, None] for w in windows}  # noqa: E731
    masks = visible(positions if cache is None or fresh_cache else key_positions)
    if segments is not None:
        if cache is not None:
            raise ValueError("forward: packed segments are for passes without a cache")
        chex.assert_equal_shape([tokens, segments])
        same = (segments[:, :, None] == segments[:, None, :])[:, None, None]
        masks = {w: m & same for w, m in masks.items()}
    shared = cache is not None and cache.prefix_k is not None
    if shared:
        prefix_masks = visible(jnp.broadcast_to(cache.prefix_positions,
                                                (tokens.shape[0],) + cache.prefix_positions.shape))

    if is_stacked(params):
        x, new_k, new_v = _scan_layers(cfg, params["layers"], x, positions, masks, cache,
                                       prefix_masks if shared else None, fresh_cache, remat, batch_shards)
        if last_only:
            x = x[:, -1:]
        new_cache = None if cache is None else cache._replace(
            k=new_k, v=new_v, positions=key_positions, index=cache.index + tokens.shape[1])
        return _logits(cfg, params, x, last_only, logits_from, logits_to), new_cache

    layers = {}  # one function per RoPE (Gemma 3's sliding layers have their own)
    for rope in {cfg.layer_rope(i) for i in range(cfg.num_layers)}:
        rotary = rope_tables(rope_inv_freq(rope, cfg.head_dim), cfg.max_position)
        layers[rope] = functools.partial(_layer, cfg, rotary, batch_shards)
        if remat:
            layers[rope] = jax.checkpoint(layers[rope], static_argnums=(6, 7))  # `fresh`, `last_row`: Python bools
    new_k, new_v = [], []
    for i, lp in enumerate(params["layers"]):
        window = cfg.layer_window(i)
        cache_kv = None if cache is None else (cache.k[i], cache.v[i], cache.index)
        prefix_kv = (cache.prefix_k[i], cache.prefix_v[i], prefix_masks[window]) if shared else None
        last_row = last_only and i == cfg.num_layers - 1
        x, k, v = layers[cfg.layer_rope(i)](x, positions, lp, masks[window], cache_kv, prefix_kv, fresh_cache, last_row)
        new_k.append(k)
        new_v.append(v)
    new_cache = None if cache is None else cache._replace(
        k=tuple(new_k), v=tuple(new_v), positions=key_positions, index=cache.index + tokens.shape[1])
    return _logits(cfg, params, x, last_only, logits_from, logits_to), new_cache


def _scan_layers(cfg: ModelConfig, stacked, x, positions, masks, cache, prefix_masks, fresh, remat, batch_shards):
    """The decoder's layers as one `lax.scan` over stacked weights (and stacked caches); a layer's
    window and RoPE are picked by index from the distinct ones, so one body serves every layer."""
    windows = sorted({cfg.layer_window(i) for i in range(cfg.num_layers)}, key=lambda w: -1 if w is None else w)
    ropes = sorted({cfg.layer_rope(i) for i in range(cfg.num_layers)}, key=repr)
    tables = [rope_tables(rope_inv_freq(r, cfg.head_dim), cfg.max_position) for r in ropes]
    stacked_tables = tuple(jnp.stack([jnp.asarray(t[j]) for t in tables]) for j in range(4))
    window_of = jnp.asarray([windows.index(cfg.layer_window(i)) for i in range(cfg.num_layers)], jnp.int32)
    rope_of = jnp.asarray([ropes.index(cfg.layer_rope(i)) for i in range(cfg.num_layers)], jnp.int32)
    stack = lambda table: None if table is None else jnp.stack([table[w] for w in windows])  # noqa: E731
    mask_stack, prefix_mask_stack = stack(masks), stack(prefix_masks)

    def body(x, layer):
        lp, window_i, rope_i, ck, cv, pk, pv = layer
        rotary = tables[0] if len(ropes) == 1 else tuple(t[rope_i] for t in stacked_tables)
        pick = lambda table: table[0] if len(windows) == 1 else table[window_i]  # noqa: E731
        cache_kv = None if cache is None else (ck, cv, cache.index)
        prefix_kv = None if prefix_masks is None else (pk, pv, pick(prefix_mask_stack))
        x, k, v = _layer(cfg, rotary, batch_shards, x, positions, lp, pick(mask_stack), cache_kv, prefix_kv, fresh)
        return x, (None if cache is None else (k, v))

    if remat:
        body = jax.checkpoint(body)
    kv = (None, None) if cache is None else (cache.k, cache.v)
    prefix = (None, None) if prefix_masks is None else (cache.prefix_k, cache.prefix_v)
    x, kv = jax.lax.scan(body, x, (stacked, window_of, rope_of, *kv, *prefix))
    return (x, None, None) if cache is None else (x, *kv)


def _logits(cfg: ModelConfig, params: Params, x, last_only: bool, logits_from: int, logits_to: int | None):
    if not last_only and (logits_from or logits_to is not None):  # (last_only: x is the last token's already)
        x = x[:, logits_from:logits_to]
    x = _norm(cfg, x, params["final_norm"])
    if _sums_in_float32(cfg, x.dtype):
        logits = (linear_bf16_t(x, params["embed"]) if cfg.tie_embeddings
                  else linear_bf16(x, params["lm_head"]))
    else:
        head = params["embed"].T if cfg.tie_embeddings else params["lm_head"]
        logits = x @ head.astype(x.dtype)
    return softcap(logits.astype(jnp.float32), cfg.final_softcap)


def token_logprobs(params, tokens, positions, *, cfg: ModelConfig, compute_dtype=jnp.float32, remat=False,
                   temperature: float = 1.0, segments=None, targets_from: int = 1, with_entropy: bool = False,
                   embed_noise=None):
    """log p(tokens[:, t] | tokens[:, :t]) for every t from `targets_from` on: [batch, time - targets_from],
    float32, under the distribution with the logits divided by `temperature` (RL scores what the sampler
    drew from). Only the columns that predict those targets are projected onto the vocabulary.

    Master weights stay float32; with a lower compute dtype they are cast inside the step, so their
    gradients come back in float32. `segments`: rows packed with several sequences (see `forward`).
    `with_entropy`: also each column's entropy of that distribution, as a metric (no gradient).
    `embed_noise`: added to the input embeddings (NEFTune; see `neftune_noise`)."""
    if compute_dtype != jnp.float32:
        params = jax.tree.map(lambda p: p.astype(compute_dtype), params)
    logits, _ = forward(params, tokens, positions, cfg=cfg, dtype=compute_dtype, remat=remat, segments=segments,
                        logits_from=targets_from - 1, logits_to=-1, embed_noise=embed_noise)
    if temperature != 1.0:
        logits = logits / temperature
    targets = tokens[:, targets_from:]
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    log_norm = jax.nn.logsumexp(logits, axis=-1)
    if not with_entropy:
        return picked - log_norm
    fixed, fixed_norm = jax.lax.stop_gradient(logits), jax.lax.stop_gradient(log_norm)
    entropy = fixed_norm - (jnp.exp(fixed - fixed_norm[..., None]) * fixed).sum(axis=-1)
    return picked - log_norm, entropy


def prefill_prefix(params: Params, tokens: jax.Array, positions: jax.Array, *, cfg: ModelConfig):
    """(k, v, positions) of one shared prefix [1, length], to pass to `KVCache.empty(prefix=...)`."""
    empty = KVCache.empty(cfg, 1, tokens.shape[1], dtype=params["embed"].dtype)
    _, cache = forward(params, tokens, positions, empty, cfg=cfg, last_only=True, fresh_cache=True)
    if is_stacked(params):
        return cache.k[:, 0], cache.v[:, 0], cache.positions[0]
    return tuple(k[0] for k in cache.k), tuple(v[0] for v in cache.v), cache.positions[0]


def param_shapes(cfg: ModelConfig) -> Params:
    """The parameter tree's shapes: the single description of what a model holds."""
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    qd, kvd = cfg.num_heads * hd, cfg.num_kv_heads * hd
    layer = {
        "attn_norm": (d,),
        "wq": (d, qd),
        "wk": (d, kvd),
        "wv": (d, kvd),
        "wo": (qd, d),
        "mlp_norm": (d,),
        "w_gate": (d, f),
        "w_up": (d, f),
        "w_down": (f, d),
    }
    if cfg.qkv_bias:
        layer.update(bq=(qd,), bk=(kvd,), bv=(kvd,))
    if cfg.out_bias:
        layer.update(bo=(d,))
    if cfg.qk_norm:
        layer.update(q_norm=(hd,), k_norm=(hd,))
    if cfg.post_norms:
        layer.update(post_attn_norm=(d,), post_mlp_norm=(d,))
    layers = [dict(layer) for _ in range(cfg.num_layers)]
    shapes = {"embed": (cfg.vocab_size, d), "final_norm": (d,), "layers": layers}
    if not cfg.tie_embeddings:
        shapes["lm_head"] = (d, cfg.vocab_size)
    return shapes


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> Params:
    """Random parameters (norms the identity, the rest normal): for benchmarks and tests."""
    is_shape = lambda s: isinstance(s, tuple)  # noqa: E731
    shapes = param_shapes(cfg)
    keys = iter(jax.random.split(key, len(jax.tree.leaves(shapes, is_leaf=is_shape))))

    def init(path, shape):
        if "norm" in jax.tree_util.keystr(path):
            return (jnp.zeros if cfg.norm_offset else jnp.ones)(shape, dtype)
        return (std * jax.random.normal(next(keys), shape)).astype(dtype)

    params = jax.tree_util.tree_map_with_path(init, shapes, is_leaf=is_shape)
    return stack_layers(params) if cfg.scan_layers else params
