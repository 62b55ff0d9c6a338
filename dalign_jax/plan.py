"""`dalign plan`: each stage's memory per device and its FLOPs, from the models' config.json (or GGUF
header) and the mesh alone, before any weight is read.

Parameters, gradients and optimiser state are counted exactly, leaf by leaf, as the mesh's layout
rules split them. Activations, caches and logits are estimates of what the compiled steps keep live;
docs/benchmarks.md compares them with XLA's own buffer assignment for an SFT step.
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

from dalign_jax.config import Config, MeshConfig, Train
from dalign_jax.errors import UserError
from dalign_jax.model.config import ModelConfig

GIB = 1024 ** 3
PROMPT_TOKENS = 256  # a question (or a conversation's opening turns) as the plan counts it
SPEC_CHARS_PER_TOKEN = 4  # the spec's length in tokens, estimated without a tokenizer
STAGES = ("distill", "judge", "sft", "rl", "eval")


@dataclasses.dataclass(frozen=True)
class MeshShape:
    """The sizes of the ('data', 'fsdp', 'tensor') axes, without devices (`parallel.mesh` rules take it)."""
    data: int
    fsdp: int
    tensor: int

    @property
    def shape(self) -> dict[str, int]:
        return {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}

    @property
    def devices(self) -> int:
        return self.data * self.fsdp * self.tensor

    @property
    def batch_shards(self) -> int:
        return self.data * self.fsdp

    @classmethod
    def of(cls, section: MeshConfig, devices: int, key: str = "mesh") -> "MeshShape":
        from dalign_jax.parallel.mesh import axis_sizes

        return cls(*axis_sizes(section.data, section.fsdp, section.tensor, devices, f"plan: {key}"))


@dataclasses.dataclass
class StagePlan:
    stage: str
    items: dict[str, float]  # bytes per device
    flops: float = 0.0  # per step (training) or per sampler call, over all devices
    what: str = ""  # the unit of `flops`
    other_remat: float | None = None  # training stages: the total with `remat` the other way

    @property
    def total(self) -> float:
        return sum(self.items.values())

    @property
    def largest(self) -> tuple[str, float]:
        return max(self.items.items(), key=lambda kv: kv[1])


def _param_leaves(cfg: ModelConfig):
    """(path as the mesh rules spell it, shape) of every parameter."""
    from dalign_jax.model.transformer import param_shapes

    shapes = param_shapes(cfg)
    for name in ("embed", "lm_head", "final_norm"):
        if name in shapes:
            yield name, shapes[name]
    for i, layer in enumerate(shapes["layers"]):
        for name, shape in layer.items():
            yield f"layers/{i}/{name}", shape


def _shard_elements(path: str, shape: tuple[int, ...], mesh: MeshShape, over_data: bool = False) -> int:
    """Elements of one parameter a device holds under the mesh's layout rules."""
    from dalign_jax.parallel import mesh as rules

    spec = rules.param_spec(path, shape, mesh)
    if over_data:
        spec = rules.over_data(spec, shape, mesh)
    n = 1
    for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axis,) if isinstance(axis, str) else tuple(axis or ())
        n *= dim // math.prod(mesh.shape[a] for a in names)
    return n


def weight_bytes(cfg: ModelConfig, mesh: MeshShape, bytes_per: int = 4) -> float:
    return bytes_per * sum(_shard_elements(p, s, mesh) for p, s in _param_leaves(cfg))


def _lora_elements(cfg: ModelConfig, train: Train, mesh: MeshShape, over_data: bool = False) -> int:
    from dalign_jax.model.transformer import param_shapes

    layer = param_shapes(cfg)["layers"][0]
    n = 0
    for i in range(cfg.num_layers):
        for name in train.lora_targets:
            fan_in, fan_out = layer[name]
            n += _shard_elements(f"layers/{i}/{name}/a", (fan_in, train.lora_rank), mesh, over_data)
            n += _shard_elements(f"layers/{i}/{name}/b", (train.lora_rank, fan_out), mesh, over_data)
    return n


def _trainable_elements(cfg: ModelConfig, train: Train, mesh: MeshShape, over_data: bool = False) -> int:
    if train.lora_rank:
        return _lora_elements(cfg, train, mesh, over_data)
    return sum(_shard_elements(p, s, mesh, over_data) for p, s in _param_leaves(cfg))


def _split(n: int, parts: int) -> int:
    return -(-n // parts)


def training_items(cfg: ModelConfig, train: Train, mesh: MeshShape, rows: int, length: int,
                   logit_columns: int | None = None) -> dict[str, float]:
    """One training step's memory per device: `rows` sequences of `length` tokens a micro-batch (global),
    the loss over `logit_columns` of them (all but the first where None)."""
    compute = 2 if train.compute_dtype == "bfloat16" else 4
    trainable = _trainable_elements(cfg, train, mesh)
    over = train.shard_optimizer and mesh.data > 1
    items = {"parameters (float32)": weight_bytes(cfg, mesh),
             "gradients": 4.0 * trainable,
             "optimiser state (Adam moments)": 8.0 * _trainable_elements(cfg, train, mesh, over)}
    if train.grad_accum > 1:
        items["gradient accumulator"] = 4.0 * trainable
    if train.lora_rank:  # the merged weights the step runs on
        items["merged weights"] = weight_bytes(cfg, mesh)
    if compute != 4:
        items["weights in the compute dtype"] = weight_bytes(cfg, mesh, compute)
    items.update(activation_items(cfg, mesh, rows, length, compute, train.remat, logit_columns))
    return items


def activation_items(cfg: ModelConfig, mesh: MeshShape, rows: int, length: int, compute: int, remat: bool,
                     logit_columns: int | None = None) -> dict[str, float]:
    """What the forward pass keeps for the backward one, per device: per layer the projections' inputs
    and outputs and attention's probabilities (float32, over the causal half of each query chunk), or
    with remat only each layer's input plus one layer recomputed; and the logits with their gradient."""
    from dalign_jax.model.transformer import ATTENTION_CHUNK

    local_rows = _split(rows, mesh.batch_shards)
    tokens = local_rows * length
    t = mesh.tensor
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    qd, kvd = cfg.num_heads * hd // t, max(cfg.num_kv_heads * hd // t, hd)
    per_token = compute * (6 * d + 3 * qd + 4 * kvd + 7 * _split(f, t))  # the MLP's gate, its derivative, up
    heads = _split(cfg.num_heads, t)
    keys = (length + ATTENTION_CHUNK) / 2
    per_token += 4 * 2 * heads * keys
    layer = per_token * tokens
    columns = length - 1 if logit_columns is None else logit_columns
    items = {}
    if remat:
        items["activations (remat: layer inputs + one layer)"] = compute * d * tokens * cfg.num_layers + layer
    else:
        items["activations (every layer)"] = layer * cfg.num_layers
    items["logits and their gradient (float32)"] = 2 * 4.0 * local_rows * columns * _split(cfg.vocab_size, t)
    return items


# The sampler's own copy of the weights (models.sample_dtype): bytes per parameter, and its KV cache's.
SAMPLE_BYTES = {"float32": (0, 4), "bfloat16": (2, 2), "int8": (1, 4)}


def sampler_items(cfg: ModelConfig, mesh: MeshShape, rows: int, prompt: int, new: int, prefix: int = 0,
                  label: str = "", sample_dtype: str = "float32") -> dict[str, float]:
    """A sampler call's KV cache (rows split over the batch axes), a shared prefix's cache (held once),
    the prefill's largest transient (one layer's projections and score tiles), and the sampler's own
    narrow copy of the weights where `sample_dtype` asks for one (int8 counted at a byte a parameter)."""
    from dalign_jax.model.transformer import ATTENTION_CHUNK

    copy, cache = SAMPLE_BYTES[sample_dtype]
    local_rows = _split(rows, mesh.batch_shards)
    per_slot = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * cache
    items = {f"KV cache{label} ({rows} rows x {prompt + new} slots)": per_slot * local_rows * (prompt + new)}
    if copy:
        items[f"sampler's {sample_dtype} weights{label}"] = weight_bytes(cfg, mesh, copy)
    if prefix:
        items[f"shared prefix cache{label} ({prefix} tokens)"] = per_slot * prefix
    d, f = cfg.hidden_size, cfg.intermediate_size
    layer = 4 * local_rows * prompt * (2 * d + cfg.num_heads * cfg.head_dim + 2 * f)
    layer += 4 * 2 * local_rows * cfg.num_heads * ATTENTION_CHUNK * 2 * (prompt + prefix)
    items[f"prefill transient{label}"] = layer + 4 * local_rows * cfg.vocab_size
    return items


def _flops(cfg: ModelConfig, tokens: int, context: int, training: bool) -> float:
    """2 N per token forward (x3 with the backward pass), plus attention's two products over `context` keys."""
    from dalign_jax.train.metrics import matmul_params

    per_token = 2 * matmul_params(cfg) + 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * context
    return per_token * tokens * (3 if training else 1)


def spec_tokens(config: Config) -> int:
    """About how many tokens the spec adds to a prompt (its longest category's text, ~4 characters a token)."""
    directory = Path(config.spec_dir)
    if not directory.is_dir():
        return 0
    chars = [p.stat().st_size for p in directory.glob("*.md")]
    return (max(chars) + sum(chars) // max(len(chars), 1)) // SPEC_CHARS_PER_TOKEN if chars else 0


def _local(ref) -> bool:
    return isinstance(ref, str)


def plan_config(config: Config, devices: int, read_config=None) -> list[StagePlan]:
    """Every stage's plan for `config` on `devices` devices. `read_config(name)`: a model's
    architecture (default: from its config.json or GGUF header)."""
    if read_config is None:
        from dalign_jax.model.loader import read_model_config as read_config
    mesh = MeshShape.of(config.mesh, devices)
    m = config.models
    policy = read_config(m.policy)
    teacher = policy if m.teacher == "" else (read_config(m.teacher) if _local(m.teacher) else None)
    judge = read_config(m.judge) if _local(m.judge) else None
    spec = spec_tokens(config)
    sample = m.sample_dtype
    plans = []

    d = config.distill
    rows, new = d.batch_size * d.samples_per_prompt, d.cot_tokens + d.answer_tokens
    items = {} if teacher is None else {"teacher weights (float32)": weight_bytes(teacher, mesh),
                                        **sampler_items(teacher, mesh, rows, PROMPT_TOKENS, new, spec,
                                                        sample_dtype=sample)}
    plans.append(StagePlan("distill", items, 0.0 if teacher is None else
                           _flops(teacher, rows * new, spec + PROMPT_TOKENS + new, False), "a sampler call"))

    j = config.judge
    judged = PROMPT_TOKENS + spec + new
    items = {} if judge is None else {"judge weights (float32)": weight_bytes(judge, mesh),
                                      **sampler_items(judge, mesh, j.batch_size, judged, j.max_new_tokens)}
    flops = 0.0 if judge is None else _flops(judge, j.batch_size * judged, judged, False)
    plans.append(StagePlan("judge", items, flops, "a batch scored"))

    s = config.sft
    items = training_items(policy, s.train, mesh, s.batch_size, s.max_seq_len)
    other = training_items(policy, dataclasses.replace(s.train, remat=not s.train.remat), mesh, s.batch_size,
                           s.max_seq_len)
    plans.append(StagePlan("sft", items, _flops(policy, s.batch_size * s.max_seq_len, s.max_seq_len, True),
                           "an optimiser step", sum(other.values())))

    r = config.rl
    rows, length = r.prompts_per_step * r.group_size, PROMPT_TOKENS + r.max_new_tokens
    rollout = mesh if r.rollout_mesh is None else MeshShape.of(r.rollout_mesh, r.rollout_mesh.devices or devices,
                                                               "rl.rollout_mesh")
    micro = _split(rows, r.train.grad_accum)
    items = training_items(policy, r.train, mesh, micro, length, r.max_new_tokens)
    other = sum(training_items(policy, dataclasses.replace(r.train, remat=not r.train.remat), mesh, micro, length,
                               r.max_new_tokens).values())
    other -= sum(items.values())
    items["reference model (float32)"] = weight_bytes(policy, mesh)
    items.update(sampler_items(policy, rollout, rows, PROMPT_TOKENS, r.max_new_tokens, label=" (rollouts)",
                               sample_dtype=sample))
    if judge is not None and ({"judge", "helpfulness"} & set(r.rewards)):
        items["judge weights (float32)"] = weight_bytes(judge, mesh)
    plans.append(StagePlan("rl", items, _flops(policy, rows * length, length, True), "an optimiser step",
                           other + sum(items.values())))

    e = config.eval
    items = {"policy weights (float32)": weight_bytes(policy, mesh),
             **sampler_items(policy, mesh, e.batch_size, PROMPT_TOKENS, e.max_new_tokens, sample_dtype=sample)}
    if judge is not None and (e.judge_grader or e.rubric_grader):
        items["judge weights (float32)"] = weight_bytes(judge, mesh)
    plans.append(StagePlan("eval", items, _flops(policy, e.batch_size * e.max_new_tokens, PROMPT_TOKENS +
                                                 e.max_new_tokens, False), "a sampler call"))
    return plans


def device_memory() -> tuple[float | None, str]:
    """Bytes one device can hold, and where the figure comes from: the runtime's limit on GPUs and
    TPUs; on a CPU the machine's memory shared by its host devices."""
    import jax

    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        return float(stats["bytes_limit"]), f"{device.device_kind} runtime limit"
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None, "unknown"
    return total / jax.device_count(), f"host memory / {jax.device_count()} CPU devices"


def refuse_unfit(plans: list[StagePlan], capacity: float, stages=STAGES) -> None:
    """A UserError naming the first stage that does not fit and its largest item."""
    for plan in plans:
        if plan.stage in stages and plan.total > capacity:
            name, size = plan.largest
            raise UserError(f"plan: stage {plan.stage} needs {plan.total / GIB:.1f} GiB per device, more than the "
                            f"{capacity / GIB:.1f} GiB a device holds; its largest item: {name}, "
                            f"{size / GIB:.1f} GiB (see `dalign plan`)")


def stage_capacity() -> float | None:
    """What a stage's plan is held to: an accelerator's memory; None on a CPU, whose host memory is
    shared and swappable."""
    import jax

    return None if jax.devices()[0].platform == "cpu" else device_memory()[0]


def check_stage_fits(config: Config, stage: str) -> None:
    """Before a stage reads any weight: refuse a config whose plan for it cannot fit the devices."""
    import jax

    capacity = stage_capacity()
    if capacity is not None:
        devices = config.mesh.devices or jax.device_count()
        refuse_unfit(plan_config(config, devices), capacity, (stage,))


def format_plan(plans: list[StagePlan], mesh: MeshShape, capacity: float | None, where: str,
                peak: float) -> str:
    lines = [f"mesh: data {mesh.data} x fsdp {mesh.fsdp} x tensor {mesh.tensor} = {mesh.devices} devices; "
             f"a device holds {'?' if capacity is None else f'{capacity / GIB:.1f}'} GiB ({where}); "
             f"peak {peak / 1e12:g} TFLOP/s a device"]
    for plan in plans:
        if not plan.items:
            lines.append(f"\n{plan.stage}: served at an endpoint, nothing on these devices")
            continue
        fits = "" if capacity is None else ("  fits" if plan.total <= capacity else "  DOES NOT FIT")
        lines.append(f"\n{plan.stage}: {plan.total / GIB:.2f} GiB per device{fits}")
        for name, size in sorted(plan.items.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {size / GIB:10.3f} GiB  {name}")
        if plan.other_remat is not None:
            lines.append(f"  ({plan.other_remat / GIB:.2f} GiB with train.remat the other way)")
        if plan.flops:
            seconds = plan.flops / (peak * mesh.devices)
            lines.append(f"  {plan.flops:.3g} FLOPs {plan.what}: {seconds:.3g} s at peak (a lower bound)")
    return "\n".join(lines)
