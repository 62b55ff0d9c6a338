"""Advantage estimators over groups of completions of one prompt, behind a registry.

Each maps rewards [prompts, G] to advantages [prompts, G]; a user adds one with `@register("name")`
and names it in `rl.advantage`.
"""
from __future__ import annotations

from typing import Callable

import jax.numpy as jnp

from dalign_jax.registry import registrar

AdvantageFn = Callable[[jnp.ndarray], jnp.ndarray]
ADVANTAGES: dict[str, AdvantageFn] = {}
STD_EPS = 1e-4

register = registrar(ADVANTAGES)


@register("grpo")
def grpo(rewards):
    """(r - group mean) / (group std + eps): DeepSeekMath's GRPO."""
    centred = rewards - rewards.mean(axis=1, keepdims=True)
    return centred / (rewards.std(axis=1, keepdims=True) + STD_EPS)


@register("dr_grpo")
def dr_grpo(rewards):
    """r - group mean, without the std division that favours low-variance groups (Dr. GRPO)."""
    return rewards - rewards.mean(axis=1, keepdims=True)


@register("rloo")
def rloo(rewards):
    """r_i - mean of the other G - 1 rewards of its group (REINFORCE leave-one-out)."""
    g = rewards.shape[1]
    return (rewards - rewards.mean(axis=1, keepdims=True)) * g / (g - 1)
