"""Multi-host for real: two CPU processes on loopback, joined by jax.distributed, run the same SFT steps
as one process with the same number of devices, and reach the same loss and parameters."""
import json
import os
import socket
import subprocess
import sys

import numpy as np

from dalign_jax.model.hf_io import load_hf_dir
from test_sft import sft_config, sft_data  # noqa: F401  (sft_data is a fixture)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path, tiny_chat_model, sft_data):
    base_env = dict(os.environ, JAX_PLATFORMS="cpu")
    command = lambda config, *extra: [sys.executable, "-m", "dalign_jax.cli", "sft", str(config), *extra]  # noqa: E731
    options = dict(steps=4, batch_size=4, train=dict(save_every=2))

    single = sft_config(tmp_path / "single", tiny_chat_model, sft_data, **options)
    subprocess.run(command(single), check=True, capture_output=True,
                   env=dict(base_env, XLA_FLAGS="--xla_force_host_platform_device_count=2"))

    pair = sft_config(tmp_path / "pair", tiny_chat_model, sft_data, **options)
    port = _free_port()
    procs = [subprocess.Popen(command(pair, "distributed.enabled=true", f"distributed.coordinator=127.0.0.1:{port}",
                                      "distributed.num_processes=2", f"distributed.process_id={i}"),
                              env=dict(base_env, XLA_FLAGS="--xla_force_host_platform_device_count=1"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err.decode()[-3000:]

    rows = {name: [json.loads(x) for x in (tmp_path / name / "run" / "sft" / "metrics.jsonl").read_text().splitlines()]
            for name in ("single", "pair")}
    for a, b in zip(rows["single"][1:], rows["pair"][1:]):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"])
    one = load_hf_dir(tmp_path / "single" / "run" / "sft" / "export")[2]
    two = load_hf_dir(tmp_path / "pair" / "run" / "sft" / "export")[2]
    import jax

    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two)):
        np.testing.assert_allclose(a, b, atol=5e-5)
