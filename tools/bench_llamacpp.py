"""Our sampler against llama.cpp (through llama-cpp-python) on the same GGUF file of the default model:
greedy, 128 new tokens for each of the same chat prompts (their end-of-turn forbidden on both sides, so
every row runs its full length), llama.cpp one prompt at a time (its Python API decodes one sequence),
ours one at a time and all together.

llama-cpp-python builds llama.cpp from source when installed (minutes); it is neither a dependency of
the package nor installed by CI:

  pip install llama-cpp-python && python tools/bench_llamacpp.py

Where the difference goes: llama.cpp computes on the file's 4-bit blocks (Q4_1) with hand-written SIMD
kernels, so a decode step reads about a seventh of the bytes that our float32 weights take; the tool
prints both sizes. Last lines:
RESULT sampler_vs_llamacpp ours=<tok/s, batch 1> peer=<tok/s> ratio=<ours/peer>
RESULT sampler_b8_vs_llamacpp ours=<tok/s, the 8 prompts together> peer=<tok/s> ratio=<ours/peer>
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np

from bench_sampler import QUESTIONS, prompts_for
from dalign_jax.engine.sampler import GREEDY, Sampler
from dalign_jax.model.loader import DEFAULT_MODEL, load_model, resolve_model_path
from dalign_jax.parallel.mesh import make_mesh, shard_params


def bench_ours(sampler, params, prompts, new_tokens, together: bool) -> tuple[float, list[list[int]]]:
    groups = [prompts] if together else [[p] for p in prompts]
    for group in groups:  # every shape compiled before the timing
        sampler.generate(params, group, new_tokens, jax.random.key(0), GREEDY)
    start, tokens = time.perf_counter(), []
    for group in groups:
        out = sampler.generate(params, group, new_tokens, jax.random.key(0), GREEDY)
        tokens += [t.tolist() for t in out.tokens]
    return sum(map(len, tokens)) / (time.perf_counter() - start), tokens


def bench_llamacpp(path: str, prompts, new_tokens: int, forbidden: list[int], threads: int):
    from llama_cpp import Llama, LogitsProcessorList

    llm = Llama(model_path=path, n_ctx=1024, n_threads=threads, n_batch=512, verbose=False)

    def forbid(input_ids, scores):  # the end-of-turn tokens, as on our side: every row runs its length
        scores[forbidden] = -np.inf
        return scores

    def run(prompt, n):
        stream = llm.generate(prompt, top_k=1, temp=0.0, reset=True, logits_processor=LogitsProcessorList([forbid]))
        return [next(stream) for _ in range(n)]

    run(prompts[0], 4)  # warm-up
    start = time.perf_counter()
    tokens = [run(p, new_tokens) for p in prompts]
    return sum(map(len, tokens)) / (time.perf_counter() - start), tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit("bench_llamacpp: llama-cpp-python is not installed (pip install llama-cpp-python)")
    model = load_model(DEFAULT_MODEL, need_tokenizer=True)
    path = resolve_model_path(DEFAULT_MODEL)
    prompts = prompts_for(model.tokenizer, len(QUESTIONS))
    forbidden = sorted({model.tokenizer.eos_token_id, model.tokenizer.convert_tokens_to_ids("<|im_end|>")} - {None})
    mesh = make_mesh()
    sampler = Sampler(model.cfg, mesh, pad_id=model.tokenizer.pad_token_id or 0)
    params = shard_params(model.params, mesh)  # no stop tokens on our side: every row runs new_tokens
    print(f"devices: {jax.devices()}; llama-cpp-python {llama_cpp.__version__}, {args.threads} threads")
    print(f"weights read per decode step: ours {sum(x.nbytes for x in jax.tree.leaves(model.params)) / 1e6:.0f} MB "
          f"(float32), llama.cpp about {os.path.getsize(path) / 1e6:.0f} MB (the Q4_1 file)")
    one, ours_tokens = bench_ours(sampler, params, prompts, args.new_tokens, together=False)
    together, _ = bench_ours(sampler, params, prompts, args.new_tokens, together=True)
    peer, peer_tokens = bench_llamacpp(str(path), prompts, args.new_tokens, forbidden, args.threads)
    same = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y)))
            for x, y in zip(ours_tokens, peer_tokens)]
    print(f"ours one at a time {one:.1f} tok/s, all {len(prompts)} together {together:.1f} tok/s; "
          f"llama.cpp {peer:.1f} tok/s")
    print(f"greedy tokens equal before the first difference (of {args.new_tokens}): {same} "
          f"(median {int(np.median(same))}; llama.cpp computes on the 4-bit blocks, we on their float32 values)")
    print(f"RESULT sampler_vs_llamacpp ours={one:.1f} peer={peer:.1f} ratio={one / peer:.2f}")
    print(f"RESULT sampler_b8_vs_llamacpp ours={together:.1f} peer={peer:.1f} ratio={together / peer:.2f}")


if __name__ == "__main__":
    main()
