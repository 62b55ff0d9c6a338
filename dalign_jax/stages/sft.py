"""Stage: supervised fine-tuning of the policy on the judged, spec-free distilled set.

Outputs in run_dir/sft: checkpoints/ (orbax: state, data iterator, facts; the last
`train.keep_checkpoints`), metrics.jsonl and tensorboard/ (loss, learning rate, grad norm, tokens/s,
MFU, held-out loss), export/ (the final model as a HF directory), summary.json. A rerun resumes from
the latest checkpoint and reproduces an uninterrupted run exactly.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import time
from pathlib import Path

import jax
import numpy as np

from dalign_jax.config import Config, Train
from dalign_jax.data.records import write_atomic
from dalign_jax.data.sft_data import (
    ConversationSource,
    batches,
    collate,
    count_batches,
    length_buckets,
    split_indices,
    tokenize_conversation,
)
from dalign_jax.engine.chat import stop_token_ids
from dalign_jax.errors import UserError
from dalign_jax.parallel.mesh import batch_size_multiple
from dalign_jax.stages.inputs import open_mesh, open_model
from dalign_jax.stages.outputs import check_run_header, ensure_writable, section
from dalign_jax.train.loop import TrainingRun
from dalign_jax.train.lora import LoraConfig, Trainable
from dalign_jax.train.metrics import measure_peak_flops, train_flops_per_token
from dalign_jax.train.optim import learning_rate_schedule, make_optimizer
from dalign_jax.train.step import (
    COMPUTE_DTYPES,
    batch_shardings,
    compile_eval_loss,
    device_batch,
    sft_loss,
)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def sft_data_path(config: Config) -> Path:
    if config.sft.data:
        return Path(config.sft.data)
    judge_dir = config.run_path / "judge"
    summary = judge_dir / "summary.json"
    if not summary.is_file() or not json.loads(summary.read_text()).get("complete"):
        raise UserError(f"{judge_dir}: no finished judge stage; run `dalign judge` first or set sft.data")
    return judge_dir / "sft.array_record"


class HeldoutLoss:
    """Mean completion-token loss over the held-out examples, in padded batches of fixed row count."""

    def __init__(self, source, indices, tokenizer, rows: int, max_len: int, evaluate, mesh, stops=()):
        examples = [tokenize_conversation(tokenizer, source[i]["messages"], max_len, stops) for i in indices]
        blank = {"tokens": np.zeros(1, np.int32), "loss_mask": np.zeros(1, np.int32)}  # weight 0
        pad_id = tokenizer.pad_token_id or 0
        buckets = length_buckets(max_len)
        self.batches = []
        for b in range(0, len(examples), rows):
            chunk = examples[b:b + rows]
            chunk += [blank] * (rows - len(chunk))
            self.batches.append(collate(chunk, buckets, pad_id))
        self.evaluate = evaluate
        self.mesh = mesh

    def __call__(self, params) -> float | None:
        if not self.batches:
            return None
        total = weight = 0.0
        for local in self.batches:
            # Every process holds the same rows, so each fills its own shards from them.
            batch = {k: jax.make_array_from_callback(v.shape, s, lambda index, v=v: v[index])
                     for (k, v), s in zip(local.items(), jax.tree.leaves(batch_shardings(local, self.mesh, False)))}
            loss, w = self.evaluate(params, batch)
            total, weight = total + float(loss), weight + float(w)
        return total / max(weight, 1.0)


def planned_steps(config: Config, train_examples: int) -> int:
    if config.sft.steps:
        return config.sft.steps
    per_step = config.sft.batch_size * config.sft.train.grad_accum
    return max(1, math.ceil(config.sft.epochs * train_examples / per_step))


def make_loss(cfg, train: Train, neftune_alpha: float = 0.0):
    return functools.partial(sft_loss, cfg=cfg, compute_dtype=COMPUTE_DTYPES[train.compute_dtype], remat=train.remat,
                             neftune_alpha=neftune_alpha)


def noise_seeds(seed: int, step: int, global_rows: int, local_rows: int) -> np.ndarray:
    """One NEFTune seed per row of this process's share of step `step`'s batch, distinct over the run's
    rows and processes, and the same again when a resumed run redoes the step."""
    first = step * global_rows + jax.process_index() * local_rows
    return ((seed * 1_000_003 + first + np.arange(local_rows, dtype=np.int64)) % (1 << 31)).astype(np.int32)


def run_sft(config: Config, force: bool = False) -> dict:

    out = config.run_path / "sft"
    data_path = sft_data_path(config)
    source = ConversationSource(data_path)
    train_idx, heldout_idx = split_indices(source, config.sft.heldout_fraction)
    if not train_idx:
        raise UserError(f"{data_path}: no training examples left after holding out {config.sft.heldout_fraction}")
    ensure_writable(out)
    mesh = open_mesh(config, "sft")
    rows, accum = config.sft.batch_size, config.sft.train.grad_accum
    if rows % batch_size_multiple(mesh):
        raise UserError(f"sft.batch_size {rows} must be a multiple of mesh data x fsdp = {batch_size_multiple(mesh)}")
    model = open_model(config, config.models.policy)
    check_run_header(out, {"policy_model_id": model.model_id, "data": str(data_path), "data_digest": file_digest(data_path),
                           "sft": section(config, "sft"), "seed": config.seed, "mesh": section(config, "mesh")}, force)
    summary_path = out / "summary.json"
    if summary_path.is_file():
        return json.loads(summary_path.read_text())

    train = config.sft.train
    capability = ((ConversationSource(config.sft.capability_data), config.sft.capability_ratio)
                  if config.sft.capability_data else None)
    stops = stop_token_ids(model)  # each assistant turn's loss runs through its end-of-turn token
    make_stream = functools.partial(
        batches, source, train_idx, model.tokenizer, global_batch=rows * accum, max_len=config.sft.max_seq_len,
        seed=config.seed, process_index=jax.process_index(), process_count=jax.process_count(),
        capability=capability, packing=config.sft.packing, stops=stops)
    if config.sft.packing and not config.sft.steps:
        # `epochs` passes over the examples (and the capability share beside them): how many packed
        # batches that makes is known only by packing them.
        examples = math.ceil(config.sft.epochs * len(train_idx) / (1 - (capability[1] if capability else 0.0)))
        stream = make_stream(num_batches=None, num_examples=examples)
        steps = count_batches(stream)
        if not steps:
            raise UserError(f"sft: {examples} examples fill fewer than one packed batch of {rows * accum} rows; "
                            "raise sft.epochs or lower sft.batch_size")
    else:
        steps = planned_steps(config, len(train_idx))
        stream = make_stream(num_batches=steps)
    optimizer = make_optimizer(train, steps)
    schedule = learning_rate_schedule(train, steps)
    loss_fn = make_loss(model.cfg, train, config.sft.neftune_alpha)
    trainable = Trainable(model.params, LoraConfig.from_train(train), mesh, config.seed)
    run = TrainingRun("sft", out, trainable, optimizer, schedule, loss_fn, mesh, train, steps)
    del model.params  # the state (or, with LoRA, the frozen base) holds them now

    data = iter(stream)
    if run.data_state is not None:
        data.set_state(run.data_state)
    heldout = HeldoutLoss(source, heldout_idx, model.tokenizer, rows, config.sft.max_seq_len,
                          compile_eval_loss(loss_fn, trainable.param_sharding, mesh), mesh, stops)
    if run.start == 0:
        run.log.log(0, {"eval_loss": heldout(run.full_params())})
    peak = train.peak_flops or measure_peak_flops(dtype=model.cfg.matmul_dtype)
    flops_per_token = train_flops_per_token(model.cfg)

    bar = run.steps_left()
    for step in bar:
        local = next(data)
        if config.sft.neftune_alpha:
            local = dict(local, noise_seed=noise_seeds(config.seed, step, rows * accum, len(local["tokens"])))
        batch = device_batch(local, mesh, accum)
        started = time.perf_counter()
        metrics = run.update(batch, step)
        seconds = time.perf_counter() - started
        tokens = int((local["positions"] >= 0).sum()) * jax.process_count()
        metrics.update(tokens=tokens, seconds=seconds, tokens_per_s=tokens / seconds,
                       mfu=tokens * flops_per_token / seconds / (peak * mesh.devices.size))
        done = step + 1
        if done % config.sft.eval_every == 0 or done == steps:
            metrics["eval_loss"] = heldout(run.full_params())
        if done % train.log_every == 0 or "eval_loss" in metrics:
            run.log.log(done, metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['learning_rate']:.2e}",
                        tok_s=f"{metrics['tokens_per_s']:.0f}")
        if done % train.save_every == 0 or done == steps:
            run.save(done, data.get_state())
    export_dir = run.finish(out / "export" if config.sft.export else None, model)
    summary = _summary(run.log.rows, steps, len(train_idx), len(heldout_idx), peak, export_dir)
    summary["trainable_params"] = trainable.count
    if jax.process_index() == 0:
        write_atomic(summary_path, json.dumps(summary, indent=2) + "\n")
    return summary


def _summary(rows: list[dict], steps: int, n_train: int, n_heldout: int, peak: float, export_dir) -> dict:
    evals = [r["eval_loss"] for r in rows if r.get("eval_loss") is not None]
    timed = [r for r in rows if "tokens_per_s" in r][1:]  # the first step compiles
    return {
        "steps": steps, "train_examples": n_train, "heldout_examples": n_heldout,
        "initial_eval_loss": evals[0] if evals else None, "final_eval_loss": evals[-1] if evals else None,
        "final_train_loss": next((r["loss"] for r in reversed(rows) if "loss" in r), None),
        "tokens_per_s": float(np.median([r["tokens_per_s"] for r in timed])) if timed else None,
        "mfu": float(np.median([r["mfu"] for r in timed])) if timed else None,
        "peak_flops": peak, "export": export_dir, "complete": True,
    }
