"""Run configuration: YAML plus `key=value` overrides, checked against a typed schema.

Every stage reads the same `Config`. An unknown key is an error with a "did you mean", and a value of
the wrong type is an error that names its dotted key. Relative paths are relative to the directory
the command runs in.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib
import importlib.util
import math
import os
import sys
import typing
from pathlib import Path
from typing import Literal, Optional, Union

import yaml

from dalign_jax.engine.remote import Endpoint
from dalign_jax.model.projections import LORA_TARGETS
from dalign_jax.errors import UserError
from dalign_jax.userfiles import load_yaml, read_text


ModelRef = Union[str, Endpoint]


@dataclasses.dataclass
class Models:
    policy: str = "smollm2-135m"  # the model being aligned: HF directory, .gguf file or alias
    # The teacher that writes the analyses and answers (distill): local like the policy, or an
    # endpoint; "": the policy.
    teacher: ModelRef = ""
    judge: ModelRef = "smollm2-135m"  # the spec-aware grader (G_RM): local or an endpoint
    # einsum: ours (a shared prefix is held once, prefill in causal chunks); fused:
    # jax.nn.dot_product_attention (cuDNN flash attention on GPUs for bfloat16). Same results.
    attention: Literal["einsum", "fused"] = "einsum"
    # bfloat16: projections and output head take bf16 operands and sum in float32 (a TPU's default
    # precision); weights, activations and optimiser state stay float32. float32: exact.
    matmul_dtype: Literal["float32", "bfloat16"] = "float32"
    # true: the layers stacked and run as one lax.scan, so compile time does not grow with depth
    # (GPUs, TPUs); false: unrolled, faster on a CPU. Same results.
    scan_layers: bool = False
    # The samplers' own copy of the weights (distill, judge, RL rollouts, eval); training keeps float32
    # masters. bfloat16 computes in it, summing products in float32; int8: the layers' matrices with a
    # scale per column, multiplied as bfloat16 (exact for int8 values).
    sample_dtype: Literal["float32", "bfloat16", "int8"] = "float32"


@dataclasses.dataclass
class MeshConfig:
    data: int = -1  # -1: the devices left over by the other axes
    fsdp: int = 1  # batch, and parameters split along their hidden dimension
    tensor: int = 1  # parameters split along heads, MLP width and vocabulary
    devices: int = 0  # use the first n devices (single process only); 0: all of them


@dataclasses.dataclass
class Distributed:
    enabled: bool = False  # join processes with jax.distributed.initialize
    coordinator: Optional[str] = None  # host:port; None: from the environment / cluster
    num_processes: Optional[int] = None  # None: from the environment / cluster
    process_id: Optional[int] = None  # None: from the environment / cluster


@dataclasses.dataclass
class Prompts:
    path: str = "specs/prompts/safety_prompts.jsonl"  # our JSONL, or an AdvBench / StrongREJECT CSV
    split: Literal["train", "heldout", "all"] = "train"  # the prompt set's split by a hash of each prompt's id
    limit: int = 0  # 0: every prompt; n: the first n (for quick runs)
    per_category: int = 0  # 0: every prompt; n: n of each category, its expected modes in turn (smaller runs)
    # More prompt sets for training only, each added after `path`'s split and never held out: our
    # JSONL or a public CSV set (an AdvBench file, for more disallowed requests).
    extra: list[str] = dataclasses.field(default_factory=list)
    extra_per_category: int = 0  # 0: every prompt of each extra set; n: n of each category of each set


class Sampled:
    """A section with the sampling keys (temperature, top_k, top_p, min_p, repetition_penalty)."""

    def sampling_params(self):
        """The sampler's settings these keys give (checked there: a bad value names its key)."""
        from dalign_jax.engine.sampler import SamplingParams

        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                              repetition_penalty=self.repetition_penalty)


@dataclasses.dataclass
class Scaffold:
    """distill.scaffold: what steers a small teacher toward the prompt set's labels (docs/method.md)."""
    # Tell the teacher each prompt's expected mode (in the system turn SFT drops) and end its analysis on
    # that decision: a teacher too small to apply the spec then refuses where the labels say.
    mode_hint: bool = False
    # With mode_hint, at most this many sentences of analysis before the decision (0: no limit): a cut at
    # the token limit ends nowhere a student can learn to find.
    cot_sentences: int = 0
    # By expected mode, a sentence before the decision naming the policy that applies ({category}: its
    # title, {sections}: its section IDs for the mode), as the paper's analyses end.
    cot_conclusion: dict[str, str] = dataclasses.field(default_factory=dict)
    # The analysis written from this template ({request}: the last user message) instead of sampled, for
    # a teacher whose own sentences are noise: label-guided distillation (docs/method.md).
    analysis_template: str = ""
    # Text that starts the answer, by expected mode (with force_format), e.g. {refuse: "I'm sorry, but"}:
    # the teacher continues it, so a hinted refusal reads as one.
    answer_prefix: dict[str, str] = dataclasses.field(default_factory=dict)
    # At most this many sentences of the answer, by expected mode, e.g. {refuse: 1}: the refusal style
    # is a brief apology and a statement of inability, and a small teacher rambles on after it.
    answer_sentences: dict[str, int] = dataclasses.field(default_factory=dict)
    # An answer cut by answer_tokens is kept up to its last full sentence (a finished answer that SFT
    # teaches to end) instead of being dropped as truncated.
    trim_truncated: bool = False
    # k by expected mode, e.g. {comply: 1}: where the judge keeps one completion of a prompt, a second
    # is only a spare, and its sampling costs as much as a kept one.
    samples_by_mode: dict[str, int] = dataclasses.field(default_factory=dict)


SCAFFOLD_KEYS = tuple(f.name for f in dataclasses.fields(Scaffold))


@dataclasses.dataclass
class Distill(Sampled):
    samples_per_prompt: int = 2  # k completions per prompt
    cot_tokens: int = 128  # limit for the analysis
    answer_tokens: int = 128  # limit for the final answer
    # Write the delimiter ourselves and sample the answer in a second pass, so a small model's completions
    # have both parts; false: one pass. Unset: true for a local teacher, false for one at an endpoint.
    force_format: Optional[bool] = None
    # How a teacher too small to apply the spec is guided (label-guided distillation); all off by default.
    scaffold: Scaffold = dataclasses.field(default_factory=Scaffold)
    temperature: float = 0.8  # sampling temperature (0: greedy)
    top_k: int = 0  # 0: off
    top_p: float = 0.95  # nucleus sampling; 1: off
    min_p: float = 0.0  # tokens at least this share of the likeliest one's probability; 0: off
    repetition_penalty: float = 1.0  # transformers' (1: off): logits of tokens already in the row shrunk
    batch_size: int = 16  # prompts decoded at once (times samples_per_prompt rows, batched continuously)
    shard_size: int = 32  # prompts per output shard: the unit of resume


@dataclasses.dataclass
class Judge:
    mode: Literal["score", "generate"] = "score"  # score: next-token expectation; generate: sample and parse
    runs: int = 2  # judge prompts per completion (varied wording); the score is their minimum
    threshold: float = 0.5  # keep completions scoring at least this (scores lie in [0, 1])
    best_of_n: int = 1  # then keep at most this many per prompt, best first
    # best_of_n for the prompts of an expected mode, e.g. {refuse: 2}: more of a rarer mode in the SFT
    # set, whose student otherwise leans to the commoner one.
    best_of_n_by_mode: dict[str, int] = dataclasses.field(default_factory=dict)
    use_expected_mode: bool = True  # tell the judge the prompt set's expected mode where it has one
    # Also drop, by the rule grader, answers whose mode contradicts the expected one: a refusal where
    # compliance is expected, no refusal where one is, no supportive answer where a safe completion is.
    require_expected_mode: bool = False
    batch_size: int = 8  # judge inputs per forward pass
    max_new_tokens: int = 48  # generate mode only


@dataclasses.dataclass
class Train:
    """The optimiser and loop shared by SFT and RL."""
    learning_rate: float = 1e-5  # peak, after warm-up; cosine decay to min_lr_ratio of it
    warmup_steps: int = 10  # linear warm-up from 0
    min_lr_ratio: float = 0.1  # the cosine decay ends at this share of learning_rate
    weight_decay: float = 0.0  # AdamW; not applied to norms
    b1: float = 0.9  # Adam's first-moment decay
    b2: float = 0.95  # Adam's second-moment decay
    max_grad_norm: float = 1.0  # clip the global gradient norm; 0: no clipping
    grad_accum: int = 1  # micro-batches per optimiser step
    compute_dtype: Literal["float32", "bfloat16"] = "float32"  # master weights stay float32
    remat: bool = False  # recompute each layer's activations in the backward pass (saves memory)
    # ZeRO-1: the optimiser's moments and update split over the data axis too (each replica updates its
    # share, then the parameters are gathered); false: every replica updates all of them.
    shard_optimizer: bool = True
    log_every: int = 1  # steps between metrics rows (SFT; RL logs every step)
    save_every: int = 50  # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 2  # the newest n checkpoints are kept
    peak_flops: float = 0.0  # for MFU; 0: measure a matmul in models.matmul_dtype on the first device at start
    # LoRA: 0 trains every parameter; r > 0 trains rank-r adapters on `lora_targets` only (the
    # optimiser state and checkpoints hold the adapters; the export is merged into full weights).
    lora_rank: int = 0
    lora_alpha: float = 16.0  # the adapters' update is scaled by lora_alpha / lora_rank
    lora_targets: list[str] = dataclasses.field(default_factory=lambda: list(LORA_TARGETS))  # what LoRA adapts


@dataclasses.dataclass
class SFT:
    data: str = ""  # JSONL or ArrayRecord of {"messages": [...]}; "": the judge stage's kept set
    capability_data: str = ""  # plain helpful conversations mixed in (same format); "": none
    capability_ratio: float = 0.0  # share of training examples drawn from capability_data
    heldout_fraction: float = 0.1  # examples held out (by a hash of their id) for the eval loss
    max_seq_len: int = 512  # longer examples are cut at this length
    # Rows of max_seq_len tokens holding as many whole examples as fit, each attending only to itself
    # (grain's first-fit packer), instead of one example a row padded to a length bucket.
    packing: bool = False
    batch_size: int = 4  # sequences per micro-batch (global, over all processes)
    steps: int = 0  # optimiser steps; 0: `epochs` passes over the training examples
    epochs: float = 1.0  # passes over the training examples, where steps is 0
    eval_every: int = 50  # steps between held-out evaluations (and one at the end)
    # NEFTune (TRL's neftune_noise_alpha; its paper uses 5): training steps add uniform noise of
    # alpha / sqrt(row length x hidden size) to the input embeddings; held-out loss sees none. 0: off.
    neftune_alpha: float = 0.0
    export: bool = True  # write the final model as a HF directory in run_dir/sft/export
    train: Train = dataclasses.field(default_factory=Train)


@dataclasses.dataclass
class RL(Sampled):
    init: str = ""  # the starting policy (and KL reference): "" -> run_dir/sft/export if it exists, else models.policy
    steps: int = 20  # optimiser steps (times updates_per_rollout)
    prompts_per_step: int = 2  # prompts whose rollouts make one step's batch
    group_size: int = 4  # G completions per prompt
    max_new_tokens: int = 64  # analysis and answer together
    temperature: float = 1.0  # rollout sampling temperature
    top_p: float = 1.0  # 1: off
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # 0: off
    # As distill's (TRL's GRPOConfig has it too); the old log-probabilities logged are the model's own.
    repetition_penalty: float = 1.0
    # Reward name -> weight (registered in dalign_jax/rl/rewards.py): judge (final answer only),
    # helpfulness, mode (the rule grader against the expected mode), length.
    rewards: dict[str, float] = dataclasses.field(default_factory=lambda: {"judge": 1.0})
    malformed_reward: float = -1.0  # the whole reward of a completion without analysis, delimiter or answer
    # Completions cut by max_new_tokens leave the loss and their group's statistics instead of taking
    # malformed_reward (TRL's mask_truncated_completions): a cut answer says nothing of a finished one.
    mask_truncated: bool = False
    # Registered names (dalign_jax/rl/; a module named in `plugins` can register more).
    advantage: str = "grpo"  # grpo, grpo_batch_std, dr_grpo, rloo
    aggregation: str = "token_mean"  # token_mean, sequence_mean, sequence_sum_norm
    # The probability ratio of the clipped objective: per token (PPO, GRPO), or per sequence, the
    # geometric mean of its tokens' (GSPO; its paper clips at about 3e-4 and 4e-4).
    importance_sampling: Literal["token", "sequence"] = "token"
    clip_low: float = 0.2  # PPO ratio clipped to [1 - clip_low, 1 + clip_high]
    clip_high: float = 0.28  # the upper clip (DAPO's clip-higher: above clip_low)
    kl_coef: float = 0.02  # k3 estimate of KL(policy || reference)
    # Every ref_sync_every steps reference <- mix * policy + (1 - mix) * reference (TRL's sync_ref_model);
    # 0: the reference stays the starting policy.
    ref_sync_every: int = 0
    ref_sync_mix: float = 0.6  # the policy's share in each reference sync
    updates_per_rollout: int = 1  # optimiser steps on each batch of rollouts (PPO epochs); above 1 the clip acts
    # The sampler's own mesh (data, fsdp, tensor, devices), as Tunix gives rollouts their own: null
    # samples on the training mesh. The weights are copied onto it before each rollout.
    rollout_mesh: Optional[MeshConfig] = None
    # Rows decoded at once; a step's prompts_per_step x group_size rows beyond it are batched
    # continuously (a finished row takes the next). 0: every row of a step at once.
    rollout_batch: int = 0
    train: Train = dataclasses.field(default_factory=lambda: Train(learning_rate=1e-6, warmup_steps=0,
                                                                   save_every=10))


@dataclasses.dataclass
class Eval:
    # Models to evaluate: base (models.policy), sft and rl (this run's exports), or HF directories /
    # .gguf files; names of stages that have not run are skipped.
    checkpoints: list[str] = dataclasses.field(default_factory=lambda: ["base", "sft", "rl"])
    # More prompt sets, each a path or {path: P, format: F}: our JSONL, or a public set's CSV (StrongREJECT,
    # AdvBench, XSTest, HarmBench, OR-Bench, JailbreakBench, or prompt + label), recognised from its header.
    prompts: typing.Union[str, list[typing.Union[str, dict[str, str]]]] = dataclasses.field(default_factory=list)
    heldout: bool = True  # our prompt set's held-out split (prompts.path)
    strongreject: str = ""  # path of the StrongREJECT CSV; "": not evaluated
    limit: int = 0  # at most this many prompts per set, taken in turn from each category (0: all)
    jailbreak_prompts: int = 8  # disallowed prompts per set wrapped in every jailbreak template
    max_new_tokens: int = 128  # answer length
    batch_size: int = 32  # prompts decoded at once (batched continuously)
    judge_grader: bool = True  # also grade with the judge model and the spec (beside the rule grader)
    # StrongREJECT's rubric (refused, convincing, specific) by the judge model on answers to disallowed
    # and jailbreak prompts: three more judge passes over those rows.
    rubric_grader: bool = False


@dataclasses.dataclass
class Config:
    run_dir: str = "runs/default"  # where every stage writes
    spec_dir: str = "specs"  # the spec: manifest.yaml and one Markdown file per category
    seed: int = 0  # all sampling randomness derives from it
    # Modules (dotted names from the working directory, or .py paths) imported first, so that their
    # @register("name") rewards, advantages and aggregations can be named in the rl section.
    plugins: list[str] = dataclasses.field(default_factory=list)
    models: Models = dataclasses.field(default_factory=Models)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    distributed: Distributed = dataclasses.field(default_factory=Distributed)
    prompts: Prompts = dataclasses.field(default_factory=Prompts)
    distill: Distill = dataclasses.field(default_factory=Distill)
    judge: Judge = dataclasses.field(default_factory=Judge)
    sft: SFT = dataclasses.field(default_factory=SFT)
    rl: RL = dataclasses.field(default_factory=RL)
    eval: Eval = dataclasses.field(default_factory=Eval)

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir)


def _type_ok(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if origin is Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and all(_type_ok(v, typing.get_args(hint)[0]) for v in value)
    if origin is dict:
        key_hint, value_hint = typing.get_args(hint)
        return isinstance(value, dict) and all(_type_ok(k, key_hint) and _type_ok(v, value_hint)
                                               for k, v in value.items())
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _describe(hint) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(hint)))
    if typing.get_origin(hint) is typing.Union:
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return "a list of " + _describe(typing.get_args(hint)[0])
    if typing.get_origin(hint) is dict:
        return "a mapping of " + " to ".join(_describe(h) for h in typing.get_args(hint))
    return "null" if hint is type(None) else hint.__name__


def _section_default(cls, key: str):
    """The default a section's field gets from its parent (rl.train's differ from Train's own)."""
    field = next(f for f in dataclasses.fields(cls) if f.name == key)
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


def _build(cls, values: dict, prefix: str, source: str, base=None):
    """`cls` from a mapping; keys it does not name keep their values in `base` (the parent's default
    for this section), else the class's own defaults."""
    if not isinstance(values, dict):
        raise UserError(f"{source}: {prefix.rstrip('.') or 'config'}: expected a mapping")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            close = difflib.get_close_matches(str(key), list(hints), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            if cls is Distill and key in SCAFFOLD_KEYS:
                hint = f" (it moved to distill.scaffold.{key})"
            raise UserError(f"{source}: unknown config key {prefix}{key}{hint}")
        hint = hints[key]
        optional = [h for h in typing.get_args(hint) if dataclasses.is_dataclass(h)]
        if typing.get_origin(hint) is typing.Union and optional and isinstance(value, dict):
            hint = optional[0]  # Optional[section]: a mapping builds the section
        if dataclasses.is_dataclass(hint):
            default = _section_default(cls, key)
            kwargs[key] = _build(hint, value, f"{prefix}{key}.", source,
                                 default if isinstance(default, hint) else None)
        elif hint is float and isinstance(value, str) and _is_number(value):
            kwargs[key] = float(value)  # PyYAML reads 1e-5 (no dot, no exponent sign) as a string
        elif not _type_ok(value, hint):
            raise UserError(f"{source}: config key {prefix}{key}: expected {_describe(hint)}, got {value!r}")
        elif typing.get_origin(hint) is dict:
            kwargs[key] = {k: float(v) if typing.get_args(hint)[1] is float else v for k, v in value.items()}
        else:
            kwargs[key] = float(value) if hint is float else value
    return cls(**kwargs) if base is None else dataclasses.replace(base, **kwargs)


def _merge(base: dict, dotted: str, value) -> None:
    node = base
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"override {dotted}: {part} is not a section")
    node[parts[-1]] = value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    raw: dict = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        raw = load_yaml(read_text(path, "config file"), str(path)) or {}
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r}: expected key=value")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        _merge(raw, key.strip(), value)
        source = f"{source} + overrides" if "overrides" not in source else source
    config = _build(Config, raw, "", source)
    if config.distill.force_format is None:
        config.distill.force_format = not isinstance(config.models.teacher, Endpoint)
    _check_ranges(config, source)
    import_plugins(config.plugins, source)
    return config


def import_plugins(names: list[str], source: str) -> None:
    """Import each plugin module once: a dotted module name (the working directory is searched first,
    as `python -m` does) or the path of a .py file."""
    for name in names:
        try:
            if name.endswith(".py"):
                path = Path(name).resolve()
                if not path.is_file():
                    raise FileNotFoundError(f"{name} does not exist")
                module_name = f"dalign_plugin_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
                if module_name in sys.modules:
                    continue
                module_spec = importlib.util.spec_from_file_location(module_name, path)
                module = importlib.util.module_from_spec(module_spec)
                sys.modules[module_name] = module
                try:
                    module_spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[module_name]
                    raise
            else:
                if os.getcwd() not in sys.path:
                    sys.path.insert(0, os.getcwd())
                importlib.import_module(name)
        except Exception as e:
            raise UserError(f"{source}: config key plugins: {name!r} could not be imported: "
                            f"{type(e).__name__}: {e}") from e


# Bounds of every number, by section class (sections that appear twice share one): (low, high)
# inclusive, None unbounded, OPEN: above low. NaN and infinity are refused everywhere.
OPEN = "open"
RANGES: dict[type, dict[str, tuple]] = {
    Config: {"seed": (0, None)},
    Endpoint: {"max_concurrency": (1, None), "timeout_s": (0.0, None, OPEN), "retries": (0, None),
               "top_logprobs": (1, None)},
    MeshConfig: {"data": (-1, None), "fsdp": (-1, None), "tensor": (-1, None), "devices": (0, None)},
    Distributed: {"num_processes": (1, None), "process_id": (0, None)},
    Prompts: {"limit": (0, None), "per_category": (0, None), "extra_per_category": (0, None)},
    Distill: {"samples_per_prompt": (1, None), "cot_tokens": (1, None), "answer_tokens": (1, None),
              "temperature": (0.0, None), "top_k": (0, None), "top_p": (0.0, 1.0, OPEN),
              "min_p": (0.0, 1.0), "repetition_penalty": (0.0, None, OPEN), "batch_size": (1, None),
              "shard_size": (1, None)},
    Scaffold: {"cot_sentences": (0, None)},
    Judge: {"runs": (1, None), "threshold": (0.0, 1.0), "best_of_n": (1, None), "batch_size": (1, None),
            "max_new_tokens": (1, None)},
    Train: {"learning_rate": (0.0, None), "warmup_steps": (0, None), "min_lr_ratio": (0.0, 1.0),
            "weight_decay": (0.0, None), "b1": (0.0, 0.9999), "b2": (0.0, 0.9999), "max_grad_norm": (0.0, None),
            "grad_accum": (1, None), "log_every": (1, None), "save_every": (1, None), "keep_checkpoints": (1, None),
            "peak_flops": (0.0, None), "lora_rank": (0, None), "lora_alpha": (0.0, None, OPEN)},
    SFT: {"capability_ratio": (0.0, 0.9), "heldout_fraction": (0.0, 0.9), "max_seq_len": (8, None),
          "batch_size": (1, None), "steps": (0, None), "epochs": (0.0, None, OPEN), "eval_every": (1, None),
          "neftune_alpha": (0.0, None)},
    RL: {"steps": (1, None), "prompts_per_step": (1, None), "group_size": (2, None), "max_new_tokens": (1, None),
         "temperature": (0.0, None), "top_p": (0.0, 1.0, OPEN), "top_k": (0, None), "min_p": (0.0, 1.0),
         "repetition_penalty": (0.0, None, OPEN), "malformed_reward": (None, None), "clip_low": (0.0, 1.0),
         "clip_high": (0.0, None), "kl_coef": (0.0, None), "ref_sync_every": (0, None), "ref_sync_mix": (0.0, 1.0),
         "updates_per_rollout": (1, None), "rollout_batch": (0, None)},
    Eval: {"limit": (0, None), "jailbreak_prompts": (0, None), "max_new_tokens": (1, None), "batch_size": (1, None)},
}


def _out_of_range(value, bounds: tuple) -> str | None:
    """What `value` must be, where it is not."""
    low, high, *open_low = bounds
    if isinstance(value, float) and not math.isfinite(value):
        return "a finite number"
    above = f"above {low}" if open_low else f"at least {low}"
    wanted = above if high is None else f"{above} and at most {high}" if open_low else f"between {low} and {high}"
    too_low = low is not None and (value <= low if open_low else value < low)
    return wanted if too_low or (high is not None and value > high) else None


def _check_numbers(section, prefix: str, source: str) -> None:
    """Every number of `section` and its subsections within RANGES, and every float in a mapping finite."""
    bounds = RANGES.get(type(section), {})
    for field in dataclasses.fields(section):
        value = getattr(section, field.name)
        key = f"{prefix}{field.name}"
        if dataclasses.is_dataclass(value):
            _check_numbers(value, f"{key}.", source)
            continue
        values = value.items() if isinstance(value, dict) else [(None, value)]
        for name, v in values:
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            wanted = _out_of_range(v, bounds.get(field.name, (None, None)) if name is None else (None, None))
            if wanted:
                where = key if name is None else f"{key}.{name}"
                raise UserError(f"{source}: config key {where}: must be {wanted}, got {v!r}")


def _check_template(source: str, key: str, template: str, **placeholders: str) -> None:
    """A UserError naming `key` when `template` uses a placeholder other than `placeholders`."""
    try:
        template.format(**placeholders)
    except (KeyError, IndexError, ValueError) as e:
        names = [f"{{{name}}}" for name in placeholders]
        known = f"the placeholder is {names[0]}" if len(names) == 1 else \
            f"the placeholders are {', '.join(names[:-1])} and {names[-1]}"
        raise UserError(f"{source}: config key {key}: {e!r} in {template!r}; {known}") from None


def _check_ranges(config: Config, source: str) -> None:
    for name in ("sft", "rl"):
        targets = getattr(config, name).train.lora_targets
        unknown = sorted(set(targets) - set(LORA_TARGETS))
        if unknown or not targets:
            raise UserError(f"{source}: config key {name}.train.lora_targets: {', '.join(unknown) or 'empty'}; "
                            f"choose from {', '.join(LORA_TARGETS)}")
    from dalign_jax.data.spec import MODES
    scaffold = config.distill.scaffold
    by_mode = {"distill.scaffold.cot_conclusion": scaffold.cot_conclusion,
               "distill.scaffold.answer_prefix": scaffold.answer_prefix,
               "distill.scaffold.answer_sentences": scaffold.answer_sentences,
               "judge.best_of_n_by_mode": config.judge.best_of_n_by_mode,
               "distill.scaffold.samples_by_mode": scaffold.samples_by_mode}
    for key, values in by_mode.items():
        unknown = sorted(set(values) - set(MODES))
        if unknown:
            raise UserError(f"{source}: config key {key}: {', '.join(unknown)}; choose from {', '.join(MODES)}")
    for mode, template in scaffold.cot_conclusion.items():
        _check_template(source, f"distill.scaffold.cot_conclusion.{mode}", template, category="C", sections="C-1")
    if scaffold.analysis_template:
        _check_template(source, "distill.scaffold.analysis_template", scaffold.analysis_template, request="R")
        if not (scaffold.mode_hint and config.distill.force_format):
            raise UserError(f"{source}: config key distill.scaffold.analysis_template: needs "
                            "distill.scaffold.mode_hint and distill.force_format (the decision it ends on is the "
                            "prompt's expected mode)")
    for key in ("distill.scaffold.answer_sentences", "judge.best_of_n_by_mode", "distill.scaffold.samples_by_mode"):
        for mode, count in by_mode[key].items():
            if count < 1:
                raise UserError(f"{source}: config key {key}.{mode}: must be at least 1, got {count!r}")
    _check_numbers(config, "", source)
    _check_endpoints(config, source)
    # Train keys only SFT acts on: RL logs every step and reports no MFU.
    for key, ignored in (("log_every", 1), ("peak_flops", 0.0)):
        if getattr(config.rl.train, key) != ignored:
            raise UserError(f"{source}: config key rl.train.{key}: RL does not use it (it logs every step and "
                            f"reports no MFU); the key acts in sft.train only")


# Distill keys that steer a teacher token by token (a second sampling pass after text we write): an
# endpoint teacher writes its analysis and answer in one reply, so these are refused for it.
TOKEN_LEVEL_DISTILL_KEYS = ("force_format", "scaffold.cot_sentences", "scaffold.cot_conclusion",
                            "scaffold.analysis_template", "scaffold.answer_prefix")


def _check_endpoints(config: Config, source: str) -> None:
    for role in ("teacher", "judge"):
        ref = getattr(config.models, role)
        if isinstance(ref, Endpoint) and not ref.endpoint.startswith(("http://", "https://")):
            raise UserError(f"{source}: config key models.{role}.endpoint: expected an http:// or https:// URL, "
                            f"got {ref.endpoint!r}")
    if isinstance(config.models.teacher, Endpoint):
        for key in TOKEN_LEVEL_DISTILL_KEYS:
            section, _, name = key.rpartition(".")
            if getattr(config.distill.scaffold if section else config.distill, name):
                raise UserError(f"{source}: config key distill.{key}: needs token-level control of the teacher, "
                                "which a teacher at an endpoint does not give (it writes analysis and answer in "
                                "one reply); remove the key" + (" or set it to false" if key == "force_format" else ""))


def model_ref(ref: ModelRef) -> str | dict:
    """A model reference as a run header records it (an endpoint without its credentials' variable)."""
    if isinstance(ref, Endpoint):
        return {"endpoint": ref.endpoint, "model": ref.model}
    return ref


def config_to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)
