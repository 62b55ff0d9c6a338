"""Our side of a CPU benchmark runs over one virtual XLA device per core (`--devices=N` to change it).

XLA:CPU runs each device's element-wise work on its own thread, so two devices keep both cores busy
where one device leaves the non-matmul work on one core (bench_sft measured 110 tokens/s on one
device, 133 on two, 85 on four). The count must be set before JAX is imported.
"""
from __future__ import annotations

import os
import sys


def _default_count(default: int | None) -> str:
    return str(default or os.cpu_count() or 1)


def add_devices_argument(parser, default: int | None = None) -> None:
    """`--devices` in the tool's help (its value is read by `use_cpu_devices`, before JAX starts)."""
    parser.add_argument("--devices", default=_default_count(default),
                        help="virtual CPU devices for ours (give as --devices=N; read before JAX starts)")


def use_cpu_devices(default: int | None = None) -> str:
    """Set the virtual device count from `--devices=N` (`default`, or the core count); return it."""
    count = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--devices=")), _default_count(default))
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={count}"
    return count
