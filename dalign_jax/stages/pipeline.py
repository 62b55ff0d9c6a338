"""`dalign run`: every stage in order, each skipping the work its outputs show is done (a rerun after
a crash picks up inside the stage that was running)."""
from __future__ import annotations

import importlib
import sys

from dalign_jax.config import Config

ORDER = [("distill", "run_distill"), ("judge", "run_judge"), ("sft", "run_sft"), ("rl", "run_rl"),
         ("eval", "run_eval"), ("report", "run_report")]


def run_pipeline(config: Config, force: bool = False) -> dict:
    results = {}
    for number, (module, function) in enumerate(ORDER, 1):
        print(f"[{number}/{len(ORDER)}] {module}", file=sys.stderr, flush=True)
        stage = getattr(importlib.import_module(f"dalign_jax.stages.{module}"), function)
        summary = stage(config, force=force)
        results[module] = {k: v for k, v in summary.items() if not isinstance(v, (dict, list))}
    results["export"] = results["rl"].get("export")
    return results
