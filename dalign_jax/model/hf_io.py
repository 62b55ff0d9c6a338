"""Hugging Face directories: read (config, safetensors, tokenizer) and write (export).

Only safetensors weights are read; a directory that holds only pickle checkpoints (`*.bin`, `*.pt`)
is refused before anything in it is opened.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import transformers
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from dalign_jax.errors import UserError
from dalign_jax.userfiles import creation_mode
from dalign_jax.model.config import SUPPORTED_FAMILIES, ModelConfig, from_hf_config
from dalign_jax.model.families import hf_to_params, params_to_hf

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: line {e.lineno}: invalid JSON: {e.msg}") from None


def read_hf_config(directory: Path) -> transformers.PretrainedConfig:
    path = directory / "config.json"
    if not path.is_file():
        raise UserError(f"{directory}: no config.json (expected a Hugging Face model directory)")
    raw = _read_json(path)
    model_type = raw.get("model_type")
    try:
        config_cls = transformers.AutoConfig.for_model(model_type).__class__
    except (ValueError, KeyError):
        raise UserError(f"{path}: field model_type: unknown model type {model_type!r}") from None
    try:
        return config_cls.from_dict(raw)
    except Exception as e:  # transformers' field validation raises its own types as well as ValueError
        raise UserError(f"{path}: {' '.join(str(e).split())[:300]}") from None


def read_generation_config(directory: Path) -> transformers.GenerationConfig | None:
    """The directory's generation_config.json, None where it has none."""
    path = directory / "generation_config.json"
    if not path.is_file():
        return None
    try:
        return transformers.GenerationConfig.from_dict(_read_json(path))
    except ValueError as e:  # a value transformers' validation refuses
        raise UserError(f"{path}: {e}") from None


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise UserError(f"{index}: not a valid safetensors index ({e})") from None
        files = sorted({directory / f for f in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise UserError(f"{index}: names {f.name}, which does not exist")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise UserError(
                f"{directory}: only pickle checkpoints ({', '.join(pickles)}); they are never loaded. "
                "Convert them to safetensors first."
            )
        raise UserError(f"{directory}: no *.safetensors weights")
    return files


def read_safetensors(files: list[Path]) -> tuple[dict, set[str]]:
    """Open every file, returning a lazy getter per tensor name and the set of names."""
    handles, owner = {}, {}
    for f in files:
        try:
            handle = safe_open(str(f), framework="numpy")
            handles[f] = handle
            for name in handle.keys():
                owner[name] = handle
        except (SafetensorError, OSError) as e:
            raise UserError(f"{f}: unreadable safetensors file ({e})") from None

    def get(name: str) -> np.ndarray:
        try:
            return owner[name].get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise UserError(f"tensor {name}: unreadable ({e})") from None

    return get, set(owner)


def load_hf_dir(directory: str | os.PathLike):
    """(hf_config, ModelConfig, numpy params, tokenizer) from a local HF model directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory}: model directory does not exist")
    hf_config = read_hf_config(directory)
    cfg = from_hf_config(hf_config, source=str(directory / "config.json"))
    get, names = read_safetensors(_safetensors_files(directory))
    params = hf_to_params(get, names, cfg, source=str(directory))
    tokenizer = None
    if (directory / "tokenizer.json").is_file() or (directory / "tokenizer_config.json").is_file():
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)
        if len(tokenizer) > cfg.vocab_size:
            raise UserError(
                f"{directory}: tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {cfg.vocab_size}"
            )
    return hf_config, cfg, params, tokenizer


def _shards(tensors: dict[str, np.ndarray], max_shard_bytes: int) -> list[dict[str, np.ndarray]]:
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        if current and size + t.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += t.nbytes
    shards.append(current)
    return shards


# Written into every export with the list of files it wrote: a later export replaces a directory only
# when it holds this file and nothing that the file does not list.
EXPORT_MARKER = ".dalign-export.json"


def _check_replaceable(out_dir: Path) -> None:
    """Refuse an output path that is a file, or a directory holding anything an export of ours did not write."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a directory; choose a new or empty directory for the export")
    entries = sorted(e.name for e in out_dir.iterdir())
    if not entries:
        return
    listed: set[str] = set()
    try:
        listed = set(json.loads((out_dir / EXPORT_MARKER).read_text()).get("files", [])) | {EXPORT_MARKER}
    except (OSError, ValueError, AttributeError):  # no marker, or not one of ours
        pass
    present = sorted(str(f.relative_to(out_dir)) for f in out_dir.rglob("*") if not f.is_dir())
    foreign = [f for f in present if f not in listed] if listed else present or entries
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise UserError(f"{out_dir}: holds files an earlier export did not write ({shown}); nothing was "
                        "changed: choose a new or empty directory")


def export_hf(
    out_dir: str | os.PathLike,
    hf_config: transformers.PretrainedConfig,
    cfg: ModelConfig,
    params,
    tokenizer,
    max_shard_bytes: int = 2 * 1024**3,
    generation: transformers.GenerationConfig | None = None,
) -> Path:
    """Write a directory transformers loads: config, generation config, safetensors, tokenizer.

    `generation`: the source model's generation config, kept as it was; None writes one with the
    model config's special tokens.

    The directory appears under its final name only when complete (written beside it, then renamed).
    It may replace an empty directory or an earlier export (see `_check_replaceable`), nothing else.
    """
    out_dir = Path(out_dir).resolve()
    _check_replaceable(out_dir)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out_dir.parent}: cannot create the output directory ({e.strerror})") from None
    if not os.access(out_dir.parent, os.W_OK):
        raise UserError(f"{out_dir.parent}: output directory is not writable")
    tensors = params_to_hf(params, cfg)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    old = None
    try:
        os.chmod(tmp, creation_mode(directory=True))
        hf_config = hf_config.__class__.from_dict(hf_config.to_dict())
        hf_config.architectures = [SUPPORTED_FAMILIES[cfg.family][0]]
        hf_config.tie_word_embeddings = cfg.tie_embeddings
        hf_config.dtype = "float32"
        hf_config.save_pretrained(tmp)
        gen = generation or transformers.GenerationConfig(
            bos_token_id=hf_config.bos_token_id,
            eos_token_id=hf_config.eos_token_id,
            pad_token_id=getattr(hf_config, "pad_token_id", None),
        )
        gen.save_pretrained(tmp)
        shards = _shards(tensors, max_shard_bytes)
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for n, shard in enumerate(shards, 1):
                fname = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                weight_map.update({k: fname for k in shard})
            index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        written = sorted(str(f.relative_to(tmp)) for f in tmp.rglob("*") if not f.is_dir())
        (tmp / EXPORT_MARKER).write_text(json.dumps({"written_by": "dalign export", "files": written}, indent=1))
        if out_dir.exists():  # empty, or an earlier export: set aside, then removed once the new one is in place
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
            os.replace(out_dir, old / "export")
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out_dir.exists():
            os.replace(old / "export", out_dir)
        raise
    finally:
        if old is not None and out_dir.exists():
            shutil.rmtree(old, ignore_errors=True)
    return out_dir
