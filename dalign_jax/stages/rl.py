"""Stage: RL with the spec-aware judge as reward (GRPO and relatives), the CoT hidden from the judge.

Each step: G completions for each of `rl.prompts_per_step` prompts from the current parameters (the
compiled sampler, keeping its per-token log-probabilities); rewards from the registry on the parsed
final answers; group advantages; one compiled update of the clipped objective with a KL penalty to
a reference: the starting model, frozen unless `rl.ref_sync_every` moves it toward the policy, and
none at all with `rl.kl_coef` 0. The policy sees the conversation only, never the spec.

Outputs in run_dir/rl: checkpoints/, metrics.jsonl and tensorboard/ (reward overall and per
category, the share of groups with equal rewards, KL, clip fraction, entropy, response length,
logprob gap), rollouts.jsonl (every completion with its reward), export/ (HF directory),
summary.json (with the first and last steps' mean reward).
"""
from __future__ import annotations

import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from dalign_jax.config import Config
from dalign_jax.data.completion import parse_completion
from dalign_jax.data.records import jsonl_text, read_jsonl, write_atomic
from dalign_jax.data.spec import load_spec
from dalign_jax.engine.chat import encode_chat, stop_token_ids
from dalign_jax.engine.sampler import Sampler
from dalign_jax.errors import UserError
from dalign_jax.parallel.mesh import batch_size_multiple, shard_params
from dalign_jax.rl.advantages import ADVANTAGES
from dalign_jax.rl.losses import rl_loss
from dalign_jax.rl.rewards import RewardContext, Rollout, total_rewards
from dalign_jax.stages.inputs import check_registered, mesh_from, open_mesh, open_model, open_prompts
from dalign_jax.stages.outputs import check_run_header, ensure_writable, section
from dalign_jax.train.loop import TrainingRun
from dalign_jax.train.lora import LoraConfig, Trainable
from dalign_jax.train.optim import learning_rate_schedule, make_optimizer
from dalign_jax.train.step import COMPUTE_DTYPES, compile_batch_logprobs, device_batch


def starting_policy(config: Config) -> str:
    """`rl.init`, else the SFT stage's export, else the base policy."""
    if config.rl.init:
        return config.rl.init
    sft_export = config.run_path / "sft" / "export"
    return str(sft_export) if (sft_export / "config.json").is_file() else config.models.policy


COMPLETION_MULTIPLE = 32  # completion columns are rounded up to this: few shapes, little padding


def training_batch(prompts: list[list[int]], completions: list[np.ndarray], logprobs: list[np.ndarray],
                   advantages: np.ndarray, pad_id: int, prompt_width: int,
                   counted: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Each row's prompt left-padded to `prompt_width` columns, its completion right-padded after them,
    so every completion starts in the same column and only the completions' columns need logits.
    tokens, positions: [rows, prompt_width + completion]; loss_mask and old_logp (the sampler's
    log-probability of each completion token): [rows, completion]. A row whose `counted` is False has
    no loss tokens."""
    if max(map(len, prompts)) > prompt_width:
        raise ValueError(f"training_batch: a prompt of {max(map(len, prompts))} tokens in {prompt_width} columns")
    longest = max(max(map(len, completions)), 1)
    completion = -(-longest // COMPLETION_MULTIPLE) * COMPLETION_MULTIPLE
    rows, width = len(prompts), prompt_width + completion
    batch = {"tokens": np.full((rows, width), pad_id, np.int32), "positions": np.full((rows, width), -1, np.int32),
             "loss_mask": np.zeros((rows, completion), np.int32),
             "old_logp": np.zeros((rows, completion), np.float32), "advantages": np.asarray(advantages, np.float32)}
    for i, (p, c, lp) in enumerate(zip(prompts, completions, logprobs)):
        start = prompt_width - len(p)
        batch["tokens"][i, start:prompt_width + len(c)] = np.concatenate([p, c])
        batch["positions"][i, start:prompt_width + len(c)] = np.arange(len(p) + len(c))
        batch["loss_mask"][i, :len(c)] = 1 if counted is None else int(counted[i])
        batch["old_logp"][i, :len(c)] = lp
    return batch


def zero_spread_share(rewards: np.ndarray, counted: np.ndarray, group: int) -> float:
    """The share of groups whose counted rewards are all equal (TRL's `frac_reward_zero_std`): their
    advantages are zero, so they teach nothing this step."""
    spreads = [np.ptp(r[c]) if c.sum() > 1 else 0.0
               for r, c in zip(rewards.reshape(-1, group), counted.reshape(-1, group))]
    return float(np.mean([s == 0 for s in spreads]))


def per_category(rollouts: list[Rollout], rewards: np.ndarray) -> dict[str, float]:
    groups: dict[str, list[float]] = {}
    for r, value in zip(rollouts, rewards):
        groups.setdefault(r.prompt.category, []).append(float(value))
    return {f"reward/{c}": float(np.mean(v)) for c, v in sorted(groups.items())}


class Rollouts:
    """Samples and parses G completions per prompt with the current parameters, on `mesh` (the
    training mesh, or `rl.rollout_mesh`)."""

    def __init__(self, config: Config, model, mesh):
        rl = config.rl
        if rl.temperature <= 0:
            raise UserError("rl.temperature: must be above 0 (the objective needs the sampling distribution)")
        self.model = model
        self.group = rl.group_size
        self.max_new = rl.max_new_tokens
        self.sampling = rl.sampling_params()
        # Prompts carry no shared spec here, and the parameters change every step: no prefix cache.
        self.sampler = Sampler(model.cfg, mesh, pad_id=model.tokenizer.pad_token_id or 0, prefix_min_tokens=0,
                               weights=config.models.sample_dtype)
        self.stops = stop_token_ids(model)
        self.batch_rows = rl.rollout_batch or None

    def __call__(self, params, prompts, key):
        encoded = [encode_chat(self.model.tokenizer, p.chat()) for p in prompts for _ in range(self.group)]
        out = self.sampler.generate(params, encoded, self.max_new, key, self.sampling, stop_tokens=self.stops,
                                    batch_rows=self.batch_rows)
        rollouts = []
        for i, (body, finished) in enumerate(zip(out.content(), out.stopped)):
            text = self.model.tokenizer.decode(body, skip_special_tokens=False)
            parsed = parse_completion(text, bool(finished))
            rollouts.append(Rollout(prompts[i // self.group], text, parsed.answer if parsed.status == "ok" else "",
                                    parsed.status, int(out.lengths[i])))
        return encoded, out, rollouts


def run_rl(config: Config, force: bool = False) -> dict:
    from dalign_jax.config import model_ref
    from dalign_jax.engine.judge import open_judge

    check_registered(config)
    rl, train = config.rl, config.rl.train
    spec = load_spec(config.spec_dir)
    prompts = open_prompts(config, spec)
    out = config.run_path / "rl"
    ensure_writable(out)
    mesh = open_mesh(config, "rl")
    rows = rl.prompts_per_step * rl.group_size
    if rows % (batch_size_multiple(mesh) * train.grad_accum):
        raise UserError(f"rl.prompts_per_step x rl.group_size = {rows} must be a multiple of mesh data x fsdp "
                        f"({batch_size_multiple(mesh)}) times rl.train.grad_accum ({train.grad_accum})")
    if rl.ref_sync_every and not rl.kl_coef:
        raise UserError("rl.ref_sync_every: there is no reference to sync with rl.kl_coef 0")
    policy = open_model(config, starting_policy(config))
    check_run_header(out, {"policy_model_id": policy.model_id, "judge_model": model_ref(config.models.judge),
                           "spec_version": spec.version, "rl": section(config, "rl"), "prompts": section(config, "prompts"),
                           "seed": config.seed, "mesh": section(config, "mesh")}, force)
    summary_path = out / "summary.json"
    if summary_path.is_file():
        return json.loads(summary_path.read_text())

    judge = open_judge(config, mesh)
    context = RewardContext(spec, judge, rl.max_new_tokens, config.judge.use_expected_mode)
    optimizer = make_optimizer(train, rl.steps * rl.updates_per_rollout)
    schedule = learning_rate_schedule(train, rl.steps * rl.updates_per_rollout)
    dtype = COMPUTE_DTYPES[train.compute_dtype]
    loss_fn = functools.partial(rl_loss, cfg=policy.cfg, temperature=rl.temperature, clip_low=rl.clip_low,
                                clip_high=rl.clip_high, kl_coef=rl.kl_coef, aggregation=rl.aggregation,
                                max_tokens=rl.max_new_tokens, importance=rl.importance_sampling, compute_dtype=dtype,
                                remat=train.remat)
    trainable = Trainable(policy.params, LoraConfig.from_train(train), mesh, config.seed)
    # The KL reference is the starting policy (with LoRA, the frozen base), saved with each checkpoint when
    # it follows the policy; with kl_coef 0 there is none, as TRL at beta 0: no copy, no forward pass.
    reference = None
    if rl.kl_coef > 0:
        reference = shard_params(policy.params, mesh) if trainable.lora is None else trainable.frozen
        reference_logp = compile_batch_logprobs(policy.cfg, trainable.param_sharding, mesh,
                                                temperature=rl.temperature, compute_dtype=dtype)
    run = TrainingRun("rl", out, trainable, optimizer, schedule, loss_fn, mesh, train, rl.steps)
    if rl.ref_sync_every:
        if run.start:
            reference = run.checkpoints.restore_extra(run.start, "reference", jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), reference))
        # Not donated: with LoRA the reference starts as the frozen base the adapters are merged into.
        sync_reference = jax.jit(functools.partial(mix_params, mix=rl.ref_sync_mix),
                                 out_shardings=jax.tree.map(lambda x: x.sharding, reference))
    rollout_mesh = mesh if rl.rollout_mesh is None else mesh_from(rl.rollout_mesh, "rl.rollout_mesh")
    sample = Rollouts(config, policy, rollout_mesh)
    order = np.random.default_rng(config.seed).permutation(len(prompts))
    rollout_rows = read_jsonl(out / "rollouts.jsonl") if (out / "rollouts.jsonl").is_file() else []
    rollout_rows = [r for r in rollout_rows if r["step"] <= run.start]
    pad_id = policy.tokenizer.pad_token_id or 0
    prompt_width = max(len(encode_chat(policy.tokenizer, p.chat())) for p in prompts)

    bar = run.steps_left()
    for step in bar:
        chosen = [prompts[order[(step * rl.prompts_per_step + i) % len(prompts)]] for i in range(rl.prompts_per_step)]
        started = time.perf_counter()
        key = jax.random.fold_in(jax.random.key(config.seed), step)
        encoded, sampled, rollouts = sample(run.full_params(), chosen, key)
        sampled_s = time.perf_counter() - started
        rewards, parts = total_rewards(context, rl.rewards, rollouts, rl.malformed_reward)
        counted = np.array([not (rl.mask_truncated and r.status == "truncated") for r in rollouts])
        advantages = np.asarray(ADVANTAGES[rl.advantage](jnp.asarray(rewards.reshape(-1, rl.group_size)),
                                                         jnp.asarray(counted.reshape(-1, rl.group_size)))).reshape(-1)
        judged_s = time.perf_counter() - started - sampled_s
        local = training_batch(encoded, sampled.tokens, sampled.logprobs, advantages, pad_id, prompt_width, counted)
        batch = device_batch(local, mesh, train.grad_accum)
        if reference is not None:
            batch["ref_logp"] = reference_logp(reference, batch)
        for update in range(rl.updates_per_rollout):
            metrics = run.update(batch, step)
            if update == 0:  # the sampler's weights: the gap must be near zero here
                gap = metrics["logprob_gap"]
        metrics["logprob_gap"] = gap
        metrics.update(reward=float(rewards.mean()), zero_std_groups=zero_spread_share(rewards, counted, rl.group_size),
                       malformed=float(np.mean([r.status != "ok" for r in rollouts])),
                       truncated=float(np.mean([r.status == "truncated" for r in rollouts])),
                       response_tokens=float(np.mean([r.num_tokens for r in rollouts])),
                       rollout_s=sampled_s, reward_s=judged_s, step_s=time.perf_counter() - started,
                       **{f"reward_{k}": float(np.nanmean(v)) if np.isfinite(v).any() else None for k, v in parts.items()},
                       **per_category(rollouts, rewards))
        done = step + 1
        if rl.ref_sync_every and done % rl.ref_sync_every == 0:
            reference = sync_reference(reference, run.full_params())
        run.log.log(done, metrics)
        rollout_rows += [{"step": done, "prompt_id": r.prompt.id, "category": r.prompt.category, "status": r.status,
                          "reward": float(v), "advantage": float(a), "completion": r.text}
                         for r, v, a in zip(rollouts, rewards, advantages)]
        bar.set_postfix(reward=f"{metrics['reward']:.3f}", kl=f"{metrics.get('kl', 0.0):.4f}",
                        entropy=f"{metrics['entropy']:.2f}", gap=f"{metrics['logprob_gap']:.1e}")
        if done % train.save_every == 0 or done == rl.steps:
            if jax.process_index() == 0:
                write_atomic(out / "rollouts.jsonl", jsonl_text(rollout_rows))
            run.save(done, {"step": done}, {"reference": reference} if rl.ref_sync_every else None)
    export_dir = run.finish(out / "export", policy)
    summary = rl_summary(run.log.rows, rl.steps, export_dir)
    if jax.process_index() == 0:
        write_atomic(summary_path, json.dumps(summary, indent=2) + "\n")
    return summary


def mix_params(reference, policy, *, mix: float):
    """mix * policy + (1 - mix) * reference, leaf by leaf, in the reference's dtype (TR-DPO's soft update)."""
    def one(r, p):
        return (mix * p.astype(jnp.float32) + (1.0 - mix) * r.astype(jnp.float32)).astype(r.dtype)

    return jax.tree.map(one, reference, policy)


def rl_summary(rows: list[dict], steps: int, export_dir: str | None) -> dict:
    rewards = [r["reward"] for r in rows if "reward" in r]
    window = max(1, len(rewards) // 4)  # first and last quarter of the run, to see past the sampling noise
    return {"steps": steps, "start_reward": float(np.mean(rewards[:window])) if rewards else None,
            "end_reward": float(np.mean(rewards[-window:])) if rewards else None,
            "final_kl": rows[-1].get("kl") if rows else None,
            "max_logprob_gap": max((r["logprob_gap"] for r in rows if "logprob_gap" in r), default=None),
            "export": export_dir, "complete": True}
