"""SFT training throughput: our compiled train step against HF transformers' `Trainer` (PyTorch, CPU).

Same model (the embedded default, float32 weights), same batches (BATCH rows of LENGTH real tokens, loss on
every token), same optimiser (AdamW, clipping at 1.0). Both are timed over the steps after the first
(ours compiles there, the peer warms up). Ours runs first, so the peak resident memory printed for
ours is the process's before PyTorch is loaded.
On a CPU, ours runs on one XLA device (`--devices`), as `dalign sft` does there: with freed memory
kept for reuse (dalign_jax/hostmem.py) one device ran 198 tokens/s against 174 for two on the 2-core
machine (2026-11-30; before, both about 150 on that machine, 320-344 and 321-333 on a faster one).
The process is started again with glibc's heap-reuse tunables, as `dalign sft` is, so the peer is timed
twice: in a fresh process with glibc's default malloc, as HF's Trainer runs for its users (the
headline ratio), and in this process, under our malloc settings.
With `--matmul-dtype bfloat16` ours takes bf16 matmul operands (`models.matmul_dtype`) and the peer
runs with `bf16=True` (PyTorch's CPU autocast: bf16 matmuls, float32 weights), as an HF user would ask
for the same.
Last lines: RESULT sft_tokens_per_s_same_malloc ours=<x> peer=<x> ratio=<x>, RESULT sft_tokens_per_s
ours=<x> peer=<x> ratio=<ours/peer>, RESULT sft_mfu ours=<x>, RESULT sft_peak_rss_gb ours=<x>.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cpu_devices import add_devices_argument, use_cpu_devices  # (tools/ is on the path when a tool runs)

from dalign_jax.hostmem import OPT_OUT, reexec_with_heap_reuse

OUR_DEVICES = 1  # the default of --devices: one, as `dalign sft` runs on a CPU

if __name__ == "__main__":  # as `dalign sft` runs (see dalign_jax/hostmem.py); the device count before JAX starts
    reexec_with_heap_reuse()
    use_cpu_devices(default=OUR_DEVICES)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dalign_jax.config import Train  # noqa: E402
from dalign_jax.model.hf_io import export_hf  # noqa: E402
from dalign_jax.model.loader import DEFAULT_MODEL, load_model  # noqa: E402
from dalign_jax.parallel.mesh import make_mesh  # noqa: E402
from dalign_jax.train.metrics import peak_flops_around, train_flops_per_token  # noqa: E402
from dalign_jax.train.optim import learning_rate_schedule, make_optimizer  # noqa: E402
from dalign_jax.train.step import compile_train_step, device_batch, init_state, sft_loss  # noqa: E402
from peer_timing import step_timer  # noqa: E402  (tools/ is on the path when a tool runs)


def make_batches(vocab: int, rows: int, length: int, count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, vocab, (rows, length)).astype(np.int32) for _ in range(count)]


def bench_ours(model, batches, remat: bool, shard_optimizer: bool):
    mesh = make_mesh()
    train = Train(learning_rate=1e-5, warmup_steps=0, remat=remat)
    optimizer = make_optimizer(train, len(batches))
    state, sharding = init_state(model.params, optimizer, mesh, shard_optimizer)
    step = compile_train_step(functools.partial(sft_loss, cfg=model.cfg, remat=remat), optimizer,
                              learning_rate_schedule(train, len(batches)), sharding, mesh,
                              shard_optimizer=shard_optimizer)
    times, losses = [], []
    for tokens in batches:
        local = {"tokens": tokens, "positions": np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32),
                                                                tokens.shape).copy(),
                 "loss_mask": np.ones_like(tokens)}
        t0 = time.perf_counter()
        state, metrics = step(state, device_batch(local, mesh, 1))
        losses.append(float(metrics["loss"]))
        times.append(time.perf_counter() - t0)
    tokens = batches[0].size
    return tokens * (len(times) - 1) / sum(times[1:]), times[0], losses


def bench_peer(model_dir, batches, bf16: bool = False):
    import torch
    import transformers

    # From our float32 HF export: the Trainer refuses a model loaded from a GGUF file (it counts as
    # quantised even though transformers dequantises it).
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    rows = [{"input_ids": r.tolist(), "labels": r.tolist()} for b in batches for r in b]

    timer = step_timer()
    args = transformers.TrainingArguments(
        output_dir="/tmp/bench_sft_peer", per_device_train_batch_size=batches[0].shape[0], max_steps=len(batches),
        learning_rate=1e-5, max_grad_norm=1.0, lr_scheduler_type="constant", logging_strategy="no",
        save_strategy="no", report_to=[], use_cpu=True, dataloader_drop_last=True, disable_tqdm=True, bf16=bf16)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows, callbacks=[timer],
                                   data_collator=transformers.default_data_collator)
    trainer.train()
    return batches[0].size * (len(timer.times) - 1) / sum(timer.times[1:])


def bench_peer_as_shipped(model_dir, args) -> float:
    """The peer in a fresh process with glibc's default malloc, as HF's Trainer runs for its users (this
    process keeps freed memory for reuse, as `dalign` does, and the peer here gains from that too)."""
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env[OPT_OUT] = "1"
    command = [sys.executable, __file__, f"--peer-only={model_dir}", f"--batch={args.batch}",
               f"--length={args.length}", f"--steps={args.steps}", f"--matmul-dtype={args.matmul_dtype}"]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    print(out, end="", flush=True)
    return float(re.search(r"^peer_tokens_per_s=(\S+)$", out, re.M).group(1))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6, help="timed steps (one more is run first)")
    parser.add_argument("--remat", action="store_true")
    parser.add_argument("--replicate-optimizer", action="store_true",
                        help="every data-parallel device updates all parameters (default: each its share)")
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--matmul-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="ours as under models.matmul_dtype (MFU against that dtype's matmul ceiling), "
                             "the peer with bf16=True")
    parser.add_argument("--peer-only", help=argparse.SUPPRESS)  # the as-shipped peer's own process: a model dir
    add_devices_argument(parser, default=OUR_DEVICES)
    args = parser.parse_args()

    if args.peer_only:
        vocab = json.loads((Path(args.peer_only) / "config.json").read_text())["vocab_size"]
        batches = make_batches(vocab, args.batch, args.length, args.steps + 1)
        bf16 = args.matmul_dtype == "bfloat16"
        print(f"peer_tokens_per_s={bench_peer(Path(args.peer_only), batches, bf16)}")
        return
    model = load_model(DEFAULT_MODEL, matmul_dtype=args.matmul_dtype)
    batches = make_batches(model.cfg.vocab_size, args.batch, args.length, args.steps + 1)
    (ours, first_s, losses), peak, before = peak_flops_around(
        lambda: bench_ours(model, batches, args.remat, not args.replicate_optimizer), dtype=args.matmul_dtype)
    print(f"devices: {jax.devices()}; {args.matmul_dtype} matmul ceiling {peak / 1e9:.1f} GFLOP/s "
          f"(before ours {before / 1e9:.1f})", flush=True)
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    mfu = ours * train_flops_per_token(model.cfg) / peak
    print(f"ours: {ours:.1f} tokens/s, first step (compiles) {first_s:.1f} s, losses {np.round(losses, 3)}", flush=True)
    peer = same_malloc_peer = float("nan")
    if not args.skip_peer:
        with tempfile.TemporaryDirectory() as tmp:
            export_hf(Path(tmp) / "model", model.hf_config, model.cfg, model.params, model.tokenizer)
            peer = bench_peer_as_shipped(Path(tmp) / "model", args)
            same_malloc_peer = bench_peer(Path(tmp) / "model", batches, args.matmul_dtype == "bfloat16")
    print(f"peer: {peer:.1f} tokens/s as shipped, {same_malloc_peer:.1f} with our malloc settings", flush=True)
    print(f"RESULT sft_tokens_per_s_same_malloc ours={ours:.1f} peer={same_malloc_peer:.1f} "
          f"ratio={ours / same_malloc_peer:.2f}")
    print(f"RESULT sft_tokens_per_s ours={ours:.1f} peer={peer:.1f} ratio={ours / peer:.2f}")
    print(f"RESULT sft_mfu ours={mfu:.2f}")
    print(f"RESULT sft_peak_rss_gb ours={rss_gb:.2f}")


if __name__ == "__main__":
    main()
