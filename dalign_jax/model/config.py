"""The architecture of a decoder, read from a transformers configuration.

`ModelConfig` is frozen and hashable so that it can be a static argument of jitted functions. The
transformers `PretrainedConfig` it came from is kept beside it by the loader, for export.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import transformers

from dalign_jax.errors import UserError

# model_type -> (HF causal-LM class, attention q/k/v bias, q/k RMSNorm); None: read `attention_bias`
# from the config. Everything else is read from the config itself.
SUPPORTED_FAMILIES = {
    "llama": ("LlamaForCausalLM", None, False),
    "mistral": ("MistralForCausalLM", False, False),
    "qwen2": ("Qwen2ForCausalLM", True, False),
    "qwen3": ("Qwen3ForCausalLM", None, True),
    "gemma": ("GemmaForCausalLM", None, False),
    "gemma2": ("Gemma2ForCausalLM", None, False),
    "gemma3_text": ("Gemma3ForCausalLM", None, True),
}
GEMMA_FAMILIES = ("gemma", "gemma2", "gemma3_text")
GEMMA2_LAYOUT = ("gemma2", "gemma3_text")  # post-block norms; the activation named hidden_activation

# HF activation name -> ours, for the MLP's gate.
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    theta: float
    # Llama 3 frequency scaling; `factor == 1.0` means plain RoPE.
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position: int
    tie_embeddings: bool
    qkv_bias: bool = False
    out_bias: bool = False  # a bias on the attention's output projection (`attention_bias` but in Qwen2)
    qk_norm: bool = False
    sliding_window: int | None = None
    # Which layers use `sliding_window` (Gemma 2 and 3 alternate); None: every layer.
    sliding_layers: tuple[bool, ...] | None = None
    # Gemma's differences from Llama, all off for the other families:
    norm_offset: bool = False  # RMSNorm weights are stored as w - 1 and applied as 1 + w
    embed_scale: bool = False  # embeddings are multiplied by sqrt(hidden_size)
    activation: str = "silu"  # the MLP gate's: silu, gelu_tanh or gelu
    post_norms: bool = False  # Gemma 2, 3: the attention's and the MLP's outputs are normed too
    query_scale: float | None = None  # attention scores' scale; None: 1 / sqrt(head_dim)
    attn_softcap: float | None = None  # Gemma 2: scores become cap * tanh(score / cap)
    final_softcap: float | None = None  # Gemma 2: the same on the logits
    local_rope: RopeConfig | None = None  # Gemma 3: the sliding layers' own RoPE
    # Not architecture: "einsum" (ours: shared-prefix blocks, chunked prefill) or "fused"
    # (jax.nn.dot_product_attention, cuDNN's flash attention on GPUs); the results agree.
    attention: str = "einsum"
    # Also not architecture: "bfloat16" rounds the projections' and output head's operands to bf16 and
    # sums in float32 (`linear_bf16`); "float32": exact products.
    matmul_dtype: str = "float32"
    # Also not architecture: the layers' weights stacked [num_layers, ...] and run as one `lax.scan`,
    # which compiles one layer whatever the depth (accelerators); unrolled suits a CPU.
    scan_layers: bool = False

    def layer_window(self, i: int) -> int | None:
        """The sliding window of layer `i`, None for full attention."""
        if self.sliding_layers is None or self.sliding_layers[i]:
            return self.sliding_window
        return None

    def layer_rope(self, i: int) -> RopeConfig:
        if self.local_rope is not None and self.layer_window(i) is not None:
            return self.local_rope
        return self.rope

    @property
    def num_params(self) -> int:
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * hd * (2 * self.num_heads + 2 * self.num_kv_heads)
        per_layer = attn + 3 * d * f
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.num_layers * per_layer + embed


def _rope_from_hf(hf: transformers.PretrainedConfig, params: dict[str, Any]) -> RopeConfig:
    """RoPE from one dict of `rope_parameters` (older configs keep the theta beside it)."""
    theta = float(params.get("rope_theta", getattr(hf, "rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return RopeConfig(theta=theta)
    if rope_type == "llama3":
        return RopeConfig(
            theta=theta,
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position=int(params["original_max_position_embeddings"]),
        )
    raise UserError(f"config.json: rope type {rope_type!r} is not supported (supported: default, llama3)")


def from_hf_config(hf: transformers.PretrainedConfig, source: str = "config.json") -> ModelConfig:
    family = getattr(hf, "model_type", None)
    if family not in SUPPORTED_FAMILIES:
        archs = getattr(hf, "architectures", None) or [family]
        raise UserError(
            f"{source}: architecture {', '.join(map(str, archs))} (model_type {family!r}) is not supported; "
            f"supported model types: {', '.join(SUPPORTED_FAMILIES)}"
        )
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings"):
        value = getattr(hf, key, None)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise UserError(f"{source}: field {key}: expected a positive integer, got {value!r}")
    # Read from the key transformers' own model of the family reads: Gemma 2 and 3 name it
    # hidden_activation (some Gemma configs carry both keys, with different values).
    act = getattr(hf, "hidden_activation" if family in GEMMA2_LAYOUT else "hidden_act", None) or "silu"
    if act not in ACTIVATIONS or (act != "silu" and family not in GEMMA_FAMILIES):
        raise UserError(f"{source}: hidden_act {act!r} is not supported for {family} "
                        f"(supported: silu; for Gemma also gelu_pytorch_tanh, gelu)")
    _, bias, qk_norm = SUPPORTED_FAMILIES[family]
    if bias is None:
        bias = bool(getattr(hf, "attention_bias", False))
    if getattr(hf, "mlp_bias", False):
        raise UserError(f"{source}: mlp_bias=true is not supported")
    window = getattr(hf, "sliding_window", None)
    if family in ("qwen2", "qwen3"):
        # Qwen carries a `sliding_window` value but only applies it when `use_sliding_window` says so.
        if getattr(hf, "use_sliding_window", False):
            raise UserError(f"{source}: use_sliding_window=true is not supported for {family}")
        window = None
    heads = hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    layer_types = getattr(hf, "layer_types", None)
    sliding_layers = (tuple(t == "sliding_attention" for t in layer_types)
                      if window and family in GEMMA_FAMILIES and layer_types else None)
    rope_params = dict(getattr(hf, "rope_parameters", None) or {})
    # Gemma 3 has one RoPE per layer type; the others one for every layer.
    rope = _rope_from_hf(hf, rope_params.get("full_attention", rope_params))
    local = rope_params.get("sliding_attention")
    local_rope = _rope_from_hf(hf, local) if local else None
    gemma = family in GEMMA_FAMILIES
    scalar = getattr(hf, "query_pre_attn_scalar", None)
    return ModelConfig(
        family=family,
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        rms_norm_eps=float(hf.rms_norm_eps),
        rope=rope,
        max_position=int(hf.max_position_embeddings),
        tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        qkv_bias=bias,
        # Qwen2 puts biases on q, k and v only; the others' `attention_bias` covers the output too.
        out_bias=bias and family != "qwen2",
        qk_norm=qk_norm,
        sliding_window=int(window) if window else None,
        sliding_layers=sliding_layers,
        norm_offset=gemma,
        embed_scale=gemma,
        activation=ACTIVATIONS[act],
        post_norms=family in GEMMA2_LAYOUT,
        query_scale=float(scalar) ** -0.5 if gemma and scalar else None,
        attn_softcap=_optional_float(getattr(hf, "attn_logit_softcapping", None)),
        final_softcap=_optional_float(getattr(hf, "final_logit_softcapping", None)),
        local_rope=local_rope if local_rope != rope else None,
    )


def _optional_float(value) -> float | None:
    return float(value) if value else None
