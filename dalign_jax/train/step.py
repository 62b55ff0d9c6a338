"""The compiled training step shared by SFT and RL.

A loss function maps (params, micro-batch) to (loss_sum, weight, aux): a sum over tokens or sequences
and what it is to be divided by. The step sums both over the micro-batches of one optimiser step
(gradient accumulation), so accumulating k micro-batches gives the same update as one batch k times
larger. `aux` holds extra metrics as (sum, count) pairs, averaged the same way.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dalign_jax.model.config import ModelConfig
from dalign_jax.model.transformer import token_logprobs
from dalign_jax.parallel.mesh import BATCH_AXES, param_shardings, replicated
from dalign_jax.train.lora import LoraConfig, merge

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: optimiser steps taken
    params: dict
    opt_state: optax.OptState


def neftune_noise(seeds: jax.Array, length: int, hidden: int, alpha: float) -> jax.Array:
    """NEFTune's noise (Jain et al. 2023, as HF's trainer adds it): for each row, uniform in
    [-b, b] with b = alpha / sqrt(length * hidden), `length` the padded row length. Row r's noise
    comes from its own `seeds[r]`, so it is the same however the rows are split over devices."""
    bound = alpha / np.sqrt(length * hidden)
    return jax.vmap(lambda seed: jax.random.uniform(jax.random.key(seed), (length, hidden), jnp.float32,
                                                    -bound, bound))(seeds)


def sft_loss(params, batch, *, cfg: ModelConfig, compute_dtype=jnp.float32, remat=False, neftune_alpha: float = 0.0):
    """Summed negative log-likelihood of the completion tokens, and how many there are. In a packed
    batch (`segments`) no token is a target of the one before it in another sequence. With
    `neftune_alpha`, a batch that carries `noise_seed` ([rows]: training batches, never held-out
    ones) has NEFTune's noise added to its input embeddings."""
    segments = batch.get("segments")
    noise = None
    if neftune_alpha and "noise_seed" in batch:
        noise = neftune_noise(batch["noise_seed"], batch["tokens"].shape[1], cfg.hidden_size, neftune_alpha)
    logp = token_logprobs(params, batch["tokens"], batch["positions"], cfg=cfg, compute_dtype=compute_dtype,
                          remat=remat, segments=segments, embed_noise=noise)
    mask = (batch["loss_mask"][:, 1:] > 0) & (batch["positions"][:, 1:] >= 0)
    if segments is not None:
        mask &= segments[:, 1:] == segments[:, :-1]
    mask = mask.astype(jnp.float32)
    return -(logp * mask).sum(), mask.sum(), {}


def _tree_add(a, b):
    return jax.tree.map(jnp.add, a, b)


def _accumulate(loss_fn, params, batch):
    """Sum loss, weight, aux and gradients over the leading (micro-batch) axis of `batch`."""
    grad_fn = jax.value_and_grad(lambda p, mb: (lambda l, w, a: (l, (w, a)))(*loss_fn(p, mb)), has_aux=True)

    def one(mb):
        (loss, (weight, aux)), grads = grad_fn(params, mb)
        return grads, loss, weight, aux

    first = one(jax.tree.map(lambda x: x[0], batch))
    if jax.tree.leaves(batch)[0].shape[0] == 1:
        return first

    def body(carry, mb):
        return _tree_add(carry, one(mb)), None

    total, _ = jax.lax.scan(body, first, jax.tree.map(lambda x: x[1:], batch))
    return total


def train_step(state: TrainState, frozen, batch, *, loss_fn: Callable, optimizer: optax.GradientTransformation,
               schedule: optax.Schedule, lora: LoraConfig | None = None, update_mesh: Mesh | None = None):
    """One optimiser step over `batch` ([micro_batches, rows, ...] leaves). Returns the new state and
    float32 metrics: loss, grad_norm (before clipping), learning_rate, weight, and the aux metrics.

    With `lora`, `state.params` are adapters and the model is `frozen` (base weights) merged with them;
    without, `frozen` is None and `state.params` is the model. With `update_mesh`, the optimiser's
    update runs split over that mesh's data axis as well (ZeRO-1, `shard_optimizer`): each data-parallel
    replica reduces, clips and updates only its share, and the new parameters are gathered after."""
    model_loss = loss_fn if lora is None else (lambda p, mb: loss_fn(merge(frozen, p, lora), mb))
    grads, loss_sum, weight, aux = _accumulate(model_loss, state.params, batch)
    denom = jnp.maximum(weight, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    params = state.params
    if update_mesh is not None:
        split = param_shardings(params, update_mesh, split_over_data=True)
        grads, params = (jax.lax.with_sharding_constraint(t, split) for t in (grads, params))
    updates, opt_state = optimizer.update(grads, state.opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = {"loss": loss_sum / denom, "grad_norm": optax.tree.norm(grads),
               "learning_rate": jnp.asarray(schedule(state.step), jnp.float32), "weight": weight}
    metrics.update({name: s / jnp.maximum(c, 1.0) for name, (s, c) in aux.items()})
    return TrainState(state.step + 1, params, opt_state), metrics


def batch_shardings(batch_shape, mesh: Mesh, micro_axis: bool = True):
    """Rows over the batch axes of the mesh; the leading micro-batch axis (if any) unsplit."""
    lead = (None,) if micro_axis else ()
    return jax.tree.map(lambda x: NamedSharding(mesh, P(*lead, BATCH_AXES, *([None] * (x.ndim - len(lead) - 1)))),
                        batch_shape)


def _per_batch_shape(build: Callable):
    """`call(*args, batch)` through a function compiled by `build(batch)` once per set of batch shapes
    (one per padded width)."""
    compiled = {}

    def call(*args):
        batch = args[-1]
        key = tuple((k, v.shape) for k, v in sorted(batch.items()))
        if key not in compiled:
            compiled[key] = build(batch)
        return compiled[key](*args)

    return call


def compile_train_step(loss_fn, optimizer, schedule, state_sharding, mesh: Mesh, trainable=None,
                       shard_optimizer: bool = False):
    """`step(state, batch) -> (state, metrics)`, jitted with explicit shardings and the old state donated.
    `trainable` (lora.Trainable) adds frozen base weights, passed to the step (not baked into it).
    `shard_optimizer`: the update split over the data axis, as the state's layout must then be
    (`init_state(..., shard_optimizer=True)`)."""
    lora = None if trainable is None else trainable.lora
    frozen = None if lora is None else trainable.frozen
    frozen_sharding = None if lora is None else trainable.param_sharding
    fn = functools.partial(train_step, loss_fn=loss_fn, optimizer=optimizer, schedule=schedule, lora=lora,
                           update_mesh=mesh if shard_optimizer else None)
    step = _per_batch_shape(lambda batch: jax.jit(
        fn, in_shardings=(state_sharding, frozen_sharding, batch_shardings(batch, mesh)),
        out_shardings=(state_sharding, replicated(mesh)), donate_argnums=0))
    return lambda state, batch: step(state, frozen, batch)


def compile_eval_loss(loss_fn, param_sharding, mesh: Mesh):
    """`eval(params, batch) -> (loss_sum, weight)` for [rows, ...] batches."""
    return _per_batch_shape(lambda batch: jax.jit(
        lambda p, b: loss_fn(p, b)[:2],
        in_shardings=(param_sharding, batch_shardings(batch, mesh, micro_axis=False)),
        out_shardings=replicated(mesh)))


def compile_batch_logprobs(cfg: ModelConfig, param_sharding, mesh: Mesh, *, temperature: float = 1.0,
                           compute_dtype=jnp.float32):
    """`logp(params, batch) -> [micro_batches, rows, completion]`: the log-probability under `params` of
    each token in a device batch's last `batch["old_logp"].shape[-1]` columns (RL's completions),
    computed where its rows lie and laid out like them, so it joins the batch without a trip through
    the host. RL's reference log-probabilities."""
    def fn(params, tokens, positions, completion: int):
        return jax.lax.map(lambda tp: token_logprobs(params, *tp, cfg=cfg, compute_dtype=compute_dtype,
                                                     temperature=temperature,
                                                     targets_from=tokens.shape[-1] - completion),
                           (tokens, positions))

    rows = NamedSharding(mesh, P(None, BATCH_AXES, None))
    compiled = jax.jit(fn, in_shardings=(param_sharding, rows, rows), out_shardings=rows, static_argnums=3)
    return lambda params, batch: compiled(params, batch["tokens"], batch["positions"], batch["old_logp"].shape[-1])


def _state_layout(params, optimizer: optax.GradientTransformation, mesh: Mesh, shard_optimizer: bool):
    """The function that builds a fresh train state, the state's shapes, and its shardings on `mesh`
    (with `shard_optimizer`, the optimiser state's split over the data axis as well)."""
    build = lambda p: TrainState(jnp.zeros((), jnp.int32), p, optimizer.init(p))  # noqa: E731
    shape = jax.eval_shape(build, params)
    sharding = param_shardings(shape, mesh)
    if shard_optimizer:
        sharding = sharding._replace(opt_state=param_shardings(shape.opt_state, mesh, split_over_data=True))
    return build, shape, sharding


def init_state(params, optimizer: optax.GradientTransformation, mesh: Mesh,
               shard_optimizer: bool = False) -> tuple[TrainState, object]:
    """The initial train state laid out on `mesh`, and its shardings."""
    build, _, sharding = _state_layout(params, optimizer, mesh, shard_optimizer)
    return jax.jit(build, out_shardings=sharding)(params), sharding


def abstract_state(params, optimizer: optax.GradientTransformation, mesh: Mesh, shard_optimizer: bool = False):
    """Shapes, dtypes and shardings of the train state, for restoring a checkpoint into."""
    _, shape, sharding = _state_layout(params, optimizer, mesh, shard_optimizer)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shape, sharding), sharding


def device_batch(local: dict, mesh: Mesh, micro_batches: int | None):
    """This process's rows of a global batch -> global arrays split over the mesh's batch axes.

    With `micro_batches`, rows [n, ...] become [micro_batches, n / micro_batches, ...]."""
    out = {}
    for name, x in local.items():
        if micro_batches is not None:
            x = x.reshape(micro_batches, x.shape[0] // micro_batches, *x.shape[1:])
        row_axis = 0 if micro_batches is None else 1
        global_shape = list(x.shape)
        global_shape[row_axis] *= jax.process_count()
        sharding = batch_shardings(x, mesh, micro_axis=micro_batches is not None)
        out[name] = jax.make_array_from_process_local_data(sharding, x, tuple(global_shape))
    return out


def host_params(params):
    """A parameter tree as host numpy arrays (gathered from every process on multi-host)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(params, tiled=True)
    return jax.device_get(params)
