"""Crash safety of judge, RL and eval (distill and SFT have their own tests): a run killed with SIGKILL
at a random point and rerun ends with the same outputs as an uninterrupted run, compared by content
(and RL's parameters bit for bit), and no half-written file is ever visible under its final name."""
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from dalign_jax.config import load_config
from dalign_jax.model.hf_io import load_hf_dir
from dalign_jax.stages.distill import run_distill

SETTINGS = {
    "judge": ["distill.shard_size=1"],
    "rl": ["rl.steps=4", "rl.prompts_per_step=1", "rl.group_size=2", "rl.max_new_tokens=8", "rl.train.save_every=1"],
    "eval": ["eval.heldout=false", "eval.max_new_tokens=8", "eval.batch_size=4"],
}
# The file whose appearance means the stage is part-way through.
MARKERS = {"judge": "judge/scored-00000.jsonl", "rl": "rl/metrics.jsonl", "eval": "eval/base/extra.jsonl"}


def _outputs(run: Path, stage: str) -> dict:
    """The stage's outputs by content: JSONL records (timings dropped), and RL's exported parameters."""
    out = {}
    for f in sorted((run / stage).rglob("*.jsonl")):
        rows = [json.loads(x) for x in f.read_text().splitlines()]
        out[str(f.relative_to(run))] = [{k: v for k, v in r.items() if not k.endswith("_s") and k not in
                                         ("tokens_per_s", "seconds", "mfu")} for r in rows]
    if stage == "rl":
        out["params"] = [np.asarray(x).tobytes() for x in jax.tree.leaves(load_hf_dir(run / "rl" / "export")[2])]
    return out


@pytest.mark.parametrize("stage", ["judge", "rl", "eval"])
def test_kill_and_rerun_equals_an_uninterrupted_run(stage, mini_run, tmp_path, tiny_chat_model):
    prompts = tmp_path / "prompts.jsonl"
    extra = tmp_path / "extra.jsonl"
    shutil.copy(prompts, extra)
    overrides = ["mesh.devices=1", f"eval.prompts={extra}", f"eval.checkpoints=[base, {tiny_chat_model}]"] + SETTINGS[stage]
    runs = {name: tmp_path / name for name in ("whole", "killed")}
    if stage == "judge":
        run_distill(load_config(mini_run, overrides + [f"run_dir={runs['whole']}"]))
        shutil.copytree(runs["whole"] / "distill", runs["killed"] / "distill")
    command = lambda run: [sys.executable, "-m", "dalign_jax.cli", stage, str(mini_run), f"run_dir={run}"] + overrides  # noqa: E731
    subprocess.run(command(runs["whole"]), check=True, capture_output=True)

    proc = subprocess.Popen(command(runs["killed"]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = runs["killed"] / MARKERS[stage]
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(random.Random().uniform(0, 0.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for f in runs["killed"].rglob("*"):  # whatever is visible under a final name is complete
        if f.is_file() and f.suffix == ".jsonl":
            [json.loads(x) for x in f.read_text().splitlines()]
    subprocess.run(command(runs["killed"]), check=True, capture_output=True)
    assert _outputs(runs["whole"], stage) == _outputs(runs["killed"], stage)
