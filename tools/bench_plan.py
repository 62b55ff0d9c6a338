"""`dalign plan`'s SFT figure against XLA's: the planned memory per device of one SFT optimiser step
beside the compiled step's own buffer assignment (arguments + temporaries + outputs not aliased to a
donated input), for the embedded default model and a random model of Llama 3.2 1B's layout. Nothing
is allocated: the step is compiled from shapes alone, so the 1B model plans and compiles on a laptop.

  python tools/bench_plan.py
  python tools/bench_plan.py --length 256 --rows 2      # smaller

Also what the backward pass keeps: the planned activations with one float32 copy of the logits, and
the residuals JAX's autodiff saves (XLA:CPU's buffer assignment does not realise remat's saving, so
under remat compare these).

Last lines: RESULT plan_sft_<model>[_remat] planned_gib=<x> measured_gib=<y> ratio=<planned / measured>
activations_planned_gib=<a> activations_saved_gib=<b>.
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(__file__))
from bench_accel import LLAMA_1B  # noqa: E402

from dalign_jax.config import Train  # noqa: E402
from dalign_jax.model.loader import DEFAULT_MODEL, read_model_config  # noqa: E402
from dalign_jax.model.transformer import init_params  # noqa: E402
from dalign_jax.parallel.mesh import make_mesh  # noqa: E402
from dalign_jax.plan import GIB, MeshShape, training_items  # noqa: E402
from dalign_jax.train.optim import learning_rate_schedule, make_optimizer  # noqa: E402
from dalign_jax.train.step import abstract_state, batch_shardings, replicated, sft_loss, train_step  # noqa: E402


def measured_bytes(cfg, train: Train, rows: int, length: int) -> float:
    """XLA's buffer assignment for the SFT train step on one device, compiled from shapes."""
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    optimizer = make_optimizer(train, 10)
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    state, sharding = abstract_state(params, optimizer, mesh)
    loss = functools.partial(sft_loss, cfg=cfg, remat=train.remat,
                             compute_dtype=jnp.bfloat16 if train.compute_dtype == "bfloat16" else jnp.float32)
    batch = {k: jax.ShapeDtypeStruct((1, rows, length), dt) for k, dt in
             (("tokens", jnp.int32), ("positions", jnp.int32), ("loss_mask", jnp.float32))}
    step = functools.partial(train_step, loss_fn=loss, optimizer=optimizer, schedule=learning_rate_schedule(train, 10))
    compiled = jax.jit(step, in_shardings=(sharding, None, batch_shardings(batch, mesh)),
                       out_shardings=(sharding, replicated(mesh)), donate_argnums=0).lower(state, None, batch).compile()
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes


def saved_activation_bytes(cfg, train: Train, rows: int, length: int) -> float:
    """What JAX's autodiff keeps for the backward pass (its residuals, arguments left out): the
    activations the plan estimates, before XLA schedules anything."""
    from jax._src.ad_checkpoint import saved_residuals

    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    batch = {k: jax.ShapeDtypeStruct((rows, length), dt) for k, dt in
             (("tokens", jnp.int32), ("positions", jnp.int32), ("loss_mask", jnp.float32))}
    loss = lambda p, b: sft_loss(p, b, cfg=cfg, remat=train.remat)[0]  # noqa: E731
    return sum(math.prod(a.shape) * a.dtype.itemsize for a, why in saved_residuals(loss, params, batch)
               if "argument" not in why)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--length", type=int, default=1024)
    args = parser.parse_args()
    one = MeshShape(1, 1, 1)
    results = []
    for name, cfg in (("smollm2", read_model_config(DEFAULT_MODEL)), ("llama1b", LLAMA_1B)):
        for remat in (False, True):
            train = Train(remat=remat)
            items = training_items(cfg, train, one, args.rows, args.length)
            planned = sum(items.values())
            # autodiff's residuals hold one float32 copy of the logits beside the layers' activations
            activations = sum(v / 2 if k.startswith("logits") else v for k, v in items.items()
                              if k.startswith(("activations", "logits")))
            measured = measured_bytes(cfg, train, args.rows, args.length)
            saved = saved_activation_bytes(cfg, train, args.rows, args.length)
            label = f"{name}{'_remat' if remat else ''}"
            print(f"{label}: {args.rows} x {args.length} tokens, planned {planned / GIB:.2f} GiB, XLA "
                  f"{measured / GIB:.2f} GiB; activations planned {activations / GIB:.2f} GiB, saved by "
                  f"autodiff {saved / GIB:.2f} GiB", flush=True)
            results.append((label, planned, measured, activations, saved))
    for label, planned, measured, activations, saved in results:
        print(f"RESULT plan_sft_{label} planned_gib={planned / GIB:.2f} measured_gib={measured / GIB:.2f} "
              f"ratio={planned / measured:.2f} activations_planned_gib={activations / GIB:.2f} "
              f"activations_saved_gib={saved / GIB:.2f}")


if __name__ == "__main__":
    main()
