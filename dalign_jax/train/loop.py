"""What SFT and RL share around their own work per step: restore or start, the compiled step, the
non-finite guard, logging, checkpoints, the progress bar and the export."""
from __future__ import annotations

import sys
from pathlib import Path

import jax
from tqdm import tqdm

from dalign_jax.train.checkpoint import Checkpointer, check_finite, restore_or_start
from dalign_jax.train.metrics import MetricsLog, as_host
from dalign_jax.train.step import compile_train_step


class TrainingRun:
    """One stage's training: `state` resumes from the latest checkpoint in `out`/checkpoints (at
    `start`, with the data iterator's saved `data_state`), `update` runs the compiled step."""

    def __init__(self, name: str, out: Path, trainable, optimizer, schedule, loss_fn, mesh, train, steps: int):
        self.name, self.steps = name, steps
        self.trainable = trainable
        self.checkpoints = Checkpointer(out / "checkpoints", train.keep_checkpoints)
        self.state, self.sharding, self.start, self.data_state = restore_or_start(
            self.checkpoints, trainable.take_initial(), optimizer, mesh, train.shard_optimizer)
        if jax.process_index() == 0:
            print(f"{name}: {trainable.describe()}", file=sys.stderr, flush=True)  # stdout: the summary JSON
        self.step_fn = compile_train_step(loss_fn, optimizer, schedule, self.sharding, mesh, trainable,
                                          shard_optimizer=train.shard_optimizer)
        self.log = MetricsLog(out, self.start, enabled=jax.process_index() == 0)

    def steps_left(self) -> tqdm:
        return tqdm(range(self.start, self.steps), initial=self.start, total=self.steps, desc=self.name, unit="step",
                    disable=jax.process_index() != 0)

    def update(self, batch, step: int) -> dict:
        """One optimiser step on `batch` (the `step`-th, from 0); its metrics on the host, finite."""
        self.state, metrics = self.step_fn(self.state, batch)
        metrics = as_host(metrics)
        check_finite(metrics, step + 1, self.checkpoints)
        return metrics

    def full_params(self):
        """The model's parameters now (with LoRA, the adapters merged into the frozen base)."""
        return self.trainable.full_params(self.state.params)

    def save(self, done: int, data_state, extra: dict | None = None) -> None:
        self.checkpoints.save(done, self.state, data_state, {"step": done, "steps": self.steps}, extra)

    def finish(self, export_dir: Path | None, model) -> str | None:
        """Close the log and the checkpoints; write the HF export (every process takes part) unless
        `export_dir` is None. Process 0 gets the export's path."""
        self.log.close()
        self.checkpoints.close()
        return export_trained(export_dir, model, self.full_params()) if export_dir is not None else None


def export_trained(directory: Path, model, params) -> str | None:
    """Write trained parameters as a HF directory. Every process must call this: gathering the
    parameters is a collective on multi-host. Process 0 writes; it alone returns the path."""
    import jax

    from dalign_jax.model.hf_io import export_hf
    from dalign_jax.train.step import host_params

    gathered = host_params(params)
    if jax.process_index() != 0:
        return None
    return str(export_hf(directory, model.hf_config, model.cfg, gathered, model.tokenizer,
                         generation=model.generation))
