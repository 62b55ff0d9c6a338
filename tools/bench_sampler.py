"""Sampler throughput: ours against HF transformers' `generate` (PyTorch, CPU), same model, same prompts.

Both sample (temperature 1) exactly NEW_TOKENS tokens per row for the same chat prompts at each batch
size. Ours is timed after one warm-up call per shape (compilation is reported separately); so is the peer.
`--weights` adds our sampler with narrow weights (`models.sample_dtype`: bfloat16, int8) against the peer
in float32, and the peer in bfloat16 against ours in bfloat16.
`--distill N` adds the distill workload: the default config's first N training prompts, category by
category behind their spec prefix, k = 2 samples each, at distill's temperature and top-p, up to
cot_tokens + answer_tokens tokens ending at the end of turn (so answers differ in length several times).
Ours runs it with static batches of batch_size x k rows (each call decodes until its longest row ends)
and with continuous batching on as many rows, in each of the `--weights`; the peer runs `generate` on
the same batches, in float32 and (with bfloat16 among the weights) bfloat16. Tokens count up to and
including each row's end of turn.
Last lines: RESULT sampler_b<B> ours=<tok/s> peer=<tok/s> ratio=<ours/peer> (float32 both), then
RESULT sampler_b<B>_<weights> (ours narrow, peer float32) and RESULT sampler_b<B>_bf16_both; with
--distill, RESULT distill_workload_tokens_per_s (ours continuous in the narrowest of --weights against
the faster peer) after one line per variant.
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


def left_padded(prompts, pad_id):
    """The peer's input ids and attention mask, prompts right-aligned."""
    import torch

    width = max(len(p) for p in prompts)
    return (torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts]),
            torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts]))


def bench_peer(hf_model, prompts, new_tokens, pad_id):
    import torch

    ids, mask = left_padded(prompts, pad_id)
    width = ids.shape[1]
    kwargs = dict(attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True,
                  temperature=1.0, top_k=0, top_p=1.0, pad_token_id=pad_id)
    with torch.no_grad():
        hf_model.generate(ids, **dict(kwargs, max_new_tokens=4, min_new_tokens=4))  # warm-up
        t0 = time.perf_counter()
        out = hf_model.generate(ids, **kwargs)
        elapsed = time.perf_counter() - t0
    return (out.shape[1] - width) * len(prompts) / elapsed


def distill_workload(model, n: int):
    """(the rows' prompts grouped by category, their limit, sampling, stop tokens, rows per static batch)."""
    from dalign_jax.config import load_config
    from dalign_jax.data.prompts import grouped
    from dalign_jax.data.spec import load_spec
    from dalign_jax.engine.chat import stop_token_ids
    from dalign_jax.stages.distill import distill_prompt_ids
    from dalign_jax.stages.inputs import open_prompts

    config = load_config(None)
    d = config.distill
    spec = load_spec(config.spec_dir)
    prompts = open_prompts(config, spec)[:n]
    groups = [[distill_prompt_ids(model.tokenizer, spec, p) for p in group for _ in range(d.samples_per_prompt)]
              for group in grouped(prompts, lambda p: p.category)]
    return groups, d.cot_tokens + d.answer_tokens, d.sampling_params(), stop_token_ids(model), \
        d.batch_size * d.samples_per_prompt


def bench_distill_ours(sampler, params, groups, limit, sampling, stops, rows, continuous: bool):
    """tokens/s of the second pass over the workload (the first compiles), and its compilations."""
    def run(seed):
        tokens = 0
        for g, group in enumerate(groups):
            key = jax.random.fold_in(jax.random.key(seed), g)
            if continuous:
                out = sampler.generate(params, group, limit, key, sampling, stops, batch_rows=rows)
                tokens += int(out.lengths.sum())
            else:
                for b in range(0, len(group), rows):
                    tokens += int(sampler.generate(params, group[b:b + rows], limit, jax.random.fold_in(key, b),
                                                   sampling, stops).lengths.sum())
        return tokens
    run(0)
    before = sampler.compile_count
    t0 = time.perf_counter()
    tokens = run(1)
    return tokens / (time.perf_counter() - t0), sampler.compile_count - before


def bench_distill_peer(hf_model, groups, limit, sampling, stops, rows, pad_id):
    import torch

    tokens, elapsed = 0, 0.0
    with torch.no_grad():
        for group in groups:
            for b in range(0, len(group), rows):
                batch = group[b:b + rows]
                ids, mask = left_padded(batch, pad_id)
                width = ids.shape[1]
                t0 = time.perf_counter()
                out = hf_model.generate(ids, attention_mask=mask, max_new_tokens=limit, do_sample=True,
                                        temperature=sampling.temperature, top_p=sampling.top_p, top_k=0,
                                        eos_token_id=stops, pad_token_id=pad_id)
                elapsed += time.perf_counter() - t0
                for row in out[:, width:].tolist():
                    ends = [i for i, t in enumerate(row) if t in stops]
                    tokens += ends[0] + 1 if ends else len(row)
    return tokens / elapsed


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--weights", default="float32", help="our sampler's weights, e.g. float32,bfloat16,int8")
    parser.add_argument("--distill", type=int, default=0, help="prompts of the distill workload (0: off)")
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
    for batch in [int(b) for b in args.batches.split(",") if b]:
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
    if args.distill:
        groups, limit, sampling, stops, rows = distill_workload(model, args.distill)
        print(f"distill workload: {sum(map(len, groups))} rows in {len(groups)} categories, up to {limit} tokens, "
              f"{rows} rows a batch", flush=True)
        ours = {}
        for w in dict.fromkeys(["float32"] + weights):
            for continuous in (False, True):
                rate, compiles = bench_distill_ours(samplers[w], params, groups, limit, sampling, stops, rows,
                                                    continuous)
                ours[w, continuous] = rate
                print(f"distill workload: ours ({w} weights, {'continuous' if continuous else 'static'}) "
                      f"{rate:.1f} tok/s ({compiles} compilation(s) in the timed pass)", flush=True)
        peers = {"float32": bench_distill_peer(hf_model, groups, limit, sampling, stops, rows, pad)}
        if "bfloat16" in weights:
            peers["bfloat16"] = bench_distill_peer(hf_model.to(torch.bfloat16), groups, limit, sampling, stops, rows,
                                                   pad)
            hf_model.to(torch.float32)
        for dtype, rate in peers.items():
            print(f"distill workload: peer ({dtype}) {rate:.1f} tok/s", flush=True)
        for (w, continuous), rate in ours.items():
            results.append((f"distill_{w}_{'continuous' if continuous else 'static'}", rate, peers["float32"]))
        best = weights[-1]
        results.append(("distill_workload_tokens_per_s", ours[best, True], max(peers.values())))
    print(f"compile count: {sum(s.compile_count for s in samplers.values())}")
    for name, ours, peer in results:
        print(f"RESULT {name} ours={ours:.1f} peer={peer:.1f} ratio={ours / peer:.2f}")


if __name__ == "__main__":
    main()
