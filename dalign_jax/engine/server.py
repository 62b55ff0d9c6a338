"""`dalign serve`: an OpenAI-compatible chat server over the compiled sampler (FastAPI and uvicorn).

Requests wait in a queue; one thread takes them as they come until none has come for
`batch_window_s` (at most ten windows), those with the first one's sampling settings up to
QUEUED_BATCHES x `max_batch` rows, and decodes them on `max_batch` rows batched
continuously: a finished row takes the next waiting one. A request that arrives while they decode
joins the next call. Every row draws from its own request's seed, so an answer does not depend on
what it was batched with. A shared prefix (a spec) is computed once and cached, as the sampler does
for every stage. `stream` sends server-sent events once the request is decoded.
"""

import asyncio
import concurrent.futures
import dataclasses
import json
import os
import queue
import threading
import time
import uuid

import jax
import numpy as np

from dalign_jax.engine.chat import encode_chat, encode_conversation, stop_token_ids
from dalign_jax.engine.sampler import NEW_TOKEN_BUCKETS, Sampler, SamplingParams
from dalign_jax.errors import UserError

DEFAULT_MAX_TOKENS = 512
ROLES = ("system", "user", "assistant")


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclasses.dataclass
class Work:
    prompt: list[int]
    n: int
    sampling: SamplingParams
    max_tokens: int
    seed: int
    top_logprobs: int | None  # None: no logprobs asked
    stop: list[str]
    ignore_eos: bool
    future: concurrent.futures.Future


@dataclasses.dataclass
class Choice:
    text: str
    tokens: list[int]
    finish_reason: str
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] | None  # (token, logprob, top alternatives)


# Rows one sampler call takes, in max_batch-row batches: more waiting requests than max_batch decode
# continuously instead of one batch after another.
QUEUED_BATCHES = 8


class ServeEngine:
    """The model, its sampler and the batching thread."""

    def __init__(self, model, mesh, *, max_batch: int = 64, batch_window_s: float = 0.02, max_logprobs: int = 20):
        from dalign_jax.engine.scorer import TokenAlternatives
        from dalign_jax.parallel.mesh import shard_params

        self.model, self.mesh = model, mesh
        self.tokenizer = model.tokenizer
        self.max_batch, self.batch_window_s, self.max_logprobs = max_batch, batch_window_s, max_logprobs
        self.params = shard_params(model.params, mesh)
        pad = self.tokenizer.pad_token_id or 0
        self.sampler = Sampler(model.cfg, mesh, pad_id=pad)
        self.alternatives = TokenAlternatives(model.cfg, mesh, max(1, min(max_logprobs, model.cfg.vocab_size)), pad)
        self.stops = stop_token_ids(model)
        self.queue: queue.Queue[Work] = queue.Queue()
        self.stats = {"batches": 0, "rows": 0, "decode_s": 0.0}  # reported by GET /health
        threading.Thread(target=self._loop, name="dalign-batcher", daemon=True).start()

    def submit(self, work: Work) -> concurrent.futures.Future:
        self.queue.put(work)
        return work.future

    def _loop(self) -> None:
        waiting: list[Work] = []
        while True:
            if not waiting:
                waiting.append(self.queue.get())
            # Gather until no request has come for a window (at most ten windows): clients that
            # resend as soon as the last batch answers them arrive over some milliseconds, not at once.
            start = time.monotonic()
            deadline = start + self.batch_window_s
            most = QUEUED_BATCHES * self.max_batch
            while sum(w.n for w in waiting) < most:
                try:
                    waiting.append(self.queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
                deadline = min(time.monotonic() + self.batch_window_s, start + 10 * self.batch_window_s)
            batch, rows, rest = [], 0, []
            for work in (w for w in waiting if not w.future.cancelled()):  # a client that left is not decoded
                if work.sampling == waiting[0].sampling and (not batch or rows + work.n <= most):
                    batch.append(work)
                    rows += work.n
                else:
                    rest.append(work)
            waiting = rest
            if not batch:
                continue
            try:
                results = self._decode(batch)
            except Exception as e:  # answered as a 500 to every request of the batch
                results = [e] * len(batch)
            for work, result in zip(batch, results):
                try:
                    (work.future.set_exception if isinstance(result, Exception) else work.future.set_result)(result)
                except concurrent.futures.InvalidStateError:
                    pass  # its client left while it decoded

    def _decode(self, batch: list[Work]) -> list[list[Choice]]:
        prompts = [w.prompt for w in batch for _ in range(w.n)]
        limits = [w.max_tokens for w in batch for _ in range(w.n)]
        keys = jax.numpy.stack([jax.random.fold_in(jax.random.key(w.seed % (1 << 32)), j)
                                for w in batch for j in range(w.n)])
        stops = [[] if w.ignore_eos else self.stops for w in batch for _ in range(w.n)]
        start = time.perf_counter()
        out = self.sampler.generate(self.params, prompts, limits, keys, batch[0].sampling, stops,
                                    batch_rows=self.max_batch)
        self.stats["batches"] += 1
        self.stats["rows"] += len(prompts)
        self.stats["decode_s"] += time.perf_counter() - start
        wanted = [i for i, w in enumerate(w for w in batch for _ in range(w.n)) if w.top_logprobs is not None]
        alternatives = dict(zip(wanted, self.alternatives(self.params, [prompts[i] for i in wanted],
                                                          [out.tokens[i].tolist() for i in wanted])))
        results, row, content = [], 0, out.content()
        for work in batch:
            choices = []
            for _ in range(work.n):
                tokens = content[row].tolist()
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                finish = "stop" if out.stopped[row] else "length"
                cut = min((i for i in (text.find(s) for s in work.stop) if i >= 0), default=-1)
                if cut >= 0:
                    text, finish = text[:cut], "stop"
                logprobs = None
                if row in alternatives:
                    chosen, top_logp, top_ids = alternatives[row]
                    k = work.top_logprobs
                    logprobs = [(int(t), float(lp), list(zip(top_ids[i, :k].tolist(), top_logp[i, :k].tolist())))
                                for i, (t, lp) in enumerate(zip(out.tokens[row].tolist(), chosen))]
                choices.append(Choice(text, tokens, finish, logprobs))
                row += 1
            results.append(choices)
        return results

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)


def _number(body: dict, name: str, default, low=None, high=None, integer: bool = False, open_low: bool = False):
    value = body.get(name)
    if value is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ApiError(400, f"{name}: expected {kind}, got {value!r}", name)
    if not np.isfinite(value) or (low is not None and (value <= low if open_low else value < low)) or \
            (high is not None and value > high):
        bounds = f"{'above' if open_low else 'at least'} {low}" + (f" and at most {high}" if high is not None else "")
        raise ApiError(400, f"{name}: must be {bounds}, got {value!r}", name)
    return value


def _flag(body: dict, name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"{name}: expected a boolean, got {value!r}", name)
    return value


def _messages(body: dict) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages: expected a non-empty list of messages", "messages")
    parsed = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"{where}.role: expected one of {', '.join(ROLES)}", f"{where}.role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"{where}.content: only text parts are supported", f"{where}.content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"{where}.content: expected a string", f"{where}.content")
        parsed.append({"role": m["role"], "content": content})
    return parsed


def parse_request(engine: ServeEngine, served: str, body) -> tuple[Work, dict]:
    """The work a chat-completions body asks for, and how to answer (stream, model name); ApiError(400)
    naming the field where a field is wrong."""
    if not isinstance(body, dict):
        raise ApiError(400, "expected a JSON object")
    if body.get("model") != served:
        raise ApiError(404, f"The model {body.get('model')!r} does not exist; this server serves {served!r}",
                       "model", "model_not_found")
    for name in ("tools", "functions", "logit_bias"):
        if body.get(name):
            raise ApiError(400, f"{name}: not supported by dalign serve", name)
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, 0.0):
            raise ApiError(400, f"{name}: not supported by dalign serve (repetition_penalty is)", name)
    if isinstance(body.get("response_format"), dict) and body["response_format"].get("type") not in (None, "text"):
        raise ApiError(400, "response_format: only text is supported", "response_format")
    messages = _messages(body)
    n = _number(body, "n", 1, 1, engine.max_batch, integer=True)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, open_low=True)
    top_k = _number(body, "top_k", 0, -1, None, integer=True)
    min_p = _number(body, "min_p", 0.0, 0.0, 1.0)
    penalty = _number(body, "repetition_penalty", 1.0, 0.0, None, open_low=True)
    limit_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, limit_key, DEFAULT_MAX_TOKENS, 1, NEW_TOKEN_BUCKETS[-1], integer=True)
    seed = _number(body, "seed", None, -(1 << 63), (1 << 63) - 1, integer=True)
    logprobs = _flag(body, "logprobs", False)
    top_logprobs = _number(body, "top_logprobs", 0 if logprobs else None, 0, engine.max_logprobs, integer=True)
    if top_logprobs and not logprobs:
        raise ApiError(400, "top_logprobs: needs logprobs: true", "top_logprobs")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "stop: expected a string or a list of at most 4 non-empty strings", "stop")
    stream = _flag(body, "stream", False)
    ignore_eos = _flag(body, "ignore_eos", False)  # vLLM's: decode max_tokens whatever the model writes
    continue_final = _flag(body, "continue_final_message", False)
    generation_prompt = _flag(body, "add_generation_prompt", not continue_final)
    tok = engine.tokenizer
    if continue_final:
        if messages[-1]["role"] != "assistant":
            raise ApiError(400, "continue_final_message: the last message must be the assistant's",
                           "continue_final_message")
        head = messages[:-1]
        prompt = ((encode_chat(tok, head) if head else [])
                  + tok.encode(messages[-1]["content"], add_special_tokens=False))
    else:
        prompt = encode_conversation(tok, messages, add_generation_prompt=generation_prompt)[0]
    if not prompt:
        raise ApiError(400, "messages: encode to no tokens", "messages")
    context = engine.model.cfg.max_position
    if len(prompt) + max_tokens > context:
        raise ApiError(400, f"{limit_key}: {len(prompt)} prompt tokens plus {max_tokens} new ones exceed the "
                       f"model's context of {context}", limit_key)
    try:
        sampling = SamplingParams(temperature=float(temperature), top_k=max(0, top_k), top_p=float(top_p),
                                  min_p=float(min_p), repetition_penalty=float(penalty))
    except UserError as e:
        raise ApiError(400, str(e)) from None
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "big") >> 1
    work = Work(prompt, n, sampling, max_tokens, seed, top_logprobs if logprobs else None, stop, ignore_eos,
                concurrent.futures.Future())
    options = {"stream": stream, "usage_in_stream": isinstance(body.get("stream_options"), dict)
               and bool(body["stream_options"].get("include_usage"))}
    return work, options


def _logprobs_json(engine: ServeEngine, choice: Choice) -> dict | None:
    if choice.logprobs is None:
        return None

    def entry(token: int, logprob: float) -> dict:
        text = engine.token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [dict(entry(t, lp), top_logprobs=[entry(a, alp) for a, alp in top])
                        for t, lp, top in choice.logprobs]}


def _usage(work: Work, choices: list[Choice]) -> dict:
    completion = sum(len(c.tokens) for c in choices)
    return {"prompt_tokens": len(work.prompt), "completion_tokens": completion,
            "total_tokens": len(work.prompt) + completion}


def completion_json(engine: ServeEngine, served: str, work: Work, choices: list[Choice]) -> dict:
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": served,
            "choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                         "logprobs": _logprobs_json(engine, c), "finish_reason": c.finish_reason}
                        for i, c in enumerate(choices)],
            "usage": _usage(work, choices)}


def stream_events(engine: ServeEngine, served: str, work: Work, choices: list[Choice], usage: bool):
    """Server-sent events of a finished completion: a role delta, then one delta per token's text."""
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def event(choices_json: list, **extra) -> str:
        chunk = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": served,
                 "choices": choices_json, **extra}
        return f"data: {json.dumps(chunk)}\n\n"

    for i, c in enumerate(choices):
        yield event([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        sent = ""
        for t in range(1, len(c.tokens) + 1):
            text = engine.tokenizer.decode(c.tokens[:t], skip_special_tokens=True)[:len(c.text)]
            if len(text) > len(sent) and not text.endswith("\ufffd"):
                yield event([{"index": i, "delta": {"content": text[len(sent):]}, "finish_reason": None}])
                sent = text
        if len(sent) < len(c.text):
            yield event([{"index": i, "delta": {"content": c.text[len(sent):]}, "finish_reason": None}])
        yield event([{"index": i, "delta": {}, "finish_reason": c.finish_reason}])
    if usage:
        yield event([], usage=_usage(work, choices))
    yield "data: [DONE]\n\n"


def create_app(engine: ServeEngine, served: str, api_key: str | None = None):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title="dalign serve")

    def error(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    def authorised(request: Request) -> bool:
        return not api_key or request.headers.get("authorization") == f"Bearer {api_key}"

    unauthorised = ApiError(401, "Incorrect API key provided", code="invalid_api_key")

    @app.get("/v1/models")
    async def models(request: Request):
        if not authorised(request):
            return error(unauthorised)
        return {"object": "list", "data": [{"id": served, "object": "model", "created": 0, "owned_by": "dalign"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        if not authorised(request):
            return error(unauthorised)
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error(ApiError(400, "the request body is not valid JSON"))
        try:
            work, options = parse_request(engine, served, body)
            choices = await asyncio.wrap_future(engine.submit(work))
        except ApiError as e:
            return error(e)
        except UserError as e:
            return error(ApiError(400, str(e)))
        except Exception as e:  # noqa: BLE001 - the server keeps serving; the client is told
            return error(ApiError(500, f"{type(e).__name__}: {e}", kind="server_error"))
        if options["stream"]:
            return StreamingResponse(stream_events(engine, served, work, choices, options["usage_in_stream"]),
                                     media_type="text/event-stream")
        return completion_json(engine, served, work, choices)

    @app.get("/health")
    async def health():
        return {"status": "ok", **engine.stats}

    return app
