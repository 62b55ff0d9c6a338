"""Bad input, one case per row of docs/reliability.md: a clear message naming the file, line or field,
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
    "HF directory without tokenizer files": (lambda t, m, c, mp: ["generate", "--model", str(_without_tokenizer(m, t)), "--prompt", "hi"],
                                             r"model_copy: no tokenizer \(tokenizer.json or tokenizer_config.json\)"),
    "negative layer count in config.json": (lambda t, m, c, mp: ["generate", "--model", str(_edited_config(m, t, num_hidden_layers=-1)), "--prompt", "hi"],
                                            r"config.json: field num_hidden_layers: expected a positive integer, got -1"),
    "eos_token_id of the wrong type": (lambda t, m, c, mp: ["generate", "--model", str(_edited_config(m, t, eos_token_id="two")), "--prompt", "hi"],
                                       r"config.json: .*eos_token_id"),
    "prompt set with bad UTF-8": (lambda t, m, c, mp: ["distill", str(c), f"prompts.path={_bytes(t / 'bad_prompts.jsonl', BAD_UTF8_JSONL)}"],
                                  r"bad_prompts.jsonl:2: not valid UTF-8 \(byte 0xff at column 9\)"),
    "CSV prompt set with bad UTF-8": (lambda t, m, c, mp: ["eval", str(c), f"eval.prompts={_bytes(t / 'set.csv', BAD_UTF8_CSV)}"],
                                      r"set.csv:3: not valid UTF-8"),
    "prompts file with bad UTF-8": (lambda t, m, c, mp: ["generate", "--model", str(m), "--prompts-file", str(_bytes(t / "p.txt", b"hello\nbye \xff"))],
                                    r"p.txt:2: not valid UTF-8"),
    "spec file with bad UTF-8": (lambda t, m, c, mp: ["distill", str(c), f"spec_dir={_bad_utf8_spec(t)}"],
                                 r"a.md:\d+: not valid UTF-8"),
    "config file with bad UTF-8": (lambda t, m, c, mp: ["distill", str(_bytes(t / "c.yaml", b"seed: 1\n# \xff"))],
                                   r"c.yaml:2: not valid UTF-8"),
    "prompts file whose content is a number": (
        lambda t, m, c, mp: ["generate", "--model", str(m), "--prompts-file", str(_write(t / "p.jsonl", json.dumps({"messages": [{"role": "user", "content": 5}]})))],
        r"p.jsonl:1: field messages\[0\]: expected \{'role'"),
    "prompts file whose prompt is a number": (
        lambda t, m, c, mp: ["generate", "--model", str(m), "--prompts-file", str(_write(t / "p.jsonl", json.dumps({"prompt": 5})))],
        r"p.jsonl:1: field prompt: expected a non-empty string"),
    "prompts file ending on the assistant's turn": (
        lambda t, m, c, mp: ["generate", "--model", str(m), "--prompts-file", str(_write(t / "p.jsonl", json.dumps({"messages": [
            {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})))],
        r"p.jsonl:1: field messages: the last message must be the user's"),
    "prompts file that is a directory": (lambda t, m, c, mp: ["generate", "--model", str(m), "--prompts-file", str(t)],
                                         r"prompts file is a directory, not a file"),
    "prompt set that is a directory": (lambda t, m, c, mp: ["distill", str(c), f"prompts.path={t}"], r"prompts file is a directory, not a file"),
    "empty --prompt": (lambda t, m, c, mp: ["generate", "--model", str(m), "--prompt", "  "], r"generate: --prompt is empty"),
    "--max-new-tokens 0": (lambda t, m, c, mp: ["generate", "--model", str(m), "--prompt", "hi", "--max-new-tokens", "0"],
                           r"--max-new-tokens must be at least 1, got 0"),
    "--temperature nan": (lambda t, m, c, mp: ["generate", "--model", str(m), "--prompt", "hi", "--temperature", "nan"],
                          r"sampling: temperature nan is out of range"),
    "--top-p 0 names the field": (lambda t, m, c, mp: ["generate", "--model", str(m), "--prompt", "hi", "--top-p", "0"],
                                  r"sampling: top_p 0.0 is out of range"),
    "export under a file": (lambda t, m, c, mp: ["export", "--model", str(m), "--out", f"{_file(t)}/out"],
                            r"a_file: cannot create the output directory"),
    "export --max-shard-mb 0": (lambda t, m, c, mp: ["export", "--model", str(m), "--out", str(t / "out"), "--max-shard-mb", "0"],
                                r"--max-shard-mb must be a positive number"),
    "distill.shard_size=0": (lambda t, m, c, mp: ["distill", str(c), "distill.shard_size=0"],
                             r"config key distill.shard_size: must be at least 1, got 0"),
    "judge.threshold=nan": (lambda t, m, c, mp: ["judge", str(c), "judge.threshold=nan"],
                            r"config key judge.threshold: must be a finite number, got nan"),
    "infinite learning rate": (lambda t, m, c, mp: ["sft", str(c), "sft.train.learning_rate=.inf"],
                               r"config key sft.train.learning_rate: must be a finite number, got inf"),
    "NaN reward weight in the config file": (lambda t, m, c, mp: ["rl", str(_with(c, "rl: {rewards: {judge: .nan}}"))],
                                             r"config key rl.rewards.judge: must be a finite number, got nan"),
    "negative token limit": (lambda t, m, c, mp: ["distill", str(c), "distill.cot_tokens=-5"],
                             r"config key distill.cot_tokens: must be at least 1, got -5"),
    "negative prompts.limit": (lambda t, m, c, mp: ["distill", str(c), "prompts.limit=-1"], r"config key prompts.limit: must be at least 0"),
    "zero distill batch": (lambda t, m, c, mp: ["distill", str(c), "distill.batch_size=0"], r"config key distill.batch_size: must be at least 1"),
    "negative sft.steps": (lambda t, m, c, mp: ["sft", str(c), "sft.steps=-3"], r"config key sft.steps: must be at least 0, got -3"),
    "rollout mesh size below -1": (lambda t, m, c, mp: ["rl", str(c), "rl.rollout_mesh={fsdp: -2}"],
                               r"config key rl.rollout_mesh.fsdp: must be at least -1, got -2"),
    "repeated YAML key": (lambda t, m, c, mp: ["distill", str(_with(c, "seed: 1\nseed: 2"))], r"config.yaml:\d+: key 'seed' repeats line \d+"),
    "repeated key in the spec manifest": (lambda t, m, c, mp: ["distill", str(c), f"spec_dir={_manifest(t, REPEATED_KEY_MANIFEST)}"],
                                          r"manifest.yaml:3: key 'alpha' repeats line 2"),
    "spec manifest entry outside the spec directory": (
        lambda t, m, c, mp: ["distill", str(c), f"spec_dir={_manifest(t, OUTSIDE_MANIFEST)}"],
        r"manifest.yaml: field categories.beta: '../../outside.md' lies outside the spec directory"),
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text + "\n")
    return path


BAD_UTF8_JSONL = (json.dumps(GOOD) + "\n").encode() + b'{"id": "\xff"}'
BAD_UTF8_CSV = b"prompt,label\nok,safe\nbad \xfe,unsafe"
REPEATED_KEY_MANIFEST = "categories:\n  alpha: a.md\n  alpha: b.md\nstyle: style.md"
OUTSIDE_MANIFEST = "categories:\n  alpha: a.md\n  beta: ../../outside.md\nstyle: style.md"


def _bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _with(config: Path, text: str) -> Path:
    """The config with `text` appended (a later top-level key)."""
    config.write_text(config.read_text() + text + "\n")
    return config


def _bad_utf8_spec(tmp: Path) -> Path:
    spec = _spec(tmp)
    with open(spec / "a.md", "ab") as f:
        f.write(b"Caf\xe9\n")  # Latin-1, not UTF-8
    return spec


def _manifest(tmp: Path, text: str) -> Path:
    spec = _spec(tmp)
    (spec / "manifest.yaml").write_text(text + "\n")
    (tmp / "outside.md").write_text(MINI_POLICY.format(title="Out", prefix="OU"))
    return spec


def _without_tokenizer(model: Path, tmp: Path) -> Path:
    copy = _copy_model(model, tmp)
    for f in copy.iterdir():
        if "token" in f.name or f.suffix == ".jinja":
            f.unlink()
    return copy


def _edited_config(model: Path, tmp: Path, **fields) -> Path:
    copy = _copy_model(model, tmp)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(dict(config, **fields)))
    return copy


def _file(tmp: Path) -> Path:
    return _write(tmp / "a_file", "not a directory")


def _sft_data(tmp: Path) -> Path:
    rows = [{"id": f"s{i}", "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a {i}"}]}
            for i in range(8)]
    return _write(tmp / "sft_data.jsonl", "\n".join(json.dumps(r) for r in rows))


# Cases found once a stage has made its directory (and at most its run.json), or after a first good run
# or a checkpoint: every other case is refused before anything is written.
WRITES_BEFORE_REFUSING = {"mesh shape does not match the devices", "model path missing", "non-finite loss",
                          "disk full while writing", "checkpoint from a different model shape",
                          "resume with a changed config", "SFT batch that does not split over the mesh"}


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
    assert "Traceback" not in err, err
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
    if name not in WRITES_BEFORE_REFUSING:
        assert not run.exists(), sorted(run.rglob("*"))


def _export(model: Path, out) -> int:
    return main(["export", "--model", str(model), "--out", str(out)])


def test_export_never_removes_what_it_did_not_write(tmp_path, tiny_chat_model, monkeypatch, capsys):
    users = tmp_path / "users"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    (users / "data").mkdir()
    (users / "data" / "x.csv").write_text("1")
    before = sorted(p.relative_to(users) for p in users.rglob("*"))
    assert _export(tiny_chat_model, users) == 2
    assert "holds files an earlier export did not write (data/x.csv, notes.txt)" in capsys.readouterr().err
    monkeypatch.chdir(users)
    assert _export(tiny_chat_model, ".") == 2  # the working directory itself
    assert sorted(p.relative_to(users) for p in users.rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left beside it
    # An earlier export of ours is replaced; one the user has added a file to is not.
    out = tmp_path / "out"
    assert _export(tiny_chat_model, out) == 0 and _export(tiny_chat_model, out) == 0
    assert (out / ".dalign-export.json").is_file() and (out / "model.safetensors").is_file()
    (out / "README.md").write_text("my notes on this export")
    assert _export(tiny_chat_model, out) == 2
    assert (out / "README.md").read_text() == "my notes on this export"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _export(tiny_chat_model, empty) == 0 and (empty / "config.json").is_file()


def test_outputs_follow_the_umask(tmp_path, tiny_chat_model, mini_run):
    old = os.umask(0o027)
    try:
        assert _export(tiny_chat_model, tmp_path / "out") == 0
        assert main(["distill", str(mini_run), "prompts.limit=2"]) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "out" / "config.json").stat().st_mode & 0o777 == 0o640
    for f in (tmp_path / "run" / "distill").iterdir():
        assert f.stat().st_mode & 0o777 == 0o640, f


def test_every_number_in_the_config_has_a_range():
    """A numeric key added without a bound fails here, before a user finds that NaN or -5 passes."""
    import dataclasses
    import typing

    from dalign_jax import config as config_module

    def numeric(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            sections = [h for h in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(h)]
            if sections:
                yield from numeric(sections[0], f"{prefix}{f.name}.")
            elif typing.get_origin(hint) is not dict and {hint, *typing.get_args(hint)} & {int, float}:
                yield cls, f.name, f"{prefix}{f.name}"

    missing = [key for cls, name, key in numeric(config_module.Config)
               if name not in config_module.RANGES.get(cls, {})]
    assert not missing, missing


def test_reliability_doc_lists_every_case():
    doc = (Path(__file__).parent.parent / "docs" / "reliability.md").read_text()
    assert [name for name in CASES if f"| {name} |" not in doc] == []
    assert f"{len(CASES)} bad inputs" in doc
