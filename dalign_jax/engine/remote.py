"""A model at an OpenAI-compatible endpoint, asked through the official `openai` package's async client.

Requests go out concurrently up to `max_concurrency`; a connection error, a timeout, a 429 or a 5xx
is tried again with exponential backoff, anything else fails at once. A failure is a `UserError`
naming the URL, so a stage stops with `dalign: error:` and keeps the shards it has written.
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import random
from typing import Any

from dalign_jax.errors import UserError


@dataclasses.dataclass
class Endpoint:
    """A model behind an OpenAI-compatible server (vLLM, SGLang, llama.cpp's server, `dalign serve`)."""
    endpoint: str = ""  # the API's base URL, e.g. http://127.0.0.1:8000/v1
    model: str = ""  # the served model's name; "": the first the server lists
    api_key_env: str = ""  # environment variable holding the API key; "": none sent
    max_concurrency: int = 16  # requests in flight at once
    timeout_s: float = 600.0  # per request
    retries: int = 4  # further tries after a connection error, 429 or 5xx, with exponential backoff
    # Judge score mode: the start of the judge's reply, which the server continues (vLLM's and our
    # `continue_final_message`); "": no prefill, for servers without it, the first token is the score.
    prefill: str = "Score:"
    top_logprobs: int = 20  # judge score mode: the alternatives asked for at the score token


BACKOFF_S = 0.5  # the first wait; it doubles with each further try


class RemoteModel:
    """Chat completions from one served model, for one role (teacher or judge)."""

    def __init__(self, endpoint: Endpoint, role: str):
        self.endpoint, self.role = endpoint, role
        self.url = endpoint.endpoint.rstrip("/")
        self.where = f"models.{role}: {self.url}"
        if endpoint.api_key_env and not os.environ.get(endpoint.api_key_env):
            raise UserError(f"{self.where}: the environment variable {endpoint.api_key_env} (api_key_env) is not set")
        self.api_key = os.environ.get(endpoint.api_key_env, "") if endpoint.api_key_env else "none"
        self.model_id = self._served_model()

    def _client(self):
        import openai

        # Retries are ours (the client's own would also retry 408 and 409).
        return openai.AsyncOpenAI(base_url=self.url, api_key=self.api_key, timeout=self.endpoint.timeout_s,
                                  max_retries=0)

    def _served_model(self) -> str:
        """The model's name, from the server's list: asked when the role opens, so that a server that
        cannot be reached stops a stage before it writes anything."""
        async def listed():
            async with self._client() as client:
                return await self._with_retries(lambda: client.models.list(), "GET /models")

        models = [m.id for m in asyncio.run(listed()).data]
        if self.endpoint.model:
            if self.endpoint.model not in models:
                raise UserError(f"{self.where}: serves no model {self.endpoint.model!r} (models.{self.role}.model); "
                                f"it serves {', '.join(map(repr, models)) or 'none'}")
            return self.endpoint.model
        if not models:
            raise UserError(f"{self.where}: the server lists no models; name one with models.{self.role}.model")
        return models[0]

    async def _with_retries(self, call, what: str):
        import openai

        retryable = (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError)
        for attempt in range(self.endpoint.retries + 1):
            try:
                return await call()
            except retryable as e:
                if attempt == self.endpoint.retries:
                    raise UserError(f"{self.where}: {what} failed after {attempt + 1} tries: {_describe(e)}") from None
                await asyncio.sleep(BACKOFF_S * 2 ** attempt * (1 + 0.1 * random.random()))
            except openai.APIStatusError as e:
                raise UserError(f"{self.where}: {what}: {_describe(e)}") from None
            except openai.OpenAIError as e:
                raise UserError(f"{self.where}: {what}: {type(e).__name__}: {e}") from None

    def chat(self, requests: list[dict[str, Any]]) -> list:
        """One ChatCompletion per request (keyword arguments of `chat.completions.create` without `model`),
        in order; they run concurrently."""
        async def run_all():
            limit = asyncio.Semaphore(self.endpoint.max_concurrency)
            async with self._client() as client:
                async def one(request):
                    async with limit:
                        return await self._with_retries(
                            lambda: client.chat.completions.create(model=self.model_id, **request),
                            "POST /chat/completions")
                tasks = [asyncio.ensure_future(one(r)) for r in requests]
                try:
                    return await asyncio.gather(*tasks)
                finally:
                    for task in tasks:  # one failed: the others are not left running
                        task.cancel()

        return asyncio.run(run_all()) if requests else []


def _describe(error) -> str:
    status = getattr(error, "status_code", None)
    body = getattr(error, "body", None)
    message = body.get("message") if isinstance(body, dict) and body.get("message") else str(error)
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        message = body["error"].get("message", message)
    return f"HTTP {status}: {message}" if status else f"{type(error).__name__}: {message}"
