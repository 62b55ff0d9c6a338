"""Conversations in, text out: the chat template around the compiled sampler."""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax

from dalign_jax.engine.sampler import GREEDY, Sampler, SamplingParams
from dalign_jax.errors import UserError
from dalign_jax.model.loader import LoadedModel

Messages = list[dict[str, str]]


def encode_chat(tokenizer, messages: Messages) -> list[int]:
    """Token ids of `messages` under the model's chat template, ready for the assistant's turn."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise UserError("model has no tokenizer with a chat template")
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(encoded["input_ids"])


def stop_token_ids(model: LoadedModel) -> list[int]:
    """End-of-turn tokens: the tokenizer's EOS and every EOS the model config names."""
    ids = set()
    for value in (model.tokenizer.eos_token_id if model.tokenizer else None, model.hf_config.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    return sorted(ids)


@dataclasses.dataclass
class Completion:
    text: str
    tokens: list[int]
    logprobs: list[float]
    finished: bool  # ended by a stop token, not by the length limit


def complete_chats(
    model: LoadedModel,
    sampler: Sampler,
    params,
    conversations: Sequence[Messages],
    max_new_tokens: int,
    key: jax.Array,
    sampling: SamplingParams = GREEDY,
) -> list[Completion]:
    prompts = [encode_chat(model.tokenizer, m) for m in conversations]
    stops = stop_token_ids(model)
    out = sampler.generate(params, prompts, max_new_tokens, key, sampling, stop_tokens=stops)
    completions = []
    for tokens, body, logps, stopped in zip(out.tokens, out.content(), out.logprobs, out.stopped):
        completions.append(Completion(
            text=model.tokenizer.decode(body, skip_special_tokens=False),
            tokens=tokens.tolist(),
            logprobs=logps.tolist(),
            finished=bool(stopped),
        ))
    return completions
