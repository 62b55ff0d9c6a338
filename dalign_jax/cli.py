"""The `dalign` command line."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from dalign_jax.errors import UserError

# transformers announces at import that PyTorch is absent; we never need it.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _read_prompts(path: Path) -> list[list[dict[str, str]]]:
    """A `.jsonl` file of {"prompt": ...} or {"messages": [...]} objects, or plain text, one prompt a line."""
    from dalign_jax.data.prompts import validate_messages
    from dalign_jax.userfiles import read_text

    conversations = []
    for lineno, line in enumerate(read_text(path, "prompts file").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            conversations.append([{"role": "user", "content": line}])
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: invalid JSON: {e.msg}") from None
        if isinstance(row, dict) and "prompt" in row:
            if not isinstance(row["prompt"], str) or not row["prompt"].strip():
                raise UserError(f"{path}:{lineno}: field prompt: expected a non-empty string")
            row = {"messages": [{"role": "user", "content": row["prompt"]}]}
        if not isinstance(row, dict) or "messages" not in row:
            raise UserError(f"{path}:{lineno}: expected a field 'prompt' (string) or 'messages' (list)")
        messages = validate_messages(row["messages"], f"{path}:{lineno}")
        conversations.append([{"role": role, "content": content} for role, content in messages])
    if not conversations:
        raise UserError(f"{path}: no prompts")
    return conversations


def _mesh(spec: str):
    from dalign_jax.parallel.mesh import make_mesh

    try:
        sizes = [int(x) for x in spec.split(",")]
    except ValueError:
        raise UserError(f"--mesh {spec!r}: expected three integers data,fsdp,tensor (for example -1,1,1)") from None
    if len(sizes) != 3:
        raise UserError(f"--mesh {spec!r}: expected three integers data,fsdp,tensor")
    return make_mesh(*sizes)


def cmd_generate(args) -> int:
    import jax

    from dalign_jax.engine.chat import complete_chats
    from dalign_jax.engine.sampler import Sampler, SamplingParams
    from dalign_jax.model.loader import load_model
    from dalign_jax.parallel.mesh import shard_params

    if (args.prompt is None) == (args.prompts_file is None):
        raise UserError("generate: give exactly one of --prompt or --prompts-file")
    if args.prompt is not None and not args.prompt.strip():
        raise UserError("generate: --prompt is empty")
    if args.max_new_tokens < 1:
        raise UserError(f"generate: --max-new-tokens must be at least 1, got {args.max_new_tokens}")
    conversations = ([[{"role": "user", "content": args.prompt}]] if args.prompt is not None
                     else _read_prompts(Path(args.prompts_file)))
    if args.system:
        conversations = [[{"role": "system", "content": args.system}] + c for c in conversations]
    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              min_p=args.min_p, repetition_penalty=args.repetition_penalty)
    mesh = _mesh(args.mesh)
    print(f"loading {args.model} ...", file=sys.stderr)
    model = load_model(args.model, need_tokenizer=True)
    params = shard_params(model.params, mesh)
    sampler = Sampler(model.cfg, mesh, pad_id=model.tokenizer.pad_token_id or 0)
    completions = complete_chats(model, sampler, params, conversations, args.max_new_tokens,
                                 jax.random.key(args.seed), sampling)
    for i, (conv, c) in enumerate(zip(conversations, completions)):
        if args.jsonl:
            print(json.dumps({"messages": conv, "completion": c.text, "finished": c.finished}, ensure_ascii=False))
        else:
            if len(completions) > 1:
                print(f"=== {i + 1}: {conv[-1]['content'][:70]}")
            print(c.text)
    return 0


def cmd_serve(args) -> int:
    import socket

    from dalign_jax.engine.server import ServeEngine, create_app
    from dalign_jax.model.loader import load_model

    for name, value, low in (("--port", args.port, 1), ("--max-batch", args.max_batch, 1),
                             ("--max-logprobs", args.max_logprobs, 0), ("--batch-window-ms", args.batch_window_ms, 0)):
        if not low <= value < float("inf"):
            raise UserError(f"serve: {name} must be at least {low}, got {value}")
    api_key = args.api_key or os.environ.get("DALIGN_API_KEY") or None
    try:  # a port in use is a clear error before the model loads, not uvicorn's traceback after
        with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((args.host, args.port))
    except OSError as e:
        raise UserError(f"serve: cannot listen on {args.host}:{args.port} ({e.strerror})") from None
    mesh = _mesh(args.mesh)
    print(f"loading {args.model} ...", file=sys.stderr)
    model = load_model(args.model, need_tokenizer=True)
    served = args.served_model_name or model.model_id
    engine = ServeEngine(model, mesh, max_batch=args.max_batch, batch_window_s=args.batch_window_ms / 1000,
                         max_logprobs=args.max_logprobs)
    app = create_app(engine, served, api_key)
    import uvicorn

    print(f"dalign serve: {served} at http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def cmd_export(args) -> int:
    from dalign_jax.model.hf_io import export_hf
    from dalign_jax.model.loader import load_model

    if not 0 < args.max_shard_mb < float("inf"):
        raise UserError(f"export: --max-shard-mb must be a positive number, got {args.max_shard_mb}")
    model = load_model(args.model)
    out = export_hf(args.out, model.hf_config, model.cfg, model.params, model.tokenizer,
                    max_shard_bytes=int(args.max_shard_mb * 1024 * 1024), generation=model.generation)
    print(f"exported {args.model} to {out}")
    return 0


def cmd_spec(args) -> int:
    from dalign_jax.data.spec import load_spec

    spec = load_spec(args.spec_dir)
    if args.action == "check":
        counts = ", ".join(f"{k}: {len(p.sections)}" for k, p in spec.policies.items())
        print(f"{args.spec_dir}: spec {spec.version}, {len(spec.section_ids)} sections ({counts})")
        return 0
    if not args.category:
        raise UserError("spec render: name a category (one of: " + ", ".join(spec.categories) + ")")
    text = spec.render(args.category)
    print(text)
    if args.model:
        from dalign_jax.model.loader import load_tokenizer

        print(f"\n[{len(load_tokenizer(args.model).encode(text, add_special_tokens=False))} tokens for "
              f"{args.model}; spec {spec.version}]", file=sys.stderr)
    return 0


def _stage(module: str, function: str):
    def load():
        import importlib

        return getattr(importlib.import_module(f"dalign_jax.stages.{module}"), function)
    return load


STAGES = {
    "distill": _stage("distill", "run_distill"),
    "judge": _stage("judge", "run_judge"),
    "sft": _stage("sft", "run_sft"),
    "rl": _stage("rl", "run_rl"),
    "eval": _stage("eval", "run_eval"),
    "report": _stage("report", "run_report"),
    "run": _stage("pipeline", "run_pipeline"),
}
STAGE_HELP = {
    "distill": "sample analyses and answers with the spec in context",
    "judge": "score distilled completions and write the SFT set",
    "sft": "fine-tune the policy on the judged set (spec removed), with checkpoints and HF export",
    "rl": "GRPO against the spec-aware judge (final answers only), with checkpoints and HF export",
    "eval": "evaluate base, SFT and RL models on prompt sets with the rule and judge graders",
    "report": "write report.md, report.html and plots from the evaluation and training logs",
    "run": "every stage in order: distill, judge, sft, rl, eval, report (finished work is skipped)",
}


def cmd_config(args) -> int:
    """Print the configuration a stage would run with: the file, the overrides and every default,
    as YAML that `dalign` reads back unchanged."""
    import yaml

    from dalign_jax.config import config_to_dict, load_config

    config = load_config(args.config, args.overrides)
    print(yaml.safe_dump(config_to_dict(config), sort_keys=False, default_flow_style=False), end="")
    return 0


def cmd_plan(args) -> int:
    """Each stage's memory per device and FLOPs from the models' configs alone; exit 2 where one
    cannot fit."""
    import jax

    from dalign_jax.config import load_config
    from dalign_jax.plan import GIB, STAGES, MeshShape, device_memory, format_plan, plan_config, refuse_unfit

    config = load_config(args.config, args.overrides)
    devices = args.devices or config.mesh.devices or jax.device_count()
    capacity, where = device_memory()
    if args.device_memory_gib:
        capacity, where = args.device_memory_gib * GIB, "--device-memory-gib"
    if args.peak_tflops:
        peak = args.peak_tflops * 1e12
    else:
        from dalign_jax.train.metrics import device_peak

        peak, _ = device_peak(config.models.matmul_dtype)
    plans = plan_config(config, devices)
    stages = args.stage or list(STAGES)
    plans = [p for p in plans if p.stage in stages]
    print(format_plan(plans, MeshShape.of(config.mesh, devices), capacity, where, peak))
    if capacity is not None:
        refuse_unfit(plans, capacity)
    return 0


def cmd_stage(args) -> int:
    from dalign_jax.config import load_config

    config = load_config(args.config, args.overrides)
    run = STAGES[args.command]()
    summary = run(config, force=args.force)
    print(json.dumps(summary, indent=2))
    return 0


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. prompts.limit=8")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dalign", description="Deliberative Alignment in JAX")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="answer prompts with a model (chat template applied)")
    gen.add_argument("--model", default="smollm2-135m", help="HF model directory, .gguf file, or alias")
    gen.add_argument("--prompt", help="one user message")
    gen.add_argument("--prompts-file", help="text file (one prompt a line) or JSONL with 'prompt' or 'messages'")
    gen.add_argument("--system", help="a system message put before every prompt")
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--repetition-penalty", type=float, default=1.0,
                     help="transformers' repetition penalty (1: off)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--mesh", default="-1,1,1", help="data,fsdp,tensor sizes; -1 takes the remaining devices")
    gen.add_argument("--jsonl", action="store_true", help="print one JSON object per prompt")
    gen.set_defaults(func=cmd_generate)

    srv = sub.add_parser("serve", help="serve a model over an OpenAI-compatible API (chat completions)")
    srv.add_argument("--model", default="smollm2-135m", help="HF model directory, .gguf file, or alias")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback unless told otherwise)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", help="require this bearer key (default: $DALIGN_API_KEY, else none)")
    srv.add_argument("--served-model-name", help="the name clients ask for (default: the model's id)")
    srv.add_argument("--max-batch", type=int, default=64, help="rows decoded together at most")
    srv.add_argument("--batch-window-ms", type=float, default=20.0,
                     help="a batch takes requests until none has come for this long (at most ten times it)")
    srv.add_argument("--max-logprobs", type=int, default=20, help="the largest top_logprobs a request may ask")
    srv.add_argument("--mesh", default="-1,1,1", help="data,fsdp,tensor sizes; -1 takes the remaining devices")
    srv.set_defaults(func=cmd_serve)

    exp = sub.add_parser("export", help="write a model as a Hugging Face directory")
    exp.add_argument("--model", required=True, help="HF model directory, .gguf file, or alias")
    exp.add_argument("--out", required=True, help="output directory: new, empty, or an earlier export (replaced atomically)")
    exp.add_argument("--max-shard-mb", type=float, default=2048, help="safetensors shard size")
    exp.set_defaults(func=cmd_export)

    spec = sub.add_parser("spec", help="check the spec, or print spec(category)")
    spec.add_argument("action", choices=["render", "check"])
    spec.add_argument("category", nargs="?")
    spec.add_argument("--spec-dir", default="specs")
    spec.add_argument("--model", default="smollm2-135m", help="tokenizer for the token count ('' for none)")
    spec.set_defaults(func=cmd_spec)

    show = sub.add_parser("config", help="print the resolved config (file, overrides and defaults) as YAML")
    _add_config_arguments(show)
    show.set_defaults(func=cmd_config)

    plan = sub.add_parser("plan", help="memory per device and FLOPs of every stage, before any weight is read")
    _add_config_arguments(plan)
    plan.add_argument("--devices", type=int, default=0, help="plan for this many devices (default: the config's "
                      "mesh.devices, else the devices present)")
    plan.add_argument("--device-memory-gib", type=float, default=0.0,
                      help="what one device holds (default: the runtime's limit; on a CPU, host memory / devices)")
    plan.add_argument("--peak-tflops", type=float, default=0.0,
                      help="one device's peak for the step times (default: the vendor's bf16 figure for a known "
                           "accelerator, else a measured matmul)")
    plan.add_argument("--stage", action="append", choices=["distill", "judge", "sft", "rl", "eval"],
                      help="plan only this stage (repeatable)")
    plan.set_defaults(func=cmd_plan)

    for name, text in STAGE_HELP.items():
        stage = sub.add_parser(name, help=text)
        _add_config_arguments(stage)
        stage.add_argument("--force", action="store_true", help="start the stage over despite changed inputs")
        stage.set_defaults(func=cmd_stage)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"dalign: error: {e}", file=sys.stderr)
        return 2


# Training steps run faster when freed memory is reused (hostmem) and the sampler slower, so only these
# commands re-exec under it; `run` starts them as child processes (figures: docs/benchmarks.md).
HEAP_REUSE_COMMANDS = ("sft", "rl")


def entry() -> None:
    """The `dalign` command."""
    if len(sys.argv) > 1 and sys.argv[1] in HEAP_REUSE_COMMANDS:
        from dalign_jax.hostmem import reexec_with_heap_reuse

        reexec_with_heap_reuse()
    sys.exit(main())


if __name__ == "__main__":
    entry()
