"""`dalign run`: every stage in order, each skipping the work its outputs show is done (a rerun after
a crash picks up inside the stage that was running)."""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile

from dalign_jax.config import Config, config_to_dict
from dalign_jax.errors import UserError
from dalign_jax.stages.inputs import check_registered

ORDER = [("distill", "run_distill"), ("judge", "run_judge"), ("sft", "run_sft"), ("rl", "run_rl"),
         ("eval", "run_eval"), ("report", "run_report")]


def training_in_child_process() -> bool:
    """Whether sft and rl run as `dalign sft` / `dalign rl` child processes, which reuse freed host
    memory (see dalign_jax.hostmem and cli.HEAP_REUSE_COMMANDS): on XLA:CPU the default model's SFT
    step took 5.0 s there against 6.2-6.6, while the sampler stages, which lose 6-8% with one malloc
    arena, stay in this process. Not on accelerators (this process holds the device) nor across hosts
    (this process holds its place in jax.distributed), nor where heap reuse would not be set."""
    import jax

    from dalign_jax.hostmem import heap_reuse_environment, heap_reuse_supported

    return (jax.default_backend() == "cpu" and jax.process_count() == 1 and heap_reuse_supported()
            and heap_reuse_environment(dict(os.environ)) is not None)


def run_in_child_process(stage: str, config: Config, force: bool) -> dict:
    """`dalign STAGE` on the resolved config, in a child process; its summary, as the stage returns it."""
    import yaml

    config.run_path.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix=f".{stage}-config-", dir=config.run_path,
                                     delete=False) as f:
        yaml.safe_dump(config_to_dict(config), f, sort_keys=False)
    try:
        command = [sys.executable, "-m", "dalign_jax.cli", stage, f.name] + (["--force"] if force else [])
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    finally:
        os.unlink(f.name)
    if done.returncode != 0:
        raise UserError(f"{stage}: its process exited with status {done.returncode} (its message is above)")
    return json.loads(done.stdout)


def run_pipeline(config: Config, force: bool = False) -> dict:
    check_registered(config)  # before distill's hour, not at RL
    results = {}
    in_child = training_in_child_process()
    for number, (module, function) in enumerate(ORDER, 1):
        print(f"[{number}/{len(ORDER)}] {module}", file=sys.stderr, flush=True)
        if in_child and module in ("sft", "rl"):
            summary = run_in_child_process(module, config, force)
        else:
            stage = getattr(importlib.import_module(f"dalign_jax.stages.{module}"), function)
            summary = stage(config, force=force)
        results[module] = {k: v for k, v in summary.items() if not isinstance(v, (dict, list))}
    results["export"] = results["rl"].get("export")
    return results
