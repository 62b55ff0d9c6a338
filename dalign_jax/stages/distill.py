"""Stage: context distillation. The teacher (the policy unless `models.teacher` names another model,
local or at an endpoint), shown spec(category) and instructions, writes k analyses-plus-answers per
prompt; each is parsed and recorded with the spec and model that made it.

Prompts are cut into shards of `distill.shard_size`; a shard is written whole (atomically) or not at
all, and its randomness depends only on the seed and its index, so a rerun after a crash skips the
finished shards and produces the same records an uninterrupted run would.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json

import jax
from tqdm import tqdm

from dalign_jax.config import Config, Distill, Endpoint
from dalign_jax.data.completion import (
    ANSWER_DELIMITER,
    COT_PREFIX,
    DISTILL_INSTRUCTIONS,
    end_on_decision,
    parse_completion,
    trim_answer,
)
from dalign_jax.data.prompts import grouped
from dalign_jax.data.records import read_jsonl, write_atomic, write_records
from dalign_jax.data.spec import Spec, load_spec
from dalign_jax.engine.chat import encode_chat, stop_token_ids
from dalign_jax.engine.sampler import Sampler
from dalign_jax.stages.inputs import open_mesh, open_model, open_prompts
from dalign_jax.stages.outputs import check_run_header, ensure_writable, section

MODE_HINTS = {"comply": "comply, helping with the request in full", "refuse": "refuse",
              "safe_complete": "give a safe completion"}


def distill_messages(spec: Spec, prompt, mode_hint: bool = False) -> list[dict]:
    """The conversation the policy sees while distilling: spec(category) and instructions first, then
    (with `mode_hint`) the prompt set's expected mode; SFT keeps none of this system turn."""
    system = f"{spec.render(prompt.category)}\n\n{DISTILL_INSTRUCTIONS}"
    if mode_hint and prompt.expected_mode:
        system += (f"\n\nA reviewer who knows the specification has judged the ideal response to this request: "
                   f"{MODE_HINTS[prompt.expected_mode]}. Explain that decision from the sections that apply, "
                   f"and write the final answer in the matching style.")
    return [{"role": "system", "content": system}] + prompt.chat()


def listed(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def cot_conclusion(spec: Spec, prompt, distill: Distill) -> str:
    """`distill.scaffold.cot_conclusion` for the prompt's expected mode, naming its policy and that
    policy's sections for the mode ("" when there is none)."""
    template = distill.scaffold.cot_conclusion.get(prompt.expected_mode)
    if not template:
        return ""
    policy = spec.policy(prompt.category)
    ids = [s.id for s in policy.sections if s.mode == prompt.expected_mode] or [policy.prefix]
    return template.format(category=policy.title, sections=listed(ids))


def templated_analysis(spec: Spec, prompt, distill: Distill) -> str:
    """The analysis `distill.scaffold.analysis_template` writes for a prompt with an expected mode: the
    template on the request, the conclusion, the decision (what end_on_decision makes of a sampled analysis)."""
    request = prompt.chat()[-1]["content"]
    lines = [f"{COT_PREFIX} {distill.scaffold.analysis_template.format(request=request)}",
             cot_conclusion(spec, prompt, distill), f"Decision: {prompt.expected_mode}"]
    return "\n".join(line for line in lines if line)


def samples_for(distill: Distill, prompt) -> int:
    """How many completions the teacher writes for the prompt (`samples_by_mode`, else `samples_per_prompt`)."""
    return distill.scaffold.samples_by_mode.get(prompt.expected_mode, distill.samples_per_prompt)


def distill_prompt_ids(tokenizer, spec: Spec, prompt, mode_hint: bool = False) -> list[int]:
    # The assistant turn is started with the CoT prefix, which steers a small model into the format.
    return (encode_chat(tokenizer, distill_messages(spec, prompt, mode_hint))
            + tokenizer.encode(COT_PREFIX, add_special_tokens=False))


def completion_record(config: Config, spec: Spec, model_id: str, prompt, sample: int, text: str, done: bool) -> dict:
    """One distilled completion, its answer trimmed as `distill` says and parsed, with what made it."""
    d = config.distill
    head, sep, answer = text.partition(ANSWER_DELIMITER)
    trimmed = False
    if sep:
        scaffold = d.scaffold
        kept, done = trim_answer(answer, done, scaffold.answer_sentences.get(prompt.expected_mode, 0),
                                 scaffold.trim_truncated)
        trimmed, text = len(kept) < len(answer), head + sep + kept
    parsed = parse_completion(text, finished=done)
    return {
        "prompt_id": prompt.id, "sample": sample, "category": prompt.category,
        "expected_mode": prompt.expected_mode, "kind": prompt.kind, "messages": prompt.chat(),
        "completion": text, "trimmed": trimmed, "cot": parsed.cot, "answer": parsed.answer,
        "parse_status": parsed.status,
        "decision": parsed.decision, "cited_sections": list(parsed.cited_sections),
        "spec_version": spec.version, "model_id": model_id,
        "sampling": {"temperature": d.temperature, "top_k": d.top_k, "top_p": d.top_p,
                     "cot_tokens": d.cot_tokens, "answer_tokens": d.answer_tokens,
                     "force_format": d.force_format, "mode_hint": d.scaffold.mode_hint,
                     "cot_sentences": d.scaffold.cot_sentences, "cot_conclusion": d.scaffold.cot_conclusion,
                     "analysis_template": d.scaffold.analysis_template,
                     "answer_prefix": d.scaffold.answer_prefix,
                     "answer_sentences": d.scaffold.answer_sentences,
                     "trim_truncated": d.scaffold.trim_truncated,
                     "seed": config.seed},
    }


def request_seed(seed: int, shard: int, prompt_id: str) -> int:
    """The seed an endpoint samples a prompt's completions with: the same on every rerun of a shard."""
    digest = hashlib.sha256(f"{seed}/{shard}/{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") >> 1


def _remote_shard_records(config: Config, spec: Spec, teacher, prompts, shard: int) -> list[dict]:
    """A shard's completions from a teacher at an endpoint: one chat request per prompt with n samples."""
    d = config.distill
    extra = {name: value for name, value, off in (("top_k", d.top_k, 0), ("min_p", d.min_p, 0.0),
                                                 ("repetition_penalty", d.repetition_penalty, 1.0)) if value != off}
    requests = [dict({"messages": distill_messages(spec, p, d.scaffold.mode_hint), "n": samples_for(d, p),
                      "temperature": d.temperature, "top_p": d.top_p, "max_tokens": d.cot_tokens + d.answer_tokens,
                      "seed": request_seed(config.seed, shard, p.id)}, **({"extra_body": extra} if extra else {}))
                for p in prompts]
    records = []
    for prompt, reply in zip(prompts, teacher.chat(requests)):
        for sample, choice in enumerate(sorted(reply.choices, key=lambda c: c.index)[:samples_for(d, prompt)]):
            records.append(completion_record(config, spec, teacher.model_id, prompt, sample,
                                             choice.message.content or "", choice.finish_reason == "stop"))
    return records


def _shard_records(config: Config, spec: Spec, model, sampler, params, prompts, shard: int) -> list[dict]:
    d = config.distill
    sampling = d.sampling_params()
    stops = stop_token_ids(model)
    # One sampler call per category, so its inputs share spec(category) as a cached prefix, batched
    # continuously on batch_size x samples_per_prompt rows.
    row_budget = d.batch_size * d.samples_per_prompt
    records = []
    tok = model.tokenizer
    for batch in grouped(prompts, lambda p: p.category):
        ids = [distill_prompt_ids(tok, spec, p, d.scaffold.mode_hint) for p in batch]
        counts = [samples_for(d, p) for p in batch]
        rows = [x for x, k in zip(ids, counts) for _ in range(k)]
        row_prompts = [p for p, k in zip(batch, counts) for _ in range(k)]
        row_samples = [i for k in counts for i in range(k)]
        # A completion's key is its prompt's (the seed an endpoint is sent) and its sample number:
        # the records do not depend on the batching, and a rerun of the shard writes the same.
        keys = jax.numpy.stack([jax.random.fold_in(jax.random.key(request_seed(config.seed, shard, p.id)), i)
                                for p, i in zip(row_prompts, row_samples)])
        templated = bool(d.scaffold.analysis_template) and all(p.expected_mode for p in batch)
        if templated:  # no analysis to sample: the answer pass below is the teacher's only one
            texts, finished = [""] * len(rows), [True] * len(rows)
        else:
            limit = d.cot_tokens if d.force_format else d.cot_tokens + d.answer_tokens
            out = sampler.generate(params, rows, limit, keys, sampling, stops, batch_rows=row_budget)
            texts = [COT_PREFIX + tok.decode(t) for t in out.content()]
            finished = [bool(s) for s in out.stopped]
        if d.force_format:
            cots = [t.partition(ANSWER_DELIMITER)[0].rstrip() for t in texts]
            if d.scaffold.mode_hint:
                cots = [(templated_analysis(spec, p, d) if d.scaffold.analysis_template else
                         end_on_decision(c, p.expected_mode, d.scaffold.cot_sentences, cot_conclusion(spec, p, d)))
                        if p.expected_mode else c for c, p in zip(cots, row_prompts)]
            starts = [f"{c}\n{ANSWER_DELIMITER}\n{d.scaffold.answer_prefix.get(p.expected_mode, '')}"
                      for c, p in zip(cots, row_prompts)]
            answer_rows = [r + tok.encode(s[len(COT_PREFIX):], add_special_tokens=False) for r, s in zip(rows, starts)]
            answer_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1 << 20))(keys)
            answers = sampler.generate(params, answer_rows, d.answer_tokens, answer_keys, sampling, stops,
                                       batch_rows=row_budget)
            texts = [s + tok.decode(t) for s, t in zip(starts, answers.content())]
            finished = [bool(s) for s in answers.stopped]
        records += [completion_record(config, spec, model.model_id, prompt, sample, text, done)
                    for prompt, sample, text, done in zip(row_prompts, row_samples, texts, finished)]
    return records


def run_distill(config: Config, force: bool = False) -> dict:
    from dalign_jax.engine.remote import RemoteModel
    from dalign_jax.parallel.mesh import shard_params

    spec = load_spec(config.spec_dir)
    prompts = open_prompts(config, spec)
    out = config.run_path / "distill"
    teacher_ref = config.models.teacher or config.models.policy
    remote = isinstance(teacher_ref, Endpoint)
    if config.distill.force_format is None:  # a Config built in code, not by load_config
        config = dataclasses.replace(config, distill=dataclasses.replace(config.distill, force_format=not remote))
    if remote:  # asked before anything is written, so an unreachable server leaves no output
        model = RemoteModel(teacher_ref, "teacher")
    else:
        mesh = open_mesh(config, "distill")
        model = open_model(config, teacher_ref)
    ensure_writable(out)
    check_run_header(out, {"spec_version": spec.version, "model_id": model.model_id, "seed": config.seed,
                           "prompts": section(config, "prompts"), "distill": section(config, "distill")}, force)
    if not remote:
        params = shard_params(model.params, mesh)
        sampler = Sampler(model.cfg, mesh, pad_id=model.tokenizer.pad_token_id or 0, weights=config.models.sample_dtype)
    # Shards take the prompts category by category: batches hold one category each, and a category cut
    # in two (by a shard, or an extra set after the main one) leaves one more part-filled batch.
    prompts = [p for group in grouped(prompts, lambda p: p.category) for p in group]
    size = config.distill.shard_size
    shards = [prompts[i:i + size] for i in range(0, len(prompts), size)]
    for i, shard in enumerate(tqdm(shards, desc="distill shards", unit="shard")):
        stem = out / f"shard-{i:05d}"
        if stem.with_suffix(".jsonl").is_file():
            continue  # finished before a crash
        write_records(stem, _remote_shard_records(config, spec, model, shard, i) if remote else
                      _shard_records(config, spec, model, sampler, params, shard, i))
    records = [r for i in range(len(shards)) for r in read_jsonl(out / f"shard-{i:05d}.jsonl")]
    statuses: dict[str, int] = {}
    for r in records:
        statuses[r["parse_status"]] = statuses.get(r["parse_status"], 0) + 1
    summary = {"records": len(records), "prompts": len(prompts), "shards": len(shards),
               "parse_status": statuses, "trimmed": sum(bool(r.get("trimmed")) for r in records),
               "spec_version": spec.version, "model_id": model.model_id,
               "compilations": 0 if remote else sampler.compile_count, "complete": True}
    write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary

