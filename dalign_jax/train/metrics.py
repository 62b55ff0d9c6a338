"""What a training run reports: a JSONL of metrics per step (rewritten atomically, so a kill never
leaves half a line), TensorBoard event files, and throughput as tokens/s and model FLOPs utilisation."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from dalign_jax.model.config import ModelConfig
from dalign_jax.model.transformer import param_shapes

T = TypeVar("T")


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that take part in a matrix product per token: every layer matrix and the vocabulary
    projection (the embedding lookup is not a product)."""
    shapes = param_shapes(cfg)
    layer = sum(math.prod(s) for s in shapes["layers"][0].values() if len(s) == 2)
    return layer * cfg.num_layers + cfg.vocab_size * cfg.hidden_size


def train_flops_per_token(cfg: ModelConfig) -> float:
    """6 N: a forward (2 N) and backward (4 N) pass; attention scores are left out, as is usual for MFU."""
    return 6.0 * matmul_params(cfg)


def measure_peak_flops(size: int = 2048, repeats: int = 5, dtype=jnp.float32) -> float:
    """The matmul rate of the first device with operands in `dtype` and sums in float32 (the model's
    own form under `models.matmul_dtype`), in FLOP/s: the ceiling MFU is measured against."""
    device = jax.devices()[0]
    a = jax.device_put(jnp.ones((size, size), dtype), device)
    matmul = jax.jit(lambda x: jnp.matmul(x, x, preferred_element_type=jnp.float32))
    matmul(a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


# Dense bfloat16 peak FLOP/s per chip, from the vendors' data sheets (device_kind substring -> peak).
PEAK_BF16 = [("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12),
             ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
             ("TPU v4", 275e12)]


def device_peak(dtype) -> tuple[float, str]:
    """The first device's peak FLOP/s with `dtype` operands and where the figure comes from: the data
    sheet for a known accelerator in bfloat16, else a measured matmul."""
    device = jax.devices()[0]
    if device.platform != "cpu" and jnp.dtype(dtype) == jnp.bfloat16:
        for name, peak in PEAK_BF16:
            if name.lower() in device.device_kind.lower():
                return peak, f"{device.device_kind} data sheet, dense bfloat16"
    size = 2048 if device.platform == "cpu" else 8192
    return measure_peak_flops(size, dtype=dtype), f"measured {jnp.dtype(dtype).name} matmul {size}^3"


def peak_flops_around(work: Callable[[], T], dtype=jnp.float32) -> tuple[T, float, float]:
    """`work()`'s result, the ceiling for it (the best matmul rate with `dtype` operands timed just
    before and just after it: the machine's speed drifts by up to 10% between runs, and a peak is never
    overstated by its fastest trial), and the rate before alone (printed by the benchmarks)."""
    before = measure_peak_flops(dtype=dtype)
    result = work()
    return result, max(before, measure_peak_flops(dtype=dtype)), before


class MetricsLog:
    """Rows of {"step": n, ...}. On resume, rows after the restored step are dropped (they will be
    recomputed), in the JSONL and, through `purge_step`, in TensorBoard."""

    def __init__(self, directory: Path, resume_step: int, enabled: bool = True):
        from dalign_jax.data.records import read_jsonl

        self.path = directory / "metrics.jsonl"
        self.enabled = enabled
        self.rows = [r for r in read_jsonl(self.path) if r["step"] <= resume_step] if self.path.is_file() else []
        self.writer = None
        if enabled:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(directory / "tensorboard"), purge_step=resume_step + 1 or None)

    def log(self, step: int, values: dict) -> None:
        from dalign_jax.data.records import jsonl_text, write_atomic

        row = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        self.rows.append(row)
        if not self.enabled:
            return
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                self.writer.add_scalar(k, v, step)
        write_atomic(self.path, jsonl_text(self.rows))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _plain(v):
    if isinstance(v, (np.ndarray, jax.Array)):
        v = v.item()
    if isinstance(v, (np.floating, np.integer)):
        v = v.item()
    return round(v, 6) if isinstance(v, float) else v


def as_host(metrics: dict) -> dict:
    return {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}
