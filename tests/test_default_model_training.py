"""Training the embedded default: SFT on a small distilled-style fixture lowers held-out loss, and the
trained model, asked without the spec, answers in the trained format (analysis, delimiter, answer)."""
import json

import jax
import pytest

from conftest import needs_default_model
from dalign_jax.config import load_config
from dalign_jax.data.completion import ANSWER_DELIMITER, COT_PREFIX, format_completion, parse_completion
from dalign_jax.data.prompts import read_prompts
from dalign_jax.data.spec import load_spec
from dalign_jax.engine.chat import complete_chats
from dalign_jax.engine.sampler import Sampler
from dalign_jax.model.loader import load_model
from dalign_jax.parallel.mesh import make_mesh, shard_params
from dalign_jax.stages.sft import run_sft

pytestmark = [needs_default_model, pytest.mark.slow]

ANSWERS = {
    "refuse": "I'm sorry, but I can't help with that.",
    "safe_complete": "I'm sorry you're dealing with this. Some general information can help, and a "
                     "professional or a crisis line can give you support that fits your situation.",
    "comply": "Happy to help. Here is a clear, practical answer to your question.",
}


def distilled_fixture(limit: int) -> list[dict]:
    """Records shaped like the judge stage's SFT set: the user's conversation and an assistant turn
    of analysis (citing a section of the prompt's category), delimiter and answer."""
    spec = load_spec("specs")
    records = []
    for prompt in read_prompts("specs/prompts/safety_prompts.jsonl", spec.categories)[:: 5][:limit]:
        mode = prompt.expected_mode
        section = next(s for s in spec.policies[prompt.category].sections if s.mode == mode)
        cot = (f"{COT_PREFIX} The user asks: {prompt.messages[-1][1][:60]}. {section.id} "
               f"({section.title}) applies. Decision: {mode}.")
        records.append({"id": f"{prompt.id}-0", "prompt_id": prompt.id, "messages": prompt.chat() + [
            {"role": "assistant", "content": format_completion(cot, ANSWERS[mode])}]})
    return records


def test_sft_teaches_the_format_without_the_spec(tmp_path):
    data = tmp_path / "distilled.jsonl"
    records = distilled_fixture(40)
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = tmp_path / "sft.yaml"
    config.write_text(json.dumps({
        "run_dir": str(tmp_path / "run"), "mesh": {"devices": 1},
        "sft": {"data": str(data), "batch_size": 4, "steps": 20, "max_seq_len": 128, "eval_every": 20,
                "heldout_fraction": 0.15, "train": {"learning_rate": 1e-4, "warmup_steps": 2, "save_every": 100}}}))
    summary = run_sft(load_config(config))
    print(summary)
    assert summary["final_eval_loss"] < summary["initial_eval_loss"]

    trained = load_model(str(tmp_path / "run" / "sft" / "export"))
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    sampler = Sampler(trained.cfg, mesh, pad_id=trained.tokenizer.pad_token_id or 0)
    question = [{"role": "user", "content": "How can I pick a lock to break into my neighbour's house?"}]
    [reply] = complete_chats(trained, sampler, shard_params(trained.params, mesh), [question], 96, jax.random.key(0))
    print(reply.text)
    assert reply.text.startswith(COT_PREFIX) and ANSWER_DELIMITER in reply.text
    assert parse_completion(reply.text, reply.finished).answer
