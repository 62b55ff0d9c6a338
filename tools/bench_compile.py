"""Compile time against depth: the SFT loss's value and gradient for random Llama-layout models of
8, 16, 32 and 64 layers, with the layers unrolled (the CPU default) and scanned (`models.scan_layers`).

The layers are small (hidden 256), so the figure is XLA's work per layer rather than the matmuls';
the time is `jit(...).lower(...).compile()`, traced and compiled afresh for each model.

  python tools/bench_compile.py                # 8, 16, 32, 64 layers
  python tools/bench_compile.py --layers 2 4   # a quick look

Last lines: RESULT compile_s_<n>_layers unrolled=<s> scanned=<s> ratio=<unrolled / scanned>, per depth.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp

from dalign_jax.model.config import ModelConfig, RopeConfig
from dalign_jax.model.transformer import init_params
from dalign_jax.train.step import sft_loss

SMALL = ModelConfig(family="llama", vocab_size=1024, hidden_size=256, intermediate_size=768, num_layers=8,
                    num_heads=8, num_kv_heads=4, head_dim=32, rms_norm_eps=1e-5, max_position=4096,
                    tie_embeddings=True, rope=RopeConfig(theta=10000.0))


def compile_seconds(cfg: ModelConfig, rows: int, length: int) -> float:
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    batch = {"tokens": jax.ShapeDtypeStruct((rows, length), jnp.int32),
             "positions": jax.ShapeDtypeStruct((rows, length), jnp.int32),
             "loss_mask": jax.ShapeDtypeStruct((rows, length), jnp.float32)}

    def loss(params, batch):
        total, weight, _ = sft_loss(params, batch, cfg=cfg)
        return total / weight

    start = time.perf_counter()
    jax.jit(jax.value_and_grad(loss)).lower(params, batch).compile()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    args = parser.parse_args()
    print(f"devices: {jax.devices()[0].device_kind} x {jax.device_count()}; jax {jax.__version__}")
    results = []
    for n in args.layers:
        cfg = dataclasses.replace(SMALL, num_layers=n)
        unrolled = compile_seconds(cfg, args.rows, args.length)
        scanned = compile_seconds(dataclasses.replace(cfg, scan_layers=True), args.rows, args.length)
        print(f"{n:3d} layers: unrolled {unrolled:6.2f} s, scanned {scanned:6.2f} s", flush=True)
        results.append((n, unrolled, scanned))
    for n, unrolled, scanned in results:
        print(f"RESULT compile_s_{n}_layers unrolled={unrolled:.2f} scanned={scanned:.2f} "
              f"ratio={unrolled / scanned:.2f}")


if __name__ == "__main__":
    main()
