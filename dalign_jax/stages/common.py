"""What every stage shares: atomic files, record shards, the run header that guards resume, and
opening the spec, mesh and models a config names."""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Iterable

from dalign_jax.config import Config, MeshConfig
from dalign_jax.errors import UserError
from dalign_jax.userfiles import creation_mode


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write beside `path`, flush to disk, then rename: readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, creation_mode())
        os.replace(tmp, path)
    except OSError as e:  # disk full, quota, permissions: say which file, leave no partial one
        Path(tmp).unlink(missing_ok=True)
        raise UserError(f"{path}: cannot write ({e.strerror or e})") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def jsonl_text(records: Iterable[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def write_records(stem: Path, records: list[dict]) -> None:
    """A shard as `stem.array_record` (for grain) and `stem.jsonl` (for people). The JSONL is written
    last, so its presence means the shard is complete."""
    from array_record.python.array_record_module import ArrayRecordWriter

    stem.parent.mkdir(parents=True, exist_ok=True)
    final = stem.with_suffix(".array_record")
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=stem.parent)
    os.close(fd)
    try:
        writer = ArrayRecordWriter(tmp, "group_size:1")
        for r in records:
            writer.write(json.dumps(r, ensure_ascii=False).encode("utf-8"))
        writer.close()
        os.chmod(tmp, creation_mode())
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    write_atomic(stem.with_suffix(".jsonl"), jsonl_text(records))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def check_run_header(stage_dir: Path, header: dict, force: bool = False) -> None:
    """Record what a stage's outputs depend on; refuse to resume into outputs made from other inputs."""
    path = stage_dir / "run.json"
    if path.is_file() and not force:
        old = json.loads(path.read_text())
        changed = sorted(k for k in set(old) | set(header) if old.get(k) != header.get(k))
        if changed:
            raise UserError(
                f"{stage_dir}: existing outputs were made with different {', '.join(changed)}; "
                "use a new run_dir, delete the stage directory, or pass --force to start it over"
            )
        return
    if path.is_file() and force:
        import shutil

        for f in stage_dir.iterdir():
            if f.is_dir():
                shutil.rmtree(f)
            else:
                f.unlink()
    write_atomic(path, json.dumps(header, indent=2, sort_keys=True) + "\n")


def section(config: Config, name: str) -> dict:
    return dataclasses.asdict(getattr(config, name))


def open_model(config: Config, name: str):
    """`load_model(name)` computing as `config.models` says (attention, matmul operands)."""
    from dalign_jax.model.loader import load_model

    return load_model(name, config.models.attention, config.models.matmul_dtype, need_tokenizer=True)


def open_mesh(config: Config):
    from dalign_jax.parallel import distributed

    d = config.distributed
    distributed.initialize(d.enabled, d.coordinator, d.num_processes, d.process_id)
    return mesh_from(config.mesh, "mesh")


def mesh_from(shape: MeshConfig, key: str):
    """The mesh a config section describes (`key` names the section in errors)."""
    import jax

    from dalign_jax.parallel.mesh import make_mesh

    devices = jax.devices()
    if shape.devices:
        if jax.process_count() > 1:
            raise UserError(f"{key}.devices: must be 0 (every device) on multi-host")
        if shape.devices > len(devices):
            raise UserError(f"{key}.devices: {shape.devices} requested, but there are {len(devices)} devices")
        devices = devices[:shape.devices]
    try:
        return make_mesh(shape.data, shape.fsdp, shape.tensor, devices=devices)
    except UserError as e:  # make_mesh's message starts "mesh:"
        raise UserError(str(e).replace("mesh:", f"{key}:", 1)) from None


def _per_category(prompts: list, n: int) -> list:
    """At most n prompts of each category, its expected modes taken in turn, in the file's order."""
    from dalign_jax.data.prompts import mixed

    taken: dict[str, int] = {}
    kept = set()
    for p in mixed(prompts):  # every expected mode of a category, not only its first
        taken[p.category] = taken.get(p.category, 0) + 1
        if taken[p.category] <= n:
            kept.add(id(p))
    return [p for p in prompts if id(p) in kept]


def open_prompts(config: Config, spec) -> list:
    """The training prompts: `prompts.path`'s split, then every set in `prompts.extra` whole."""
    from dalign_jax.data.prompts import load_prompt_set, split

    prompts = split(load_prompt_set(config.prompts.path, spec.categories), config.prompts.split)
    if config.prompts.per_category:
        prompts = _per_category(prompts, config.prompts.per_category)
    if config.prompts.limit:
        prompts = prompts[:config.prompts.limit]
    if not prompts:
        raise UserError(f"{config.prompts.path}: no prompts in split {config.prompts.split!r}")
    seen = {p.id: config.prompts.path for p in prompts}
    for path in config.prompts.extra:
        extra = load_prompt_set(path, spec.categories)
        if config.prompts.extra_per_category:
            extra = _per_category(extra, config.prompts.extra_per_category)
        for p in extra:
            if p.id in seen:
                raise UserError(f"{path}: prompt id {p.id!r} is also in {seen[p.id]}")
            seen[p.id] = path
        prompts = prompts + extra
    return prompts


def export_trained(directory: Path, model, params) -> str | None:
    """Write trained parameters as a HF directory. Every process must call this: gathering the
    parameters is a collective on multi-host. Process 0 writes; it alone returns the path."""
    import jax

    from dalign_jax.model.hf_io import export_hf
    from dalign_jax.train.step import host_params

    gathered = host_params(params)
    if jax.process_index() != 0:
        return None
    return str(export_hf(directory, model.hf_config, model.cfg, gathered, model.tokenizer,
                         generation=model.generation))


def ensure_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{directory}: cannot create output directory ({e.strerror})") from None
    if not os.access(directory, os.W_OK):
        raise UserError(f"{directory}: output directory is not writable")
