"""Stage: the report. report.md and a self-contained report.html (plots embedded) in run_dir, with
the metrics per checkpoint and prompt set under both graders, the Pareto plot (not_unsafe against
not_overrefuse, one point per checkpoint), the SFT loss and RL reward curves, and example analyses
and answers per category."""
from __future__ import annotations

import base64
import html
import json

from dalign_jax.config import Config
from dalign_jax.data.records import read_jsonl, write_atomic
from dalign_jax.errors import UserError

METRICS = ["not_unsafe", "not_overrefuse", "goodness_at_0.1", "style_adherence", "policy_retrieval",
           "cot_answer_agreement", "citation_validity", "helpfulness", "goodness"]
EXAMPLE_CHARS = 700


def _cell(m: dict | None) -> str:
    if not m or m.get("value") is None:
        return "-"
    ci = f" [{m['ci95'][0]:.2f}, {m['ci95'][1]:.2f}]" if m.get("ci95") else ""
    return f"{m['value']:.2f}{ci} (n={m['n']})"


DECISION_METRICS = ("not_unsafe", "not_overrefuse", "goodness_at_0.1", "goodness")


def metric_tables(metrics: dict, warnings: list[str] | None = None) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) per prompt set and grader. A model grader that gave every checkpoint the
    same extreme on every decision metric (the judge calling every answer good) tells nothing: its
    table is left out and a line added to `warnings` instead."""
    sets = sorted({s for per_set in metrics.values() for s in per_set})
    tables = []
    for name in sets:
        for grader in ("rule", "judge", "rubric"):
            rows, values = [], set()
            for checkpoint, per_set in metrics.items():
                graded = per_set.get(name, {}).get(grader)
                if graded:
                    rows.append([checkpoint] + [_cell(graded.get(m)) for m in METRICS])
                    values |= {round(graded[m]["value"], 6) for m in DECISION_METRICS
                               if (graded.get(m) or {}).get("value") is not None}
            if rows and grader != "rule" and len(values) == 1 and values <= {0.0, 1.0}:
                if warnings is not None:
                    warnings.append(f"{name}, {grader} grader: {values.pop():.2f} on every decision metric for every "
                                    "checkpoint; it grades every answer alike here, so its figures are not shown")
                continue
            if rows:
                tables.append((f"{name}, {grader} grader", ["checkpoint"] + METRICS, rows))
    return tables


def reward_warnings(rl_rows: list[dict]) -> list[str]:
    """Lines for a reward that taught nothing: the same mean at every step, or every group's rewards
    equal at every step (no advantage anywhere)."""
    steps = [r for r in rl_rows if "reward" in r]
    if len(steps) < 2:
        return []
    warnings = []
    for key in ["reward"] + sorted({k for r in steps for k in r if k.startswith("reward_") and k != "reward_s"}):
        values = {round(r[key], 6) for r in steps if r.get(key) is not None}
        if len(values) == 1:
            warnings.append(f"rl: {key} was {values.pop():.4g} at every one of {len(steps)} steps")
    if all(r.get("zero_std_groups") == 1.0 for r in steps):
        warnings.append("rl: at every step every group's rewards were equal, so no completion had an advantage "
                        "and the policy learned nothing from them")
    return warnings


def point_labels(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """One label per position: checkpoints that land on the same point (an RL model whose greedy
    decisions SFT's already were) share one, "sft, rl", instead of two drawn over each other."""
    merged: dict[tuple[float, float], tuple[float, float, list[str]]] = {}
    for x, y, name in points:
        names = merged.setdefault((round(x, 3), round(y, 3)), (x, y, []))[2]
        if name not in names:
            names.append(name)
    return [(x, y, ", ".join(names)) for x, y, names in merged.values()]


def _plots(metrics: dict, sft_rows: list[dict], rl_rows: list[dict]) -> dict[str, bytes]:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = {}
    # One plot per set with allowed and disallowed prompts: pareto.png for our held-out prompts (else the
    # first such set), pareto-<set>.png for each other.
    sets = list(dict.fromkeys(s for per_set in metrics.values() for s in per_set))
    both = [s for s in sets if any((per_set.get(s, {}).get("rule", {}).get("not_overrefuse") or {}).get("n")
                                   and (per_set.get(s, {}).get("rule", {}).get("not_unsafe") or {}).get("n")
                                   for per_set in metrics.values())]
    main = "heldout" if "heldout" in sets else (both[0] if both else sets[0])
    for name in [main] + [s for s in both if s != main]:
        images["pareto.png" if name == main else f"pareto-{name}.png"] = _png(_pareto(metrics, name, plt), plt, io)

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    train = [(r["step"], r["loss"]) for r in sft_rows if "loss" in r]
    held = [(r["step"], r["eval_loss"]) for r in sft_rows if r.get("eval_loss") is not None]
    if train:
        left.plot(*zip(*train), label="train loss")
    if held:
        left.plot(*zip(*held), "o-", label="held-out loss")
    left.set(title="SFT", xlabel="step", ylabel="loss")
    left.legend(fontsize=8)
    reward = [(r["step"], r["reward"]) for r in rl_rows if "reward" in r]
    if reward:
        right.plot(*zip(*reward), label="mean reward")
    right.set(title="RL", xlabel="step", ylabel="reward")
    right.legend(fontsize=8)
    fig.tight_layout()
    images["curves.png"] = _png(fig, plt, io)
    return images


def _pareto(metrics: dict, name: str, plt):
    """not_unsafe against not_overrefuse on one set, a point per checkpoint and grader."""
    fig, ax = plt.subplots(figsize=(5, 4.2))
    points = []
    for grader, marker in (("rule", "o"), ("judge", "s")):
        for checkpoint, per_set in metrics.items():
            m = per_set.get(name, {}).get(grader, {})
            x, y = (m.get("not_overrefuse") or {}).get("value"), (m.get("not_unsafe") or {}).get("value")
            if x is not None and y is not None:
                ax.scatter([x], [y], marker=marker, s=60, label=f"{checkpoint} ({grader})")
                points.append((x, y, checkpoint))
    for x, y, label in point_labels(points):  # kept inside the axes: left of points near the right
        right, top = x > 0.75, y > 0.9       # edge, below those near the top
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(-6 if right else 6, -6 if top else 6),
                    ha="right" if right else "left", va="top" if top else "bottom")
    ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), xlabel="not_overrefuse (allowed requests answered)",
           ylabel="not_unsafe (disallowed requests refused)", title=f"{name}: safety vs. helpfulness")
    ax.grid(alpha=0.3)
    if points:
        ax.legend(fontsize=7, loc="lower left")
    return fig


def _png(fig, plt, io) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def examples(config: Config, checkpoint: str) -> list[dict]:
    """The first held-out response per category of the given checkpoint."""
    path = config.run_path / "eval" / checkpoint / "heldout.jsonl"
    seen, chosen = set(), []
    for r in read_jsonl(path) if path.is_file() else []:
        if r["category"] not in seen and "@" not in r["id"]:
            seen.add(r["category"])
            chosen.append(r)
    return chosen


def render_markdown(title: str, facts: list[str], tables, images: list[str], shown: list[dict], checkpoint: str) -> str:
    lines = [f"# {title}", ""] + [f"- {f}" for f in facts] + [""]
    for name, header, rows in tables:
        lines += [f"## {name}", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows] + [""]
    lines += ["## Plots", ""] + [f"![{i}]({i})" for i in images] + ["", f"## Examples ({checkpoint}, held-out)", ""]
    for r in shown:
        lines += [f"### {r['category']} ({r['expected_mode']})", "", f"**Prompt:** {r['prompt']}", "", "```",
                  r["response"][:EXAMPLE_CHARS], "```", ""]
    return "\n".join(lines)


def render_html(title: str, facts: list[str], tables, images: dict[str, bytes], shown: list[dict], checkpoint: str) -> str:
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>"
             "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}pre{background:#f6f6f6;padding:8px;"
             "white-space:pre-wrap}</style></head><body>", f"<h1>{e(title)}</h1><ul>"]
    parts += [f"<li>{e(f)}</li>" for f in facts] + ["</ul>"]
    for name, header, rows in tables:
        parts.append(f"<h2>{e(name)}</h2><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows] + ["</table>"]
    parts.append("<h2>Plots</h2>")
    parts += [f"<img alt='{e(n)}' src='data:image/png;base64,{base64.b64encode(b).decode()}'>" for n, b in images.items()]
    parts.append(f"<h2>Examples ({e(checkpoint)}, held-out)</h2>")
    for r in shown:
        parts.append(f"<h3>{e(r['category'])} ({e(str(r['expected_mode']))})</h3><p><b>Prompt:</b> {e(r['prompt'])}</p>"
                     f"<pre>{e(r['response'][:EXAMPLE_CHARS])}</pre>")
    return "".join(parts) + "</body></html>\n"


def run_report(config: Config, force: bool = False) -> dict:
    eval_path = config.run_path / "eval" / "metrics.json"
    if not eval_path.is_file():
        raise UserError(f"{eval_path.parent}: no finished evaluation; run `dalign eval` first")
    evaluated = json.loads(eval_path.read_text())
    metrics = evaluated["metrics"]
    sft_rows = read_jsonl(config.run_path / "sft" / "metrics.jsonl") if (config.run_path / "sft" / "metrics.jsonl").is_file() else []
    rl_rows = read_jsonl(config.run_path / "rl" / "metrics.jsonl") if (config.run_path / "rl" / "metrics.jsonl").is_file() else []
    images = _plots(metrics, sft_rows, rl_rows)
    for name, data in images.items():
        write_atomic(config.run_path / name, data)
    last = list(metrics)[-1]
    shown = examples(config, last)
    facts = [f"spec version {evaluated['spec_version']}",
             "checkpoints: " + ", ".join(f"{k} = {v}" for k, v in evaluated["checkpoints"].items()),
             "cells: value [95% interval] (n); rule grader = transparent refusal/style rules, judge grader = "
             "the judge model with spec(category), score >= 0.5 counts as good; rubric grader = StrongREJECT's "
             "rubric by the judge model (docs/metrics.md)"]
    for stage in ("sft", "rl"):
        summary = config.run_path / stage / "summary.json"
        if summary.is_file():
            s = json.loads(summary.read_text())
            facts.append(f"{stage}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                 for k, v in s.items() if k not in ("complete", "export")))
    title = f"Deliberative alignment report: {config.run_dir}"
    warnings = reward_warnings(rl_rows)
    tables = metric_tables(metrics, warnings)
    facts += [f"warning: {w}" for w in warnings]
    write_atomic(config.run_path / "report.md", render_markdown(title, facts, tables, list(images), shown, last) + "\n")
    write_atomic(config.run_path / "report.html", render_html(title, facts, tables, images, shown, last))
    return {"report": str(config.run_path / "report.md"), "html": str(config.run_path / "report.html"),
            "plots": [str(config.run_path / n) for n in images], "warnings": warnings, "complete": True}
