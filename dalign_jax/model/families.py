"""How each supported family's Hugging Face tensors map onto our parameter tree, in both directions.

A table row is (HF name, our path, rule). `{i}` in a name is the layer index; those rows map into
`layers[i]`. Rules: "linear" (torch's [out, in] is our [in, out]) and
"same". Rows for parameters a config does not have (biases, q/k norms, an untied head) are skipped.
Adding a family with the same blocks is adding a table.
"""
from __future__ import annotations

from typing import Callable, Mapping

import jax
import numpy as np

from dalign_jax.errors import UserError
from dalign_jax.model.config import ModelConfig
from dalign_jax.model.transformer import param_shapes, unstack_layers

Row = tuple[str, tuple[str, ...], str]

# Llama, Mistral, Qwen2, Qwen3 and Gemma share HF's Llama naming; they differ only in which rows exist.
_LLAMA_NAMES: list[Row] = [
    ("model.embed_tokens.weight", ("embed",), "same"),
    ("model.norm.weight", ("final_norm",), "same"),
    ("lm_head.weight", ("lm_head",), "linear"),
    ("model.layers.{i}.input_layernorm.weight", ("layers", "attn_norm"), "same"),
    ("model.layers.{i}.self_attn.q_proj.weight", ("layers", "wq"), "linear"),
    ("model.layers.{i}.self_attn.k_proj.weight", ("layers", "wk"), "linear"),
    ("model.layers.{i}.self_attn.v_proj.weight", ("layers", "wv"), "linear"),
    ("model.layers.{i}.self_attn.o_proj.weight", ("layers", "wo"), "linear"),
    ("model.layers.{i}.self_attn.q_proj.bias", ("layers", "bq"), "same"),
    ("model.layers.{i}.self_attn.k_proj.bias", ("layers", "bk"), "same"),
    ("model.layers.{i}.self_attn.v_proj.bias", ("layers", "bv"), "same"),
    ("model.layers.{i}.self_attn.o_proj.bias", ("layers", "bo"), "same"),
    ("model.layers.{i}.self_attn.q_norm.weight", ("layers", "q_norm"), "same"),
    ("model.layers.{i}.self_attn.k_norm.weight", ("layers", "k_norm"), "same"),
    ("model.layers.{i}.post_attention_layernorm.weight", ("layers", "mlp_norm"), "same"),
    ("model.layers.{i}.mlp.gate_proj.weight", ("layers", "w_gate"), "linear"),
    ("model.layers.{i}.mlp.up_proj.weight", ("layers", "w_up"), "linear"),
    ("model.layers.{i}.mlp.down_proj.weight", ("layers", "w_down"), "linear"),
]

# Gemma 2 and 3 norm each sub-block's output too, and HF's `post_attention_layernorm` is that norm
# there (in Llama it is the MLP's input norm).
_GEMMA2_NAMES: list[Row] = [row for row in _LLAMA_NAMES if "post_attention_layernorm" not in row[0]] + [
    ("model.layers.{i}.post_attention_layernorm.weight", ("layers", "post_attn_norm"), "same"),
    ("model.layers.{i}.pre_feedforward_layernorm.weight", ("layers", "mlp_norm"), "same"),
    ("model.layers.{i}.post_feedforward_layernorm.weight", ("layers", "post_mlp_norm"), "same"),
]

FAMILY_TABLES: dict[str, list[Row]] = {
    "llama": _LLAMA_NAMES,
    "mistral": _LLAMA_NAMES,
    "qwen2": _LLAMA_NAMES,
    "qwen3": _LLAMA_NAMES,
    "gemma": _LLAMA_NAMES,
    "gemma2": _GEMMA2_NAMES,
    "gemma3_text": _GEMMA2_NAMES,
}


def _to_ours(x: np.ndarray, rule: str) -> np.ndarray:
    return x.T if rule == "linear" else x


_to_hf = _to_ours  # both rules are their own inverse


def _rows(cfg: ModelConfig):
    """(HF name, our path, rule) for every tensor this config has; `{i}` resolved to each layer."""
    shapes = param_shapes(cfg)
    for name, path, rule in FAMILY_TABLES[cfg.family]:
        if path[0] == "layers":
            if path[1] in shapes["layers"][0]:
                for i in range(cfg.num_layers):
                    yield name.format(i=i), ("layers", i, path[1]), rule
        elif path[0] in shapes:
            yield name, path, rule


def _node(tree, path):
    for part in path:
        tree = tree[part]
    return tree


def hf_to_params(get: Callable[[str], np.ndarray], names: set[str], cfg: ModelConfig, source: str) -> dict:
    """Build our parameter tree (numpy) from HF tensors. `get(name)` reads one tensor lazily."""
    shapes = param_shapes(cfg)
    expected = {row[0] for row in _rows(cfg)}
    missing = sorted(expected - names)
    if missing:
        raise UserError(f"{source}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    unexpected = sorted(names - expected - ({"lm_head.weight"} if cfg.tie_embeddings else set()))
    if unexpected:
        raise UserError(f"{source}: unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")

    params = jax.tree.map(lambda s: None, shapes, is_leaf=lambda s: isinstance(s, tuple))
    for name, path, rule in _rows(cfg):
        value = _to_ours(np.asarray(get(name), dtype=np.float32), rule)
        want = _node(shapes, path)
        if value.shape != want:
            hf_shape = lambda s: tuple(s[::-1]) if rule == "linear" else tuple(s)  # noqa: E731
            raise UserError(f"{source}: tensor {name} has shape {hf_shape(value.shape)}, "
                            f"the config needs {hf_shape(want)}")
        _node(params, path[:-1])[path[-1]] = value
    return params


def params_to_hf(params: Mapping, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Our parameter tree as HF-named float32 numpy tensors, ready for safetensors."""
    params = unstack_layers(jax.tree.map(lambda x: np.asarray(x, dtype=np.float32), params))  # one host copy
    out = {}
    for name, path, rule in _rows(cfg):
        out[name] = np.ascontiguousarray(_to_hf(_node(params, path), rule))
    return out
