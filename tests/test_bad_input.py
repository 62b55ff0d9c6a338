"""Bad input, one case per row of the README's table: a clear message naming the file, line or field,
exit status 2, and no partial output (no stage marked complete, no export, no temporary file)."""
import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import MINI_POLICY
from dalign_jax.cli import main


def _prompts(tmp: Path, rows) -> Path:
    path = tmp / "bad_prompts.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {"id": "x1", "category": "alpha", "messages": [{"role": "user", "content": "hi"}]}


def _spec(tmp: Path, a_text: str = "", b_prefix: str = "BE", files=("a.md", "b.md")) -> Path:
    spec = tmp / "badspec"
    spec.mkdir()
    (spec / "manifest.yaml").write_text(f"categories:\n  alpha: {files[0]}\n  beta: {files[1]}\nstyle: style.md\n")
    (spec / "a.md").write_text(MINI_POLICY.format(title="Alpha", prefix="AL") + a_text)
    if "b.md" in files:
        (spec / "b.md").write_text(MINI_POLICY.format(title="Beta", prefix=b_prefix))
    (spec / "style.md").write_text("# Style\nBe brief.")
    return spec


def _copy_model(model: Path, tmp: Path) -> Path:
    return Path(shutil.copytree(model, tmp / "model_copy"))


def _truncated(model: Path, tmp: Path) -> Path:
    copy = _copy_model(model, tmp)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return copy


def _unsupported_arch(model: Path, tmp: Path) -> Path:
    copy = _copy_model(model, tmp)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(dict(config, model_type="gpt2", architectures=["GPT2LMHeadModel"])))
    return copy


def _big_tokenizer(model: Path, tmp: Path) -> Path:
    import transformers

    copy = _copy_model(model, tmp)
    tok = transformers.AutoTokenizer.from_pretrained(str(copy))
    tok.add_tokens([f"<extra_{i}>" for i in range(40)])  # 252 + 40 tokens > vocab_size 256
    tok.save_pretrained(str(copy))
    return copy


def _pickle(model: Path, tmp: Path) -> Path:
    path = tmp / "pytorch_model.bin"
    path.write_bytes(b"\x80\x04not really a pickle")
    return path


def _unsupported_gguf(model: Path, tmp: Path) -> Path:
    """A GGUF whose embedding is IQ2_XXS, a quantisation we do not dequantise."""
    import gguf
    import numpy as np

    path = tmp / "iq2.gguf"
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.IQ2_XXS]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((8, 256 // block * size), np.uint8),
                      raw_dtype=gguf.GGMLQuantizationType.IQ2_XXS)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _other_shape_checkpoint(model: Path, tmp: Path, config: Path) -> list[str]:
    """Train a run briefly, then put its checkpoints under a run of a model of another width."""
    from conftest import make_hf_model, add_byte_tokenizer, FAMILIES

    data = tmp / "sft.jsonl"
    data.write_text("".join(json.dumps({"id": f"s{i}", "messages": [{"role": "user", "content": f"q{i}"},
                                                                     {"role": "assistant", "content": f"a{i}"}]}) + "\n"
                            for i in range(6)))
    common = ["mesh.devices=1", f"sft.data={data}", "sft.steps=1", "sft.batch_size=2", "sft.export=false"]
    assert main(["sft", str(config), f"run_dir={tmp / 'first'}"] + common) == 0
    FAMILIES["wide"] = ("LlamaConfig", dict(FAMILIES["llama2"][1], hidden_size=128))
    try:
        make_hf_model("wide", tmp / "wide")
    finally:
        del FAMILIES["wide"]
    add_byte_tokenizer(tmp / "wide")
    (tmp / "run" / "sft").mkdir(parents=True)
    shutil.copytree(tmp / "first" / "sft" / "checkpoints", tmp / "run" / "sft" / "checkpoints")
    return ["sft", str(config), f"models.policy={tmp / 'wide'}"] + common


def _disk_full(monkeypatch):
    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)


# name -> (builder(tmp, model, config, monkeypatch) -> argv, expected message (regex))
CASES = {
    "malformed JSONL line": (lambda t, m, c, mp: ["distill", str(c), f"prompts.path={_prompts(t, [GOOD, '{oops'])}"],
                             r"bad_prompts.jsonl:2: malformed JSON line"),
    "unknown category": (lambda t, m, c, mp: ["distill", str(c), f"prompts.path={_prompts(t, [dict(GOOD, category='gamma')])}"],
                         r"bad_prompts.jsonl:1: field category: unknown category 'gamma'"),
    "empty prompt": (lambda t, m, c, mp: ["distill", str(c), f"prompts.path={_prompts(t, [dict(GOOD, messages=[{'role': 'user', 'content': ' '}])])}"],
                     r"bad_prompts.jsonl:1: field messages\[0\].content: empty prompt"),
    "prompt longer than the context": (lambda t, m, c, mp: ["generate", "--model", str(m),
                                                            "--prompt", "x" * 5000], r"exceeds the model's context of 4096"),
    "unknown expected_mode": (lambda t, m, c, mp: ["distill", str(c), f"prompts.path={_prompts(t, [dict(GOOD, expected_mode='maybe')])}"],
                              r"bad_prompts.jsonl:1: field expected_mode: 'maybe'"),
    "spec file missing": (lambda t, m, c, mp: ["distill", str(c), f"spec_dir={_spec(t, files=('a.md', 'gone.md'))}"],
                          r"gone.md: spec file listed in the manifest does not exist"),
    "duplicate section IDs": (lambda t, m, c, mp: ["distill", str(c), f"spec_dir={_spec(t, b_prefix='AL')}"],
                              r"b.md: section ID AL-1 is also used in .*a.md"),
    "cited section does not exist": (lambda t, m, c, mp: ["distill", str(c), f"spec_dir={_spec(t, a_text='See AL-9.')}"],
                                     r"a.md: section AL-2 cites AL-9, which does not exist"),
    "unknown config key": (lambda t, m, c, mp: ["distill", str(c), "judeg.runs=2"],
                           r"unknown config key judeg \(did you mean judge\?\)"),
    "wrong type in config": (lambda t, m, c, mp: ["distill", str(c), "judge.runs=abc"],
                             r"config key judge.runs: expected int, got 'abc'"),
    "value out of range (judge threshold)": (lambda t, m, c, mp: ["judge", str(c), "judge.threshold=1.5"],
                                             r"config key judge.threshold: must be between 0.0 and 1.0"),
    "unknown LoRA target": (lambda t, m, c, mp: ["sft", str(c), "sft.train.lora_rank=4", "sft.train.lora_targets=[wq, mlp]"],
                            r"config key sft.train.lora_targets: mlp; choose from wq, wk"),
    "mesh shape does not match the devices": (lambda t, m, c, mp: ["distill", str(c), "mesh.data=3"],
                                              r"mesh: data\*fsdp\*tensor = 3\*1\*1 = 3, but there are 8 devices"),
    "model path missing": (lambda t, m, c, mp: ["distill", str(c), f"models.policy={t / 'nowhere'}"],
                           r"nowhere': no such file or directory"),
    "unsupported architecture": (lambda t, m, c, mp: ["generate", "--model", str(_unsupported_arch(m, t)), "--prompt", "hi"],
                                 r"config.json: .*gpt2"),
    "truncated safetensors": (lambda t, m, c, mp: ["generate", "--model", str(_truncated(m, t)), "--prompt", "hi"],
                              r"model.safetensors: unreadable safetensors file"),
    "pickle checkpoint": (lambda t, m, c, mp: ["generate", "--model", str(_pickle(m, t)), "--prompt", "hi"],
                          r"pytorch_model.bin: pickle checkpoints are never loaded"),
    "tokenizer does not match the model": (lambda t, m, c, mp: ["generate", "--model", str(_big_tokenizer(m, t)), "--prompt", "hi"],
                                           r"tokenizer has 292 tokens but the model's vocab_size is 256"),
    "GGUF of an unsupported quantisation": (lambda t, m, c, mp: ["generate", "--model", str(_unsupported_gguf(m, t)), "--prompt", "hi"],
                                            r"iq2.gguf: tensor token_embd.weight uses quantisation IQ2_XXS, which is not supported"),
    "non-finite loss": (lambda t, m, c, mp: ["sft", str(c), "mesh.devices=1", f"sft.data={_sft_data(t)}", "sft.steps=3",
                                             "sft.batch_size=2", "sft.train.learning_rate=1e30", "sft.train.max_grad_norm=0"],
                        r"step \d: non-finite loss"),
    "output directory not writable": (lambda t, m, c, mp: ["distill", str(c), f"run_dir={_file(t)}/run"],
                                      r"cannot create output directory"),
    "disk full while writing": (lambda t, m, c, mp: (_disk_full(mp), ["distill", str(c)])[1],
                                r"run.json: cannot write \(No space left on device\)"),
    "checkpoint from a different model shape": (lambda t, m, c, mp: _other_shape_checkpoint(m, t, c),
                                                r"checkpoint does not fit this model \(a different model shape\): params/\S+ is \(\d+, \d+\) there"),
    "resume with a changed config": (lambda t, m, c, mp: (main(["distill", str(c)]), ["distill", str(c), "distill.temperature=0.5"])[1],
                                     r"existing outputs were made with different distill; .*--force"),
    "override without '='": (lambda t, m, c, mp: ["distill", str(c), "judge.runs"], r"override 'judge.runs': expected key=value"),
    "config is not valid YAML": (lambda t, m, c, mp: ["distill", str(_write(t / "broken.yaml", "run_dir: [unclosed"))],
                                 r"broken.yaml: invalid YAML"),
    "config file missing": (lambda t, m, c, mp: ["distill", str(t / "absent.yaml")], r"absent.yaml: config file does not exist"),
    "RL group of one": (lambda t, m, c, mp: ["rl", str(c), "rl.group_size=1"], r"config key rl.group_size: must be at least 2"),
    "SFT data missing": (lambda t, m, c, mp: ["sft", str(c), f"sft.data={t / 'none.jsonl'}"], r"none.jsonl: SFT data file does not exist"),
    "SFT example without an assistant turn": (
        lambda t, m, c, mp: ["sft", str(c), f"sft.data={_write(t / 'noanswer.jsonl', json.dumps({'messages': [{'role': 'user', 'content': 'q'}]}))}"],
        r"noanswer.jsonl:1: field 'messages': the last message must be a non-empty assistant turn"),
    "SFT batch that does not split over the mesh": (lambda t, m, c, mp: ["sft", str(c), f"sft.data={_sft_data(t)}", "sft.batch_size=3"],
                                                   r"sft.batch_size 3 must be a multiple of mesh data x fsdp = 8"),
    "judge before distill": (lambda t, m, c, mp: ["judge", str(c)], r"no finished distillation; run `dalign distill` first"),
    "eval of a checkpoint that does not exist": (lambda t, m, c, mp: ["eval", str(c), f"eval.checkpoints=[{t / 'ckpt'}]"],
                                                 r"eval.checkpoints: .*ckpt.* is neither base/sft/rl nor an existing model path"),
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text + "\n")
    return path


def _file(tmp: Path) -> Path:
    return _write(tmp / "a_file", "not a directory")


def _sft_data(tmp: Path) -> Path:
    rows = [{"id": f"s{i}", "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a {i}"}]}
            for i in range(8)]
    return _write(tmp / "sft_data.jsonl", "\n".join(json.dumps(r) for r in rows))


def test_at_least_25_cases():
    assert len(CASES) >= 25


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, tmp_path, mini_run, tiny_chat_model, capsys, monkeypatch):
    build, message = CASES[name]
    argv = build(tmp_path, tiny_chat_model, mini_run, monkeypatch)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "\ndalign: error: " in "\n" + err, err
    err = err[err.index("dalign: error: "):]  # after any progress output
    import re

    assert re.search(message, err), err
    run = tmp_path / "run"
    leftovers = [p for p in run.rglob("*") if p.name == "summary.json" or p.name == "export" or p.suffix == ".tmp"] \
        if run.is_dir() else []
    if name == "resume with a changed config":  # the first, good run finished; the refused one wrote nothing
        assert [p.parent.name for p in leftovers] == ["distill"]
    else:
        assert not leftovers, leftovers
