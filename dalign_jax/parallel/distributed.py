"""Multi-host start-up through JAX's own distributed runtime.

With `enabled`, `jax.distributed.initialize` joins the processes; coordinator, count and id come
from the arguments or, when those are empty, from the environment variables JAX reads itself
(or a cluster it detects: Slurm, TPU pods). The mesh then spans every process's devices.
"""
from __future__ import annotations

import jax

_initialized = False


def initialize(enabled: bool, coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    global _initialized
    if not enabled or _initialized:
        return
    # CPU processes need a collectives library to exchange data (on GPU and TPU the runtime has one).
    if jax.config.jax_platforms in (None, "", "cpu") or "cpu" in str(jax.config.jax_platforms):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
    _initialized = True
