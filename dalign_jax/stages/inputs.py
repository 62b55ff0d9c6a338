"""What a stage opens from its config: the mesh, the models and the prompt sets."""
from __future__ import annotations

from dalign_jax.config import Config, MeshConfig
from dalign_jax.errors import UserError


def open_model(config: Config, name: str):
    """`load_model(name)` computing as `config.models` says (attention, matmul operands, scanned layers)."""
    from dalign_jax.model.loader import load_model

    m = config.models
    return load_model(name, m.attention, m.matmul_dtype, need_tokenizer=True, scan_layers=m.scan_layers)



def open_mesh(config: Config, stage: str):
    """The processes joined and the mesh made; then, before the stage reads any weight, its memory
    plan checked against the devices (accelerators only: `plan.check_stage_fits`)."""
    from dalign_jax.parallel import distributed
    from dalign_jax.plan import check_stage_fits

    d = config.distributed
    distributed.initialize(d.enabled, d.coordinator, d.num_processes, d.process_id)
    mesh = mesh_from(config.mesh, "mesh")
    check_stage_fits(config, stage)
    return mesh



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


def check_registered(config: Config) -> None:
    """The names in the rl section registered (by us or by a plugin the config imported): checked when
    the RL stage or the whole run starts, so that the config needs nothing of rl/."""
    from dalign_jax.rl.advantages import ADVANTAGES
    from dalign_jax.rl.losses import AGGREGATIONS
    from dalign_jax.rl.rewards import REWARDS

    for key, names, table in (("rl.advantage", [config.rl.advantage], ADVANTAGES),
                              ("rl.aggregation", [config.rl.aggregation], AGGREGATIONS),
                              ("rl.rewards", list(config.rl.rewards), REWARDS)):
        unknown = [n for n in names if n not in table]
        if unknown:
            raise UserError(f"config key {key}: {', '.join(map(repr, unknown))} is not registered "
                            f"(registered: {', '.join(sorted(table))}; a module named in `plugins` can add one "
                            "with @register)")
