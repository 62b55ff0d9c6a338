"""The embedded default (SmolLM2-135M-Instruct, GGUF) against transformers' own GGUF loading."""
import jax
import numpy as np
import pytest

from conftest import hf_logits, needs_default_model, padded_batch
from dalign_jax.engine.sampler import GREEDY, Sampler
from dalign_jax.model.loader import DEFAULT_MODEL, load_model, resolve_model_path
from dalign_jax.model.transformer import forward
from dalign_jax.parallel.mesh import make_mesh

pytestmark = [needs_default_model, pytest.mark.slow]


@pytest.fixture(scope="module")
def ours():
    return load_model(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def reference():
    import torch
    import transformers

    path = resolve_model_path(DEFAULT_MODEL)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model.eval(), tokenizer


def test_logits_match_transformers_gguf_loading(ours, reference):
    ref_model, _ = reference
    tokens, mask, positions = padded_batch(ours.cfg.vocab_size, [24, 10], seed=3)
    logits, _ = jax.jit(forward, static_argnames="cfg")(ours.params, tokens, positions, cfg=ours.cfg)
    real = mask.astype(bool)
    assert np.abs(np.asarray(logits)[real] - hf_logits(ref_model, tokens, mask)[real]).max() <= 1e-3


def test_greedy_continuation_matches_transformers_generate(ours, reference):
    import torch

    ref_model, _ = reference
    messages = [{"role": "user", "content": "Write a short poem about the sea."}]
    prompt = list(ours.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)["input_ids"])
    with torch.no_grad():
        ref = ref_model.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
    ref_tokens = ref[0, len(prompt):].tolist()
    sampler = Sampler(ours.cfg, make_mesh(devices=jax.devices()[:1]))
    out = sampler.generate(ours.params, [prompt], 32, jax.random.key(0), GREEDY)
    assert out.tokens[0].tolist() == ref_tokens


def test_tokenizer_matches_transformers_gguf_tokenizer(ours, reference):
    _, ref_tok = reference
    texts = ["Hello world 12345!", "  spaces\tand\nnewlines ", "naïve café — ünïcödé 日本語",
             "def f(x):\n    return x**2  # comment", "<|im_start|>user\nhi<|im_end|>"]
    for text in texts:
        assert ours.tokenizer.encode(text) == ref_tok.encode(text, add_special_tokens=False), text
        assert ours.tokenizer.decode(ours.tokenizer.encode(text)) == text
    messages = [{"role": "user", "content": "Hi there"}]
    assert ours.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        ref_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
