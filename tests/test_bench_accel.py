"""tools/bench_accel.py in its CPU size: it runs both models and prints its RESULT lines."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import needs_default_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@needs_default_model
def test_bench_accel_ci_size_prints_results():
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_accel.py"), "--size", "ci"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = dict(re.findall(r"^RESULT (\S+) ours=([0-9.]+)$", proc.stdout, re.M))
    for model in ("smollm2", "llama1b_2layers"):
        for metric in ("sft_tokens_per_s", "sft_mfu", "sample_tokens_per_s"):
            assert float(results[f"accel_{model}_{metric}"]) > 0, proc.stdout
    assert 0 < float(results["accel_smollm2_sft_mfu"]) < 1.5
