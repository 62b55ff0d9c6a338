"""tools/device_check.sh in its CPU short form (the accelerator form is the same script on a GPU or TPU)."""
import os
import re
import subprocess
from pathlib import Path

from conftest import needs_default_model

ROOT = Path(__file__).resolve().parents[1]


@needs_default_model
def test_device_check_short_form_passes_and_prints_results():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(["bash", str(ROOT / "tools" / "device_check.sh"), "--cpu", "--short"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    for step in ("tests", "bench_compile", "plan"):
        assert re.search(rf"^RESULT device_check_{step} status=ok seconds=\d+$", proc.stdout, re.M), proc.stdout
    assert re.search(r"^RESULT compile_s_4_layers unrolled=[0-9.]+ scanned=[0-9.]+ ratio=[0-9.]+$", proc.stdout, re.M)
    assert proc.stdout.rstrip().endswith("RESULT device_check failed_steps=0")


def test_device_check_refuses_an_unknown_argument():
    proc = subprocess.run(["bash", str(ROOT / "tools" / "device_check.sh"), "--gpu"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown argument --gpu" in proc.stderr
