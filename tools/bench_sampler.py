"""Sampler throughput: ours against HF transformers' `generate` (PyTorch, CPU), same model, same prompts.

Both sample (temperature 1) exactly NEW_TOKENS tokens per row for the same chat prompts at each batch
size. Ours is timed after one warm-up call per shape (compilation is reported separately); so is the peer.
`--weights` adds our sampler with narrow weights (`models.sample_dtype`: bfloat16, int8) against the peer
in float32, and the peer in bfloat16 against ours in bfloat16.
Last lines: RESULT sampler_b<B> ours=<tok/s> peer=<tok/s> ratio=<ours/peer> (float32 both), then
RESULT sampler_b<B>_<weights> (ours narrow, peer float32) and RESULT sampler_b<B>_bf16_both.
"""
from __future__ import annotations

import argparse
import time

import jax

from dalign_jax.engine.chat import encode_chat
from dalign_jax.engine.sampler import Sampler, SamplingParams
from dalign_jax.model.loader import DEFAULT_MODEL, load_model, resolve_model_path
from dalign_jax.parallel.mesh import make_mesh, shard_params

QUESTIONS = [
    "What is the capital of France?", "Write a haiku about autumn leaves.",
    "Explain how a rainbow forms, in two sentences.", "Give three tips for learning a new language.",
    "What is the difference between a list and a tuple in Python?", "Summarise the plot of Romeo and Juliet.",
    "How do vaccines train the immune system?", "Suggest a name for a friendly robot and say why.",
]


def prompts_for(tokenizer, batch: int) -> list[list[int]]:
    return [encode_chat(tokenizer, [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}])
            for i in range(batch)]


def bench_ours(model, sampler, params, prompts, new_tokens):
    sampling = SamplingParams(temperature=1.0)
    before = sampler.compile_count
    t0 = time.perf_counter()
    sampler.generate(params, prompts, new_tokens, jax.random.key(0), sampling)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = sampler.generate(params, prompts, new_tokens, jax.random.key(1), sampling)
    elapsed = time.perf_counter() - t0
    assert (out.lengths == new_tokens).all()
    return int(out.lengths.sum()) / elapsed, sampler.compile_count - before, compile_s


def bench_peer(hf_model, prompts, new_tokens, pad_id):
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kwargs = dict(attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True,
                  temperature=1.0, top_k=0, top_p=1.0, pad_token_id=pad_id)
    with torch.no_grad():
        hf_model.generate(ids, **dict(kwargs, max_new_tokens=4, min_new_tokens=4))  # warm-up
        t0 = time.perf_counter()
        out = hf_model.generate(ids, **kwargs)
        elapsed = time.perf_counter() - t0
    return (out.shape[1] - width) * len(prompts) / elapsed


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--weights", default="float32", help="our sampler's weights, e.g. float32,bfloat16,int8")
    args = parser.parse_args()
    weights = args.weights.split(",")

    import torch
    import transformers

    model = load_model(DEFAULT_MODEL)
    path = resolve_model_path(DEFAULT_MODEL)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                 dtype=torch.float32).eval()
    mesh = make_mesh()
    params = shard_params(model.params, mesh)
    pad = model.tokenizer.pad_token_id or 0
    samplers = {w: Sampler(model.cfg, mesh, pad_id=pad, weights=w) for w in ["float32"] + weights}
    print(f"devices: {jax.devices()}  torch threads: {torch.get_num_threads()}")
    results = []
    for batch in [int(b) for b in args.batches.split(",")]:
        prompts = prompts_for(model.tokenizer, batch)
        ours = {}
        for w in dict.fromkeys(["float32"] + weights):
            ours[w], compiles, compile_s = bench_ours(model, samplers[w], params, prompts, args.new_tokens)
            print(f"batch {batch}: ours ({w} weights) {ours[w]:.1f} tok/s ({compiles} compilation(s), first call "
                  f"{compile_s:.1f} s)", flush=True)
        peer = bench_peer(hf_model, prompts, args.new_tokens, pad)
        print(f"batch {batch}: peer {peer:.1f} tok/s", flush=True)
        results.append((f"sampler_b{batch}", ours["float32"], peer))
        results += [(f"sampler_b{batch}_{w}", ours[w], peer) for w in weights if w != "float32"]
        if "bfloat16" in weights:
            peer_bf16 = bench_peer(hf_model.to(torch.bfloat16), prompts, args.new_tokens, pad)
            hf_model.to(torch.float32)
            print(f"batch {batch}: peer in bfloat16 {peer_bf16:.1f} tok/s", flush=True)
            results.append((f"sampler_b{batch}_bf16_both", ours["bfloat16"], peer_bf16))
    print(f"compile count: {sum(s.compile_count for s in samplers.values())}")
    for name, ours, peer in results:
        print(f"RESULT {name} ours={ours:.1f} peer={peer:.1f} ratio={ours / peer:.2f}")


if __name__ == "__main__":
    main()
