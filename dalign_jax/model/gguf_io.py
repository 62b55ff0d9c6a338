"""GGUF files (the embedded default model): weights, config and tokenizer, without PyTorch.

Tensors are dequantised with the `gguf` package and renamed to HF names, so the family tables in
`families.py` do the rest. The tokenizer is rebuilt from the file's metadata with `tokenizers`.
"""
from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import transformers
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from dalign_jax.errors import UserError

T = gguf.GGMLQuantizationType
SUPPORTED_QUANTS = {
    T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0,
    T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K,
}

# GGUF name -> HF name, for the llama architecture (which llama.cpp also uses for Mistral and SmolLM).
GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}

# llama.cpp's pre-tokenizer names for byte-level BPE, and the splitting each stands for.
PRE_TOKENIZERS = {
    "smollm": lambda: [pre_tokenizers.Digits(individual_digits=True)],
    "gpt2": lambda: [],
    "default": lambda: [],
}
CONTROL_TOKEN = 3  # llama.cpp token type of control tokens (<|im_start|> and the like)


def _field(reader: gguf.GGUFReader, key: str, default=None, *, path: Path):
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise UserError(f"{path}: GGUF metadata field {key} is missing")
        return default
    return field.contents()


def _hf_name(gguf_name: str) -> str | None:
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) > 2:
        template = GGUF_TO_HF.get("blk.{i}." + ".".join(parts[2:]))
        return template.format(i=int(parts[1])) if template else None
    return GGUF_TO_HF.get(gguf_name)


def _undo_rope_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp interleaves the rotary halves of Q and K rows per head; HF keeps them split."""
    head_half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, head_half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _round_eps(x: float) -> float:
    # GGUF stores epsilon as float32 (9.9999997e-06); HF configs carry the decimal it came from.
    return float(f"{x:.6g}")


def read_gguf_config(reader: gguf.GGUFReader, path: Path, has_output: bool) -> transformers.LlamaConfig:
    arch = _field(reader, "general.architecture", path=path)
    if arch != "llama":
        raise UserError(f"{path}: GGUF architecture {arch!r} is not supported (supported: llama)")
    a = lambda key, default=None: _field(reader, f"llama.{key}", default, path=path)  # noqa: E731
    heads = int(a("attention.head_count"))
    hidden = int(a("embedding_length"))
    tokens = _field(reader, "tokenizer.ggml.tokens", path=path)
    return transformers.LlamaConfig(
        vocab_size=int(a("vocab_size", len(tokens))),
        hidden_size=hidden,
        intermediate_size=int(a("feed_forward_length")),
        num_hidden_layers=int(a("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(a("attention.head_count_kv", heads)),
        head_dim=int(a("rope.dimension_count", hidden // heads)),
        max_position_embeddings=int(a("context_length")),
        rms_norm_eps=_round_eps(float(a("attention.layer_norm_rms_epsilon"))),
        rope_parameters={"rope_type": "default", "rope_theta": float(a("rope.freq_base", 10000.0))},
        tie_word_embeddings=not has_output,
        bos_token_id=int(_field(reader, "tokenizer.ggml.bos_token_id", path=path)),
        eos_token_id=int(_field(reader, "tokenizer.ggml.eos_token_id", path=path)),
        pad_token_id=int(_field(reader, "tokenizer.ggml.padding_token_id", -1, path=path)) if
        "tokenizer.ggml.padding_token_id" in reader.fields else None,
        architectures=["LlamaForCausalLM"],
    )


def read_gguf_tokenizer(reader: gguf.GGUFReader, path: Path) -> transformers.PreTrainedTokenizerFast:
    kind = _field(reader, "tokenizer.ggml.model", path=path)
    pre = _field(reader, "tokenizer.ggml.pre", "default", path=path)
    if kind != "gpt2" or pre not in PRE_TOKENIZERS:
        raise UserError(f"{path}: GGUF tokenizer {kind}/{pre} is not supported (supported: gpt2 with "
                        f"pre-tokenizer {', '.join(PRE_TOKENIZERS)})")
    tokens = list(_field(reader, "tokenizer.ggml.tokens", path=path))
    types = list(_field(reader, "tokenizer.ggml.token_type", path=path))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", path=path)]
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        PRE_TOKENIZERS[pre]() + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == CONTROL_TOKEN]
    )
    token = lambda key: tokens[int(_field(reader, key, path=path))] if key in reader.fields else None  # noqa: E731
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=token("tokenizer.ggml.bos_token_id"),
        eos_token=token("tokenizer.ggml.eos_token_id"),
        unk_token=token("tokenizer.ggml.unknown_token_id"),
        pad_token=token("tokenizer.ggml.padding_token_id"),
        chat_template=_field(reader, "tokenizer.chat_template", "", path=path) or None,
        clean_up_tokenization_spaces=False,
    )


def load_gguf(path: str | os.PathLike):
    """(hf_config, ModelConfig, numpy params, tokenizer) from a GGUF file."""
    from dalign_jax.model.config import from_hf_config
    from dalign_jax.model.families import hf_to_params

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: GGUF file does not exist")
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError) as e:
        raise UserError(f"{path}: not a readable GGUF file ({e})") from None
    by_hf_name = {}
    for t in reader.tensors:
        name = _hf_name(t.name)
        if name is None:
            raise UserError(f"{path}: tensor {t.name} has no known meaning for the llama architecture")
        if t.tensor_type not in SUPPORTED_QUANTS:
            raise UserError(f"{path}: tensor {t.name} uses quantisation {t.tensor_type.name}, which is not "
                            f"supported (supported: {', '.join(sorted(q.name for q in SUPPORTED_QUANTS))})")
        by_hf_name[name] = t
    hf_config = read_gguf_config(reader, path, has_output="lm_head.weight" in by_hf_name)
    cfg = from_hf_config(hf_config, source=str(path))

    def get(name: str) -> np.ndarray:
        t = by_hf_name[name]
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(int(d) for d in reversed(t.shape)))
        if name.endswith("q_proj.weight"):
            w = _undo_rope_permute(w, cfg.num_heads)
        elif name.endswith("k_proj.weight"):
            w = _undo_rope_permute(w, cfg.num_kv_heads)
        return w.astype(np.float32)

    params = hf_to_params(get, set(by_hf_name), cfg, source=str(path))
    tokenizer = read_gguf_tokenizer(reader, path)
    if len(tokenizer) > cfg.vocab_size:
        raise UserError(f"{path}: tokenizer has {len(tokenizer)} tokens but vocab_size is {cfg.vocab_size}")
    return hf_config, cfg, params, tokenizer
