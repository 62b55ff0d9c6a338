"""The RL objective: PPO-style clipped policy gradient with separate low and high bounds, the
probability ratio taken per token or per sequence (GSPO), a k3 KL penalty to the frozen reference,
and an aggregation over tokens, behind a registry.

`rl_loss` has the train step's loss signature (params, batch) -> (loss_sum, weight, aux), so RL
updates reuse the SFT step: its accumulation, clipping, shardings and donation.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from dalign_jax.model.config import ModelConfig
from dalign_jax.registry import registrar
from dalign_jax.model.transformer import token_logprobs


def clipped_policy_loss(log_ratio, advantages, clip_low: float, clip_high: float):
    """Per-token -min(ratio * A, clip(ratio, 1 - low, 1 + high) * A), ratio = exp(log_ratio), and where
    the clip was active."""
    ratio = jnp.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high) * advantages
    return -jnp.minimum(unclipped, clipped), (clipped < unclipped).astype(jnp.float32)


IMPORTANCE_LEVELS = ("token", "sequence")


def importance_log_ratio(logp, old_logp, mask, level: str):
    """log(pi / pi_old) per token [batch, time]. "token": each token's own (PPO, GRPO). "sequence":
    GSPO's ratio, the geometric mean over the sequence's counted tokens, the same for all of them;
    written as GSPO-token (sg(mean) + logp - sg(logp)), whose value is the sequence's and whose
    gradient, aggregated over the sequence, is GSPO's (and TRL's `importance_sampling_level="sequence"`)
    where the advantage is one per sequence."""
    log_ratio = logp - old_logp
    if level == "token":
        return log_ratio
    if level != "sequence":
        raise ValueError(f"importance level {level!r}: expected one of {IMPORTANCE_LEVELS}")
    sequence = (log_ratio * mask).sum(axis=1, keepdims=True) / jnp.maximum(mask.sum(axis=1, keepdims=True), 1.0)
    return jax.lax.stop_gradient(sequence) + logp - jax.lax.stop_gradient(logp)


def kl_k3(logp, ref_logp):
    """Schulman's k3 estimator of KL(policy || reference) per token: exp(d) - d - 1, d = ref - policy;
    unbiased, always >= 0."""
    d = ref_logp - logp
    return jnp.exp(d) - d - 1.0


# Aggregation: per-token losses [batch, time] and mask -> (sum, weight); the step divides the summed
# numerators by the summed weights over all micro-batches.
Aggregation = Callable[[jnp.ndarray, jnp.ndarray, int], tuple[jnp.ndarray, jnp.ndarray]]
AGGREGATIONS: dict[str, Aggregation] = {}

register_aggregation = registrar(AGGREGATIONS)


@register_aggregation("token_mean")
def token_mean(per_token, mask, max_tokens):
    """Every completion token weighs the same (DAPO)."""
    return (per_token * mask).sum(), mask.sum()


@register_aggregation("sequence_mean")
def sequence_mean(per_token, mask, max_tokens):
    """Each sequence's token mean, then the mean over sequences (the original GRPO)."""
    per_sequence = (per_token * mask).sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1.0)
    return per_sequence.sum(), jnp.asarray(per_token.shape[0], jnp.float32)


@register_aggregation("sequence_sum_norm")
def sequence_sum_norm(per_token, mask, max_tokens):
    """Token sums over a constant (the generation limit), then the mean over sequences (Dr. GRPO)."""
    return (per_token * mask).sum() / max_tokens, jnp.asarray(per_token.shape[0], jnp.float32)


def rl_loss(params, batch, *, cfg: ModelConfig, temperature: float, clip_low: float, clip_high: float,
            kl_coef: float, aggregation: str, max_tokens: int, importance: str = "token", compute_dtype=jnp.float32,
            remat: bool = False):
    """batch: tokens and positions [batch, prompt + completion] (`training_batch`'s layout: every
    completion starts in the same column); loss_mask, old_logp and ref_logp [batch, completion], one
    column per completion token; advantages [batch]. Without `ref_logp` (kl_coef 0: no reference
    model, as in TRL with beta 0) there is no KL term and no `kl` metric.

    Log-probabilities are of the temperature-scaled distribution, the one the sampler drew from; only
    the completion's columns are projected onto the vocabulary (TRL's `logits_to_keep`). `aux` also
    holds the mean entropy of that distribution over the completion tokens (TRL logs it too)."""
    start = batch["tokens"].shape[1] - batch["loss_mask"].shape[1]
    logp, entropy = token_logprobs(params, batch["tokens"], batch["positions"], cfg=cfg, compute_dtype=compute_dtype,
                                   remat=remat, temperature=temperature, targets_from=start, with_entropy=True)
    mask = ((batch["loss_mask"] > 0) & (batch["positions"][:, start:] >= 0)).astype(jnp.float32)
    old_logp = batch["old_logp"]
    log_ratio = importance_log_ratio(logp, old_logp, mask, importance)
    per_token, clipped = clipped_policy_loss(log_ratio, batch["advantages"][:, None], clip_low, clip_high)
    tokens = mask.sum()
    aux = {"clip_fraction": ((clipped * mask).sum(), tokens),
           "logprob_gap": ((jnp.abs(jax.lax.stop_gradient(logp) - old_logp) * mask).sum(), tokens),
           "entropy": ((entropy * mask).sum(), tokens)}
    if "ref_logp" in batch:
        kl = kl_k3(logp, batch["ref_logp"])
        per_token = per_token + kl_coef * kl
        aux["kl"] = ((kl * mask).sum(), tokens)
    loss_sum, weight = AGGREGATIONS[aggregation](per_token, mask, max_tokens)
    return loss_sum, weight, aux
