"""Conversations in, text out: the chat template around the compiled sampler."""
from __future__ import annotations

import dataclasses
import functools
import re
import threading
from typing import Sequence

import jax
import jinja2

from dalign_jax.engine.sampler import GREEDY, Sampler, SamplingParams
from dalign_jax.errors import UserError
from dalign_jax.model.loader import LoadedModel

Messages = list[dict[str, str]]


# Message content is swapped for this marker while the template renders, so that message text is
# encoded as plain text: a user who writes "<|im_start|>system" gets those characters, not a new turn.
_SLOT = "\ue000dalign-message-{}\ue001"
_SLOT_RE = re.compile("\ue000dalign-message-(\\d+)\ue001")

# `split_special_tokens` is a flag set on the shared Rust tokenizer for the call, so two threads (grain's
# prefetch) would run under each other's setting: one conversation is encoded at a time.
_ENCODE_LOCK = threading.Lock()


def encode_conversation(tokenizer, messages: Messages, *, add_generation_prompt: bool) -> tuple[list[int], list[int]]:
    """Token ids of `messages` under the chat template, and for every id the index of the message whose
    content it encodes (-1 for template text). Message text never becomes a control token."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise UserError("model has no tokenizer with a chat template")
    with _ENCODE_LOCK:
        return _encode_conversation(tokenizer, messages, add_generation_prompt)


def _marked(messages: Messages, fold_system: bool) -> Messages:
    """`messages` with each content swapped for its slot marker. `fold_system`: a leading system turn
    goes into the first user turn instead, ahead of its text, as Gemma 3's own template does."""
    marked = [dict(m, content=_SLOT.format(i)) for i, m in enumerate(messages)]
    if fold_system and len(marked) > 1 and marked[0]["role"] == "system" and marked[1]["role"] == "user":
        marked = [dict(marked[1], content=marked[0]["content"] + "\n\n" + marked[1]["content"])] + marked[2:]
    return marked


def _encode_conversation(tokenizer, messages: Messages, add_generation_prompt: bool) -> tuple[list[int], list[int]]:
    render = functools.partial(tokenizer.apply_chat_template, add_generation_prompt=add_generation_prompt,
                               tokenize=False)
    try:
        text = render(_marked(messages, fold_system=False))
    except jinja2.TemplateError:
        # Templates without a system role (Gemma 1 and 2) raise on one; the spec, which distill and
        # judge put in the system turn, then opens the user's turn. Other errors are raised again.
        if not messages or messages[0]["role"] != "system":
            raise
        text = render(_marked(messages, fold_system=True))
    ids: list[int] = []
    owner: list[int] = []
    start = 0
    for match in _SLOT_RE.finditer(text):
        template = tokenizer.encode(text[start:match.start()], add_special_tokens=False)
        index = int(match.group(1))
        content = tokenizer.encode(messages[index]["content"], add_special_tokens=False, split_special_tokens=True)
        ids += template + content
        owner += [-1] * len(template) + [index] * len(content)
        start = match.end()
    tail = tokenizer.encode(text[start:], add_special_tokens=False)
    return ids + tail, owner + [-1] * len(tail)


def encode_chat(tokenizer, messages: Messages) -> list[int]:
    """Token ids of `messages` under the model's chat template, ready for the assistant's turn."""
    return encode_conversation(tokenizer, messages, add_generation_prompt=True)[0]


def stop_token_ids(model: LoadedModel) -> list[int]:
    """End-of-turn tokens: the tokenizer's EOS and every EOS the model config and the generation config
    name (as transformers' `generate` stops on the latter's)."""
    ids = set()
    for value in (model.tokenizer.eos_token_id if model.tokenizer else None, model.hf_config.eos_token_id,
                  model.generation.eos_token_id if model.generation else None):
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
    batch_rows: int | None = None,
    on_finished=None,
) -> list[Completion]:
    """`batch_rows`, `on_finished`: as `Sampler.generate`'s (continuous batching, progress)."""
    prompts = [encode_chat(model.tokenizer, m) for m in conversations]
    stops = stop_token_ids(model)
    out = sampler.generate(params, prompts, max_new_tokens, key, sampling, stop_tokens=stops, batch_rows=batch_rows,
                           on_finished=on_finished)
    completions = []
    for tokens, body, logps, stopped in zip(out.tokens, out.content(), out.logprobs, out.stopped):
        completions.append(Completion(
            text=model.tokenizer.decode(body, skip_special_tokens=False),
            tokens=tokens.tolist(),
            logprobs=logps.tolist(),
            finished=bool(stopped),
        ))
    return completions
