"""The optimiser shared by SFT and RL: AdamW with linear warm-up and cosine decay, global-norm
clipping, and no weight decay on norms and biases."""
from __future__ import annotations

import jax
import optax

from dalign_jax.config import Train


def learning_rate_schedule(train: Train, total_steps: int) -> optax.Schedule:
    warmup = min(train.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else train.learning_rate, peak_value=train.learning_rate,
        warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1),
        end_value=train.learning_rate * train.min_lr_ratio)


def _decay_mask(params):
    """Weight decay on matrices only: norms and biases are vectors."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(train: Train, total_steps: int) -> optax.GradientTransformation:
    parts = [optax.clip_by_global_norm(train.max_grad_norm)] if train.max_grad_norm > 0 else []
    parts.append(optax.adamw(learning_rate_schedule(train, total_steps), b1=train.b1, b2=train.b2,
                             weight_decay=train.weight_decay, mask=_decay_mask))
    return optax.chain(*parts)
