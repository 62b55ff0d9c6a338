"""Advantage estimators over groups of completions of one prompt, behind a registry.

Each maps rewards [prompts, G] and a mask of the completions that count ([prompts, G] bool, or None
for all) to advantages [prompts, G]; a masked completion gets 0 and is left out of its group's
statistics. A user adds one with `@register("name")` and names it in `rl.advantage`.
"""
from __future__ import annotations

from typing import Callable

import jax.numpy as jnp

from dalign_jax.registry import registrar

AdvantageFn = Callable[[jnp.ndarray, jnp.ndarray | None], jnp.ndarray]
ADVANTAGES: dict[str, AdvantageFn] = {}
STD_EPS = 1e-4

register = registrar(ADVANTAGES)


def _group_stats(rewards, valid):
    """(mask as float, count, mean, std) per group over the completions that count."""
    mask = jnp.ones_like(rewards) if valid is None else jnp.asarray(valid, rewards.dtype)
    count = mask.sum(axis=1, keepdims=True)
    mean = (rewards * mask).sum(axis=1, keepdims=True) / jnp.maximum(count, 1.0)
    std = jnp.sqrt((((rewards - mean) * mask) ** 2).sum(axis=1, keepdims=True) / jnp.maximum(count, 1.0))
    return mask, count, mean, std


@register("grpo")
def grpo(rewards, valid=None):
    """(r - group mean) / (group std + eps): DeepSeekMath's GRPO."""
    mask, _, mean, std = _group_stats(rewards, valid)
    return (rewards - mean) * mask / (std + STD_EPS)


@register("dr_grpo")
def dr_grpo(rewards, valid=None):
    """r - group mean, without the std division that favours low-variance groups (Dr. GRPO)."""
    mask, _, mean, _ = _group_stats(rewards, valid)
    return (rewards - mean) * mask


@register("grpo_batch_std")
def grpo_batch_std(rewards, valid=None):
    """(r - group mean) / (std of every counted reward of the step + eps): the group's baseline with
    the step's spread, which does not inflate groups whose rewards barely differ (TRL's
    `scale_rewards="batch"`)."""
    mask, _, mean, _ = _group_stats(rewards, valid)
    count = jnp.maximum(mask.sum(), 1.0)
    batch_mean = (rewards * mask).sum() / count
    std = jnp.sqrt((((rewards - batch_mean) * mask) ** 2).sum() / count)
    return (rewards - mean) * mask / (std + STD_EPS)


@register("rloo")
def rloo(rewards, valid=None):
    """r_i - mean of the other n - 1 rewards of its group (REINFORCE leave-one-out; n counted
    completions, 0 where a group has fewer than two)."""
    mask, count, mean, _ = _group_stats(rewards, valid)
    return (rewards - mean) * mask * count / jnp.maximum(count - 1.0, 1.0) * (count > 1)
