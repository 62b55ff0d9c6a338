"""Judge scoring as one compiled forward pass: the expected value of the next-token distribution
over the score tokens ("0" ... "9"), instead of sampling text and parsing it."""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from dalign_jax.engine.sampler import PROMPT_BUCKETS, PrefixCache, batch_bucket, bucket, left_pad
from dalign_jax.errors import UserError
from dalign_jax.model.config import ModelConfig
from dalign_jax.model.transformer import KVCache, forward
from dalign_jax.parallel import mesh as mesh_lib


def score_tokens(tokenizer, prefill: str, scale: int = 10) -> tuple[str, list[int]]:
    """The prefill that ends just before the score and the token id of each score 0..scale-1.

    Tokenizers differ in whether " 7" is one token or a space and a digit; whichever prefill
    ("Score: " or "Score:") makes every score a single token appended to it is used.
    """
    for text in (prefill + " ", prefill):
        base = tokenizer.encode(text, add_special_tokens=False)
        ids = []
        for value in range(scale):
            full = tokenizer.encode(text + str(value), add_special_tokens=False)
            if full[:len(base)] != base or len(full) != len(base) + 1:
                break
            ids.append(full[-1])
        if len(ids) == scale and len(set(ids)) == scale:
            return text, ids
    raise UserError(f"judge tokenizer: the scores 0..{scale - 1} are not single tokens after {prefill!r}")


# A judge call is one long forward pass with no decode loop to spread its padding over: from 1,024
# tokens up its lengths are padded in 1/16 octaves (at most 6%), at the price of a few more compilations.
SCORE_BUCKETS = tuple(b for b in PROMPT_BUCKETS if b < 1024) + tuple(
    n for octave in range(10, 15) for n in range(1 << octave, 2 << octave, 1 << (octave - 4))) + (PROMPT_BUCKETS[-1],)


def _score(params, tokens, positions, score_ids, prefix, *, cfg, batch_shards, on_trace):
    on_trace()
    cache = None  # without a shared prefix nothing is attended but the inputs, so no cache is written
    if prefix is not None:
        cache = KVCache.empty(cfg, tokens.shape[0], tokens.shape[1], dtype=params["embed"].dtype, prefix=prefix)
    logits, _ = forward(params, tokens, positions, cache, cfg=cfg, last_only=True, fresh_cache=True,
                        batch_shards=batch_shards)
    logp = jax.nn.log_softmax(logits[:, -1], axis=-1)
    score_logp = logp[:, score_ids]
    probs = jax.nn.softmax(score_logp, axis=-1)
    expected = probs @ jnp.arange(score_ids.shape[0], dtype=jnp.float32)
    return expected, jnp.exp(score_logp).sum(-1), probs


class Scorer:
    """Expected score per prompt, normalised to [0, 1], plus the probability mass the model put on
    score tokens at all (low mass means the judge prompt is not being followed)."""

    def __init__(self, cfg: ModelConfig, mesh: Mesh, score_ids: Sequence[int], pad_id: int = 0,
                 prompt_buckets: Sequence[int] = SCORE_BUCKETS, prefix_min_tokens: int = 256):
        """Prompts of one call sharing `prefix_min_tokens` leading tokens (the spec) share their KV;
        0 switches that off."""
        self.cfg, self.mesh, self.pad_id = cfg, mesh, pad_id
        self.score_ids = np.asarray(score_ids, np.int32)
        self.prompt_buckets = tuple(prompt_buckets)
        self.prefixes = PrefixCache(cfg, self.prompt_buckets, pad_id, prefix_min_tokens)
        self.compile_count = 0
        self._fn = None

    def _count_trace(self):
        self.compile_count += 1

    def _compiled(self, params):
        if self._fn is None:
            batch = lambda rank: mesh_lib.batch_sharding(self.mesh, rank)  # noqa: E731
            self._fn = jax.jit(
                functools.partial(_score, cfg=self.cfg, batch_shards=mesh_lib.batch_size_multiple(self.mesh),
                                  on_trace=self._count_trace),
                in_shardings=(mesh_lib.param_shardings(params, self.mesh), batch(2), batch(2),
                              mesh_lib.replicated(self.mesh), mesh_lib.replicated(self.mesh)),
                out_shardings=(batch(1), batch(1), batch(2)),
            )
        return self._fn

    def score(self, params, prompts: Sequence[Sequence[int]],
              score_ids: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """`score_ids`: a narrower scale than the constructor's (StrongREJECT's 0-1 and 1-5 questions)."""
        expected, mass, _ = self.distribution(params, prompts, score_ids)
        return expected, mass

    def distribution(self, params, prompts: Sequence[Sequence[int]],
                     score_ids: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`score` and, per prompt, the probabilities of the score tokens renormalised over them."""
        score_ids = self.score_ids if score_ids is None else np.asarray(score_ids, np.int32)
        if not prompts:
            return np.zeros(0, np.float32), np.zeros(0, np.float32), np.zeros((0, len(score_ids)), np.float32)
        longest = max(len(p) for p in prompts)
        if longest > self.cfg.max_position:
            raise UserError(f"judge prompt of {longest} tokens exceeds the judge's context of {self.cfg.max_position}")
        prefix, shared, own = self.prefixes.split(params, prompts)
        length = bucket(max(len(p) for p in own), self.prompt_buckets, "judge prompt length")
        tokens, positions = left_pad(own, length, batch_bucket(len(prompts), self.mesh), self.pad_id, offset=shared)
        fn = self._compiled(params)
        expected, mass, probs = jax.device_get(fn(params, tokens, positions, score_ids, prefix))
        top = len(score_ids) - 1
        n = len(prompts)
        return np.asarray(expected)[:n] / top, np.asarray(mass)[:n], np.asarray(probs)[:n]


def _alternatives(params, tokens, positions, *, cfg, prompt_len: int, k: int):
    """For each completion column, the log-probability of its token and the `k` likeliest tokens with
    theirs, under the model's own distribution (temperature 1), from one pass over prompt + completion."""
    logits, _ = forward(params, tokens, positions, cfg=cfg, logits_from=prompt_len - 1, logits_to=-1)
    logp = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(logp, tokens[:, prompt_len:, None], axis=-1)[..., 0]
    top_logp, top_ids = jax.lax.top_k(logp, k)
    return chosen, top_logp, top_ids


class TokenAlternatives:
    """Log-probabilities of sampled tokens and their likeliest alternatives (OpenAI's `logprobs` and
    `top_logprobs`), recomputed by one forward pass over each prompt and its completion."""

    ROWS = 8  # rows per pass: its logits are rows x completion length x vocabulary floats

    def __init__(self, cfg: ModelConfig, mesh: Mesh, k: int, pad_id: int = 0):
        self.cfg, self.mesh, self.k, self.pad_id = cfg, mesh, k, pad_id
        self._fns = {}

    def _fn(self, params, prompt_len: int):
        if prompt_len not in self._fns:
            batch = lambda rank: mesh_lib.batch_sharding(self.mesh, rank)  # noqa: E731
            self._fns[prompt_len] = jax.jit(
                functools.partial(_alternatives, cfg=self.cfg, prompt_len=prompt_len, k=self.k),
                in_shardings=(mesh_lib.param_shardings(params, self.mesh), batch(2), batch(2)),
                out_shardings=(batch(2), batch(3), batch(3)))
        return self._fns[prompt_len]

    def __call__(self, params, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]]):
        """Per row: (chosen [n], top log-probs [n, k], top ids [n, k]) for its n completion tokens."""
        from dalign_jax.engine.sampler import NEW_TOKEN_BUCKETS

        results = []
        for start in range(0, len(prompts), self.ROWS):
            rows_p, rows_c = prompts[start:start + self.ROWS], completions[start:start + self.ROWS]
            prompt_len = bucket(max(len(p) for p in rows_p), PROMPT_BUCKETS, "prompt length")
            new_len = bucket(max(1, max(len(c) for c in rows_c)), NEW_TOKEN_BUCKETS, "completion length")
            rows = batch_bucket(len(rows_p), self.mesh)
            tokens, positions = left_pad(rows_p, prompt_len, rows, self.pad_id)
            tokens = np.concatenate([tokens, np.full((rows, new_len), self.pad_id, np.int32)], axis=1)
            positions = np.concatenate([positions, np.full((rows, new_len), -1, np.int32)], axis=1)
            for i, (p, c) in enumerate(zip(rows_p, rows_c)):
                tokens[i, prompt_len:prompt_len + len(c)] = c
                positions[i, prompt_len:prompt_len + len(c)] = len(p) + np.arange(len(c))
            chosen, top_logp, top_ids = jax.device_get(self._fn(params, prompt_len)(params, tokens, positions))
            results += [(np.asarray(chosen[i, :len(c)]), np.asarray(top_logp[i, :len(c)]),
                         np.asarray(top_ids[i, :len(c)])) for i, c in enumerate(rows_c)]
        return results
