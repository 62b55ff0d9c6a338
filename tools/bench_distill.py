"""Distillation and judge throughput on the embedded default model.

- distill_tokens_per_s: sampled tokens per second of the distill stage's sampler calls (spec in
  context, prefix shared), after one warm-up call.
- judge_prefill_tokens_per_s: judge inputs (spec(category) + conversation + CoT + answer) scored with
  our compiled forward pass against transformers' forward (PyTorch, CPU) on the same inputs in the
  same batches, both without prefix caching and both computing the last position's logits only.
- judge_prefill_mfu: our prefill's matmul FLOP rate over the matmul ceiling (operands in
  `--matmul-dtype`) measured around it: the projections' products, and attention's (each query against
  its own and earlier keys, as a causal model needs; the keys after it, which no implementation needs,
  are not counted).
- prefix_cache_speedup: judge scoring time without / with shared-prefix caching, for inputs behind a
  spec of at least 2,000 tokens.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from cpu_devices import add_devices_argument, use_cpu_devices  # (tools/ is on the path when a tool runs)

if __name__ == "__main__":  # the device count must be set before JAX is imported
    use_cpu_devices()

import jax  # noqa: E402

from dalign_jax.data.prompts import read_prompts, split  # noqa: E402
from dalign_jax.data.spec import load_spec  # noqa: E402
from dalign_jax.engine.chat import encode_chat  # noqa: E402
from dalign_jax.engine.sampler import Sampler, SamplingParams  # noqa: E402
from dalign_jax.engine.scorer import Scorer, score_tokens  # noqa: E402
from dalign_jax.model.loader import DEFAULT_MODEL, load_model, resolve_model_path  # noqa: E402
from dalign_jax.parallel.mesh import make_mesh, shard_params  # noqa: E402
from dalign_jax.stages.distill import distill_prompt_ids  # noqa: E402
from dalign_jax.engine.judge import SCORE_PREFILL, judge_messages  # noqa: E402
from dalign_jax.train.metrics import peak_flops_around  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COT = "Analysis: The user asks a question. VI-1 says history and analysis are allowed. Decision: comply"
ANSWER = "Here is a short, factual overview of the topic you asked about."


def judge_inputs(model, spec, prompts, prefill, long_spec: str | None = None):
    rows = []
    for p in prompts:
        messages = judge_messages(spec, p.category, p.chat(), ANSWER, cot=COT, expected_mode=p.expected_mode)
        if long_spec is not None:
            messages[0]["content"] = long_spec + messages[0]["content"][len(spec.render(p.category)):]
        rows.append(encode_chat(model.tokenizer, messages) + model.tokenizer.encode(prefill, add_special_tokens=False))
    return rows


def time_scorer(scorer, params, batches) -> float:
    for b in batches:  # compile every batch's shape (their lengths may fall in different buckets)
        scorer.score(params, b)
    scorer.prefixes.clear()  # the timed run computes its shared prefix once, as a real run does
    t0 = time.perf_counter()
    for b in batches:
        scorer.score(params, b)
    return time.perf_counter() - t0


def peer_prefill(hf_model, batches, pad_id, bf16: bool = False) -> float:
    import torch

    def run(batch):
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            hf_model(input_ids=ids, attention_mask=mask, logits_to_keep=1)

    run(batches[0][:1])
    t0 = time.perf_counter()
    for b in batches:
        run(b)
    return time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--judge-inputs", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--matmul-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="ours as under models.matmul_dtype (MFU against that dtype's matmul ceiling), "
                             "the peer under torch's CPU autocast to bf16")
    add_devices_argument(parser)
    args = parser.parse_args()

    import torch
    import transformers

    spec = load_spec(ROOT / "specs")
    prompts = split(read_prompts(ROOT / "specs/prompts/safety_prompts.jsonl", spec.categories), "train")
    model = load_model(DEFAULT_MODEL, matmul_dtype=args.matmul_dtype)
    mesh = make_mesh()
    params = shard_params(model.params, mesh)
    print(f"devices {jax.devices()}")

    # Distill: one category, k = 2, the spec shared as a cached prefix.
    sampler = Sampler(model.cfg, mesh)
    group = [p for p in prompts if p.category == "violence"][:8]
    rows = [x for p in group for x in [distill_prompt_ids(model.tokenizer, spec, p)] * 2]
    sampling = SamplingParams(temperature=0.8, top_p=0.95)
    sampler.generate(params, rows, 64, jax.random.key(0), sampling)
    t0 = time.perf_counter()
    out = sampler.generate(params, rows, 64, jax.random.key(1), sampling)
    distill_tps = int(out.lengths.sum()) / (time.perf_counter() - t0)

    # Judge prefill, ours against transformers, no prefix caching on either side.
    prefill, score_ids = score_tokens(model.tokenizer, SCORE_PREFILL)
    by_category = sorted(prompts, key=lambda p: p.category)[:: max(1, len(prompts) // args.judge_inputs)]
    # In batches of inputs of about the same length, as the judge stage makes them (sorted by length
    # within each spec; here no prefix is shared, so across specs): each batch pads to its longest.
    inputs = sorted(judge_inputs(model, spec, by_category[:args.judge_inputs], prefill), key=len)
    batches = [inputs[i:i + args.batch] for i in range(0, len(inputs), args.batch)]
    tokens = sum(len(p) for p in inputs)
    plain = Scorer(model.cfg, mesh, score_ids, prefix_min_tokens=0)
    ours_s, ceiling, before = peak_flops_around(lambda: time_scorer(plain, params, batches), dtype=args.matmul_dtype)
    print(f"matmul ceiling: {ceiling / 1e9:.1f} GFLOP/s (before ours {before / 1e9:.1f})")
    path = resolve_model_path(DEFAULT_MODEL)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                 dtype=torch.float32).eval()
    peer_s = peer_prefill(hf_model, batches, model.tokenizer.pad_token_id or 0, args.matmul_dtype == "bfloat16")
    # The matmul FLOPs needed: the projections of every layer for every token, except that the last
    # layer makes only its keys and values for all but each input's last token (`forward(last_only=
    # True)`), the vocabulary projection of one token per input left out, as before; and attention's
    # two products (scores and values), each 2 x head_dim FLOPs per query head for each key a query
    # sees: the n (n + 1) / 2 pairs of a causal input of n tokens, in the last layer its last token's n.
    cfg = model.cfg
    layer_params = [sum(int(x.size) for x in jax.tree.leaves(lp)) for lp in model.params["layers"]]
    last_kv = model.params["layers"][-1]["wk"].size + model.params["layers"][-1]["wv"].size
    projection_flops = 2 * (tokens * (sum(layer_params) - layer_params[-1] + last_kv)
                            + len(inputs) * (layer_params[-1] - last_kv))
    pair_flops = 2 * 2 * cfg.num_heads * cfg.head_dim
    attention_flops = pair_flops * sum((cfg.num_layers - 1) * len(p) * (len(p) + 1) // 2 + len(p) for p in inputs)
    flops = projection_flops + attention_flops
    mfu = flops / ours_s / ceiling
    print(f"judge prefill: {len(inputs)} inputs, {tokens} tokens (mean {tokens / len(inputs):.0f}); "
          f"{flops / 1e12:.2f} TFLOP, {attention_flops / flops:.0%} of it attention's; the projections alone: "
          f"{projection_flops / ours_s / ceiling:.2f} of the ceiling")

    # Prefix caching: one category, a spec of at least 2,000 tokens.
    policies = "\n\n".join(p.render_full() for p in spec.policies.values())
    long_spec = f"# Safety specification\n\n{policies}\n\n{spec.style}"
    while len(model.tokenizer.encode(long_spec)) < 2000:
        long_spec += "\n\n" + policies
    spec_tokens = len(model.tokenizer.encode(long_spec))
    same_category = [p for p in prompts if p.category == "violence"][:args.batch * 2]
    long_inputs = judge_inputs(model, spec, same_category, prefill, long_spec=long_spec)
    long_batches = [long_inputs[i:i + args.batch] for i in range(0, len(long_inputs), args.batch)]
    without = time_scorer(Scorer(model.cfg, mesh, score_ids, prefix_min_tokens=0), params, long_batches)
    cached = Scorer(model.cfg, mesh, score_ids, prefix_min_tokens=256)
    with_cache = time_scorer(cached, params, long_batches)
    print(f"prefix caching: spec of {spec_tokens} tokens, {len(long_inputs)} inputs; "
          f"{without:.1f} s without, {with_cache:.1f} s with")

    print(f"RESULT distill_tokens_per_s ours={distill_tps:.1f}")
    print(f"RESULT judge_prefill_tokens_per_s ours={tokens / ours_s:.1f} peer={tokens / peer_s:.1f} "
          f"ratio={peer_s / ours_s:.2f}")
    print(f"RESULT judge_prefill_mfu ours={mfu:.2f}")
    print(f"RESULT prefix_cache_speedup ours={without / with_cache:.2f}")


if __name__ == "__main__":
    main()
