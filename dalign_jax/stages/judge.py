"""Stage: judge the distilled completions with the spec-aware judge, keep the best, and write the
SFT set with the spec removed from the prompt.

The judge (dalign_jax/engine/judge.py, local or at an endpoint) sees spec(category), the
conversation, the CoT (during filtering only) and the answer, and optionally the prompt set's expected
mode. Each completion is judged `judge.runs` times with differently worded instructions and keeps the
minimum.
"""
from __future__ import annotations

import json

import numpy as np
from tqdm import tqdm

from dalign_jax.config import Config
from dalign_jax.data.completion import format_completion
from dalign_jax.data.records import jsonl_text, read_jsonl, write_atomic, write_records
from dalign_jax.data.spec import Spec, load_spec
from dalign_jax.engine.judge import judge_messages, open_judge
from dalign_jax.errors import UserError
from dalign_jax.eval.graders import answer_fits_mode
from dalign_jax.stages.inputs import open_mesh
from dalign_jax.stages.outputs import check_run_header, ensure_writable, section


def _judge_shard(config: Config, spec: Spec, engine, records: list[dict]) -> list[dict]:
    # Grouped by category, so that each scorer batch shares spec(category) as a cached prefix. With
    # require_expected_mode, answers in the wrong mode are dropped by the rule before the judge runs.
    require = config.judge.require_expected_mode
    ok = sorted((r for r in records if r["parse_status"] == "ok" and (not require or mode_agrees(r))),
                key=lambda r: r["category"])
    runs = []
    for variant in range(config.judge.runs):
        conversations = [
            judge_messages(spec, r["category"], r["messages"], r["answer"], cot=r["cot"],
                           expected_mode=r["expected_mode"] if config.judge.use_expected_mode else None,
                           variant=variant)
            for r in ok
        ]
        runs.append(engine.score(conversations))
    by_key = {(r["prompt_id"], r["sample"]): [float(s[i]) for s in runs] for i, r in enumerate(ok)}
    scored = []
    for r in records:
        run_scores = by_key.get((r["prompt_id"], r["sample"]))
        scored.append(dict(r, judge_scores=run_scores, score=min(run_scores) if run_scores else None,
                           judge_model_id=engine.model_id))
    return scored


def mode_agrees(record: dict) -> bool:
    """The rule grader's reading of the answer fits the expected mode (or there is none)."""
    return answer_fits_mode(record["expected_mode"], record["answer"])


def select(scored: list[dict], threshold: float, best_of_n: int, require_mode: bool = False,
           best_of_n_by_mode: dict[str, int] | None = None) -> list[dict]:
    """The filter rule: judged, at least `threshold`, with `require_mode` the expected mode kept to,
    then the best `best_of_n` per prompt (`best_of_n_by_mode[expected mode]` where given)."""
    by_mode = best_of_n_by_mode or {}
    by_prompt: dict[str, list[dict]] = {}
    for r in scored:
        if r["score"] is not None and r["score"] >= threshold and (not require_mode or mode_agrees(r)):
            by_prompt.setdefault(r["prompt_id"], []).append(r)
    kept = []
    for rows in by_prompt.values():
        n = by_mode.get(rows[0].get("expected_mode"), best_of_n)
        kept.extend(sorted(rows, key=lambda r: (-r["score"], r["sample"]))[:n])
    return kept


def sft_record(r: dict) -> dict:
    """A training example: the original conversation (no spec, no instructions) and the completion."""
    return {"id": f"{r['prompt_id']}-{r['sample']}", "prompt_id": r["prompt_id"], "category": r["category"],
            "messages": r["messages"] + [{"role": "assistant", "content": format_completion(r["cot"], r["answer"])}],
            "score": r["score"], "spec_version": r["spec_version"], "model_id": r["model_id"],
            "judge_model_id": r["judge_model_id"]}


def summarise(scored: list[dict], kept: list[dict], require_mode: bool = False) -> dict:
    dropped: dict[str, int] = {}
    for r in scored:
        if r["parse_status"] != "ok":
            dropped[r["parse_status"]] = dropped.get(r["parse_status"], 0) + 1
    judged = [r for r in scored if r["score"] is not None]
    parsed = [r for r in scored if r["parse_status"] == "ok"]
    with_mode = [r for r in judged if r["expected_mode"] and r["decision"]]
    histogram = np.histogram([r["score"] for r in judged], bins=10, range=(0, 1))[0].tolist()
    return {
        "completions": len(scored), "judged": len(judged), "kept": len(kept),
        "kept_fraction": len(kept) / len(scored) if scored else 0.0,
        "dropped_malformed": dropped,
        "dropped_mode_mismatch": sum(not mode_agrees(r) for r in parsed) if require_mode else None,
        "score_histogram": {"bins": [round(i / 10, 1) for i in range(11)], "counts": histogram},
        "mean_score": float(np.mean([r["score"] for r in judged])) if judged else None,
        "mode_agreement": (sum(r["decision"] == r["expected_mode"] for r in with_mode) / len(with_mode)
                           if with_mode else None),
        "mode_agreement_count": len(with_mode),
    }


def run_judge(config: Config, force: bool = False) -> dict:
    spec = load_spec(config.spec_dir)
    distill_dir = config.run_path / "distill"
    distill_summary = distill_dir / "summary.json"
    if not distill_summary.is_file():
        raise UserError(f"{distill_dir}: no finished distillation; run `dalign distill` first")
    made_with = json.loads(distill_summary.read_text())
    if made_with["spec_version"] != spec.version:
        raise UserError(f"{distill_dir}: distilled with spec {made_with['spec_version']}, but {config.spec_dir} "
                        f"is now {spec.version}; distill again")
    out = config.run_path / "judge"
    mesh = open_mesh(config, "judge")
    engine = open_judge(config, mesh)
    ensure_writable(out)
    check_run_header(out, {"spec_version": spec.version, "judge_model_id": engine.model_id,
                           "distill_model_id": made_with["model_id"], "judge": section(config, "judge")}, force)
    shards = sorted(distill_dir.glob("shard-*.jsonl"))
    scored = []
    for shard in tqdm(shards, desc="judge shards", unit="shard"):
        target = out / f"scored-{shard.stem.split('-')[1]}.jsonl"
        if not target.is_file():
            rows = _judge_shard(config, spec, engine, read_jsonl(shard))
            write_atomic(target, jsonl_text(rows))
        scored.extend(read_jsonl(target))
    kept = select(scored, config.judge.threshold, config.judge.best_of_n, config.judge.require_expected_mode,
                  config.judge.best_of_n_by_mode)
    write_records(out / "sft", [sft_record(r) for r in kept])
    summary = dict(summarise(scored, kept, config.judge.require_expected_mode), spec_version=spec.version,
                   judge_model_id=engine.model_id, threshold=config.judge.threshold,
                   best_of_n=config.judge.best_of_n, best_of_n_by_mode=config.judge.best_of_n_by_mode,
                   complete=True)
    write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
