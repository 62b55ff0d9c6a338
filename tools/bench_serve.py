"""`dalign serve` throughput: concurrent clients, one client at a time, and HF transformers' `generate`.

The default model is served on a free loopback port. 64 chat requests (temperature 1, exactly
`--new-tokens` new tokens each: `ignore_eos`, as HF's `min_new_tokens`) go from 16 concurrent `openai`
clients, then one at a time; the peer runs HF `generate` (PyTorch, CPU) at batch 16 on the same prompts.
Every shape is warmed up first (compilation is not timed). Last lines:
RESULT serve_concurrent_tokens_per_s ours=<tok/s> peer=<HF batch 16 tok/s> ratio=<ours/peer>
RESULT serve_batching_gain ours=<concurrent tok/s over one-at-a-time tok/s>
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import socket
import subprocess
import sys
import time
import urllib.request

from bench_sampler import QUESTIONS, bench_peer as bench_peer_batch  # the same prompts and HF run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, extra: list[str]) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "dalign_jax.cli", "serve", "--model", model, "--port", str(port),
                             "--served-model-name", "bench", *extra])
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit("dalign serve exited")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2).read()
            return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("dalign serve did not come up")


def stats(url: str) -> dict:
    import json

    return json.loads(urllib.request.urlopen(url.removesuffix("/v1") + "/health").read())


def run_requests(url: str, requests: list[str], clients: int, new_tokens: int) -> tuple[float, int]:
    """(seconds, completion tokens) for `requests` sent by `clients` concurrent clients."""
    import openai

    pool = [openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=3600) for _ in range(clients)]

    def ask(i: int) -> int:
        reply = pool[i % clients].chat.completions.create(
            model="bench", messages=[{"role": "user", "content": requests[i]}], max_tokens=new_tokens,
            temperature=1.0, seed=i, extra_body={"ignore_eos": True})
        return reply.usage.completion_tokens

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as executor:
        tokens = sum(executor.map(ask, range(len(requests))))
    return time.perf_counter() - t0, tokens


def bench_peer(prompts: list[list[int]], new_tokens: int, batch: int, pad_id: int) -> float:
    import torch
    import transformers

    from dalign_jax.model.loader import DEFAULT_MODEL, resolve_model_path

    path = resolve_model_path(DEFAULT_MODEL)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                 dtype=torch.float32).eval()
    total, elapsed = 0, 0.0
    for start in range(0, len(prompts), batch):
        rows = prompts[start:start + batch]
        tokens = new_tokens * len(rows)  # min_new_tokens: exactly new_tokens a row
        elapsed += tokens / bench_peer_batch(hf_model, rows, new_tokens, pad_id)
        total += tokens
    return total / elapsed


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--server-args", default="", help="more `dalign serve` arguments, space-separated")
    parser.add_argument("--skip-single", action="store_true", help="skip the one-at-a-time run (and its RESULT)")
    parser.add_argument("--skip-peer", action="store_true", help="skip HF generate (and the RESULT lines)")
    args = parser.parse_args()

    from dalign_jax.engine.chat import encode_chat
    from dalign_jax.model.loader import DEFAULT_MODEL, load_tokenizer

    requests = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.requests)]
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    proc = start_server(DEFAULT_MODEL, port, args.server_args.split())
    try:
        # Warm-up: the batch shapes concurrent clients make, and one row.
        for _ in range(2):
            run_requests(url, requests[:args.clients], args.clients, args.new_tokens)
        run_requests(url, requests[:1], 1, args.new_tokens)
        before = stats(url)
        concurrent_s, concurrent_tokens = run_requests(url, requests, args.clients, args.new_tokens)
        concurrent_tps = concurrent_tokens / concurrent_s
        after = stats(url)
        batches = after["batches"] - before["batches"]
        print(f"{args.clients} concurrent clients: {concurrent_tokens} tokens in {concurrent_s:.1f} s "
              f"= {concurrent_tps:.1f} tok/s; {batches} batches of {(after['rows'] - before['rows']) / batches:.1f} "
              f"rows on average, {after['decode_s'] - before['decode_s']:.1f} s decoding", flush=True)
        if args.skip_single:
            return
        single_s, single_tokens = run_requests(url, requests, 1, args.new_tokens)
        single_tps = single_tokens / single_s
        print(f"one at a time: {single_tokens} tokens in {single_s:.1f} s = {single_tps:.1f} tok/s", flush=True)
    finally:
        proc.terminate()
        proc.wait()
    if args.skip_peer:
        return
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    prompts = [encode_chat(tokenizer, [{"role": "user", "content": q}]) for q in requests]
    peer = bench_peer(prompts, args.new_tokens, args.clients, tokenizer.pad_token_id or 0)
    print(f"HF generate, batch {args.clients}: {peer:.1f} tok/s (cpu count {os.cpu_count()})", flush=True)
    print(f"RESULT serve_concurrent_tokens_per_s ours={concurrent_tps:.1f} peer={peer:.1f} ratio={concurrent_tps / peer:.2f}")
    print(f"RESULT serve_batching_gain ours={concurrent_tps / single_tps:.2f}")


if __name__ == "__main__":
    main()
