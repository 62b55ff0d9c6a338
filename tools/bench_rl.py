"""GRPO step time: ours against TRL's `GRPOTrainer` (PyTorch, CPU), the same work per step.

Both: the embedded default (float32), PROMPTS prompts x G completions x NEW_TOKENS new tokens sampled
at temperature 1 (exactly NEW_TOKENS: no stop token), a reward function of the same (negligible)
cost, the GRPO loss with a KL penalty to the frozen reference (beta 0.02), one optimiser step.
Ours is timed over the steps after the first (which compiles); so is TRL's.
On a CPU ours trains over one virtual XLA device per core (`--devices`, as bench_sft) and samples on
the first of them alone (`--rollout-devices`, as `rl.rollout_mesh`): decoding is bound by reading the
weights, and two virtual devices on one memory read them twice per token.
Last line: RESULT rl_step_s ours=<s> peer=<s> ratio=<peer/ours>.
"""
from __future__ import annotations

import argparse
import functools
import tempfile
import time
from pathlib import Path

from cpu_devices import add_devices_argument, use_cpu_devices  # (tools/ is on the path when a tool runs)

if __name__ == "__main__":  # the device count must be set before JAX is imported
    use_cpu_devices()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dalign_jax.config import Train  # noqa: E402
from dalign_jax.engine.chat import encode_chat  # noqa: E402
from dalign_jax.engine.sampler import Sampler, SamplingParams  # noqa: E402
from dalign_jax.model.hf_io import export_hf  # noqa: E402
from dalign_jax.model.loader import DEFAULT_MODEL, load_model  # noqa: E402
from dalign_jax.parallel.mesh import make_mesh, param_shardings, shard_params  # noqa: E402
from dalign_jax.rl.advantages import ADVANTAGES  # noqa: E402
from dalign_jax.rl.losses import rl_loss  # noqa: E402
from dalign_jax.stages.rl import training_batch  # noqa: E402
from dalign_jax.train.optim import learning_rate_schedule, make_optimizer  # noqa: E402
from dalign_jax.train.step import compile_batch_logprobs, compile_train_step, device_batch, init_state  # noqa: E402
from peer_timing import step_timer  # noqa: E402  (tools/ is on the path when a tool runs)

PROMPTS = ["How do I safely store cleaning chemicals at home?", "Write a short poem about the sea."]
BETA = 0.02


def reward(lengths) -> np.ndarray:
    """The same cheap reward on both sides: prefer shorter completions (in characters)."""
    return -np.asarray(lengths, np.float32) / 1000.0


def bench_ours(model, group: int, new_tokens: int, steps: int, rollout_devices: int):
    mesh = make_mesh()
    rollout_mesh = make_mesh(devices=jax.devices()[:rollout_devices]) if rollout_devices else mesh
    train = Train(learning_rate=1e-6, warmup_steps=0)
    optimizer = make_optimizer(train, steps + 1)
    loss_fn = functools.partial(rl_loss, cfg=model.cfg, temperature=1.0, clip_low=0.2, clip_high=0.2, kl_coef=BETA,
                                aggregation="token_mean", max_tokens=new_tokens)
    state, sharding = init_state(model.params, optimizer, mesh, shard_optimizer=True)
    step = compile_train_step(loss_fn, optimizer, learning_rate_schedule(train, steps + 1), sharding, mesh,
                              shard_optimizer=True)
    reference = shard_params(model.params, mesh)
    reference_logp = compile_batch_logprobs(model.cfg, param_shardings(reference, mesh), mesh)
    sampler = Sampler(model.cfg, rollout_mesh, pad_id=model.tokenizer.pad_token_id or 0, prefix_min_tokens=0)
    encoded = [encode_chat(model.tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS for _ in range(group)]
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        out = sampler.generate(state.params, encoded, new_tokens, jax.random.key(i), SamplingParams(temperature=1.0))
        t1 = time.perf_counter()
        texts = [model.tokenizer.decode(t) for t in out.content()]
        rewards = reward([len(t) for t in texts])
        advantages = np.asarray(ADVANTAGES["grpo"](jnp.asarray(rewards.reshape(len(PROMPTS), group)))).reshape(-1)
        local = training_batch(encoded, out.tokens, out.logprobs, advantages, model.tokenizer.pad_token_id or 0,
                               max(map(len, encoded)))
        batch = device_batch(local, mesh, 1)
        batch["ref_logp"] = jax.block_until_ready(reference_logp(reference, batch))
        t2 = time.perf_counter()
        state, metrics = step(state, batch)
        float(metrics["loss"])
        times.append(time.perf_counter() - t0)
        print(f"ours step {i}: {times[-1]:.1f} s (sampling {t1 - t0:.1f} s, reference {t2 - t1:.1f} s, update "
              f"{times[-1] - t2 + t0:.1f} s of {batch['tokens'].shape[-1]}-token rows; logprob gap "
              f"{float(metrics['logprob_gap']):.1e})", flush=True)
    return float(np.mean(times[1:]))


def bench_peer(model_dir: Path, group: int, new_tokens: int, steps: int):
    import datasets
    import trl

    def length_reward(completions, **kwargs):
        return reward([len(c[0]["content"]) for c in completions]).tolist()

    data = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in PROMPTS] * (steps + 1))
    args = trl.GRPOConfig(
        output_dir="/tmp/bench_rl_peer", per_device_train_batch_size=len(PROMPTS) * group, num_generations=group,
        max_completion_length=new_tokens, temperature=1.0, beta=BETA, learning_rate=1e-6, max_steps=steps + 1,
        logging_steps=1000, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        generation_kwargs={"min_new_tokens": new_tokens})
    timer = step_timer()
    trainer = trl.GRPOTrainer(model=str(model_dir), reward_funcs=length_reward, args=args, train_dataset=data,
                              callbacks=[timer])
    trainer.train()
    return float(np.mean(timer.times[1:]))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2, help="timed steps (one more is run first)")
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--rollout-devices", type=int, default=1, help="devices ours samples on (0: all)")
    add_devices_argument(parser)
    args = parser.parse_args()
    model = load_model(DEFAULT_MODEL)
    print(f"devices: {jax.devices()}", flush=True)
    ours = bench_ours(model, args.group, args.new_tokens, args.steps, args.rollout_devices)
    peer = float("nan")
    if not args.skip_peer:
        with tempfile.TemporaryDirectory() as tmp:
            export_hf(Path(tmp) / "model", model.hf_config, model.cfg, model.params, model.tokenizer)
            peer = bench_peer(Path(tmp) / "model", args.group, args.new_tokens, args.steps)
    print(f"RESULT rl_step_s ours={ours:.1f} peer={peer:.1f} ratio={peer / ours:.2f}")


if __name__ == "__main__":
    main()
