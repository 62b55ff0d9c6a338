"""SFT: tokenisation and loss mask, the grain pipeline, the train step (against PyTorch, accumulation,
sharding), and the stage's exact resume after a kill."""
import functools
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from dalign_jax.config import Train, load_config
from dalign_jax.data.sft_data import ConversationSource, batches, count_batches, split_indices, tokenize_conversation
from dalign_jax.errors import UserError
from dalign_jax.model.hf_io import load_hf_dir
from dalign_jax.model.loader import load_model
from dalign_jax.parallel.mesh import make_mesh
from dalign_jax.stages.sft import run_sft
from dalign_jax.train.optim import learning_rate_schedule, make_optimizer, reference_optimizer
from dalign_jax.train.step import compile_train_step, device_batch, init_state, sft_loss


def conversations(n: int) -> list[dict]:
    return [{"id": f"q{i}-0", "prompt_id": f"q{i}", "messages": [
        {"role": "user", "content": f"question number {i}?"},
        {"role": "assistant", "content": f"Analysis: about {i}.\n### Final answer\nThe answer is {i * 7}."}]}
        for i in range(n)]


@pytest.fixture
def sft_data(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in conversations(40)))
    return path


def sft_config(tmp_path, model_dir, data, **sft):
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = tmp_path / "sft.yaml"
    options = dict(dict(data=str(data), batch_size=8, steps=10, max_seq_len=128, eval_every=5), **sft)
    options["train"] = dict(dict(learning_rate=3e-3, warmup_steps=2, save_every=2, peak_flops=1e11),
                            **options.get("train", {}))
    config.write_text(json.dumps({"run_dir": str(tmp_path / "run"), "models": {"policy": str(model_dir)},
                                  "sft": options}))
    return config


def test_loss_mask_covers_the_completion_only(tiny_chat_model):
    tokenizer = load_model(str(tiny_chat_model)).tokenizer
    messages = conversations(1)[0]["messages"]
    example = tokenize_conversation(tokenizer, messages, 512)
    completion = tokenizer.decode(example["tokens"][example["loss_mask"] == 1])
    prompt = tokenizer.decode(example["tokens"][example["loss_mask"] == 0])
    assert completion.startswith(messages[1]["content"])
    assert "question number 0?" in prompt and "Analysis" not in prompt
    assert example["loss_mask"][-1] == 1 and example["loss_mask"][0] == 0


TURN_TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}[assistant] {% endif %}")


def test_every_assistant_turn_is_trained_through_its_end_of_turn(tiny_chat_model):
    from conftest import add_byte_tokenizer

    tokenizer = load_model(str(add_byte_tokenizer(tiny_chat_model, TURN_TEMPLATE))).tokenizer
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a colour"},
                {"role": "assistant", "content": "Blue."}]
    example = tokenize_conversation(tokenizer, messages, 512, stops=[tokenizer.eos_token_id])
    tokens, mask = example["tokens"], example["loss_mask"].astype(bool)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
    spans = [tokenizer.decode(tokens[a:b]) for a, b in zip(edges[::2], edges[1::2])]
    # Both answers, each with its end of turn; no header, no user or system text.
    assert spans == ["Hello!</s>", "Blue.</s>\n"]
    # Without a stop token the earlier turn is its text alone; the last turn as before.
    plain = tokenize_conversation(tokenizer, messages, 512)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], plain["loss_mask"], [0]])))
    assert [tokenizer.decode(tokens[a:b]) for a, b in zip(edges[::2], edges[1::2])] == ["Hello!", "Blue.</s>\n"]


def test_pipeline_is_seeded_resumable_and_split_over_processes(sft_data, tiny_chat_model):
    tokenizer = load_model(str(tiny_chat_model)).tokenizer
    source = ConversationSource(sft_data)
    train, heldout = split_indices(source, 0.1)
    assert sorted(train + heldout) == list(range(40)) and heldout and not set(train) & set(heldout)
    make = functools.partial(batches, source, train, tokenizer, global_batch=4, max_len=128, num_batches=20)
    one = list(make(seed=0))
    assert len(one) == 20 and all(b["tokens"].shape[0] == 4 for b in one)
    assert not all(np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(one, list(make(seed=1))))
    # Epochs are reshuffled: the first pass differs from the second.
    epoch = len(train) // 4
    assert not all(np.array_equal(one[i]["tokens"], one[i + epoch]["tokens"]) for i in range(4))
    # The iterator state taken mid-way resumes at the same batch.
    iterator = iter(make(seed=0))
    for _ in range(7):
        next(iterator)
    state = iterator.get_state()
    resumed = iter(make(seed=0))
    resumed.set_state(json.loads(json.dumps(state)))
    assert all(np.array_equal(next(resumed)["tokens"], one[i]["tokens"]) for i in range(7, 20))
    # Two processes' rows make up the single process's global batch.
    halves = [list(make(seed=0, process_index=p, process_count=2)) for p in range(2)]
    for i, batch in enumerate(one):
        joined = np.concatenate([halves[0][i]["tokens"], halves[1][i]["tokens"]])
        assert sorted(map(bytes, joined)) == sorted(map(bytes, batch["tokens"]))


def test_packed_pipeline_holds_every_example_once_and_resumes(sft_data, tiny_chat_model):
    tokenizer = load_model(str(tiny_chat_model)).tokenizer
    source = ConversationSource(sft_data)
    train, _ = split_indices(source, 0.1)
    lengths = {i: len(tokenize_conversation(tokenizer, source[i]["messages"], 512)["tokens"]) for i in train}
    make = functools.partial(batches, source, train, tokenizer, global_batch=4, max_len=512, seed=0,
                             num_batches=None, packing=True, num_examples=2 * len(train))
    one = list(make())
    assert count_batches(make()) == len(one)
    segments = np.concatenate([b["segments"] for b in one])
    # Two epochs of examples, each whole in one row, with positions counted from 0 in each.
    packed = [(row, s) for row in range(len(segments)) for s in set(segments[row]) - {0}]
    assert len(one) < 2 * len(train) / 4 and all(b["tokens"].shape == (4, 512) for b in one)
    counted = {}
    for b in one:
        for tokens, positions, segs in zip(b["tokens"], b["positions"], b["segments"]):
            for s in set(segs) - {0}:
                where = segs == s
                assert list(positions[where]) == list(range(where.sum()))
                counted[bytes(tokens[where])] = counted.get(bytes(tokens[where]), 0) + 1
            assert (positions[segs == 0] == -1).all()
    # Only the rows of the last, partial batch (at most 3) are dropped.
    assert len(packed) >= 2 * len(train) - 3 * segments.max()
    assert sorted(map(len, counted)) == sorted(4 * lengths[i] for i in train)  # int32 bytes
    assert set(counted.values()) <= {1, 2}
    iterator = iter(make())
    for _ in range(3):
        next(iterator)
    resumed = iter(make())
    resumed.set_state(json.loads(json.dumps(iterator.get_state())))
    assert all(np.array_equal(next(resumed)["tokens"], one[i]["tokens"]) for i in range(3, len(one)))
    halves = [list(make(process_index=p, process_count=2)) for p in range(2)]
    for i, batch in enumerate(one):
        assert np.array_equal(np.concatenate([halves[0][i]["segments"], halves[1][i]["segments"]])[[0, 2, 1, 3]],
                              batch["segments"])


def test_packed_rows_equal_their_sequences_alone(tiny_chat_model):
    """A packed row's loss and gradients are those of its sequences each in a row of its own."""
    model = load_model(str(tiny_chat_model))
    examples = [tokenize_conversation(model.tokenizer, c["messages"], 128) for c in conversations(3)]
    alone = _batch(model.tokenizer, conversations(3), width=128)
    width = sum(len(e["tokens"]) for e in examples) + 5
    row = {"tokens": np.zeros((1, width), np.int32), "positions": np.full((1, width), -1, np.int32),
           "loss_mask": np.zeros((1, width), np.int32), "segments": np.zeros((1, width), np.int32)}
    at = 0
    for s, e in enumerate(examples, 1):
        n = len(e["tokens"])
        row["tokens"][0, at:at + n], row["loss_mask"][0, at:at + n] = e["tokens"], e["loss_mask"]
        row["positions"][0, at:at + n], row["segments"][0, at:at + n] = np.arange(n), s
        at += n
    loss = jax.jit(jax.value_and_grad(lambda p, b: sft_loss(p, b, cfg=model.cfg)[0]))
    (packed_loss, packed_grads), (alone_loss, alone_grads) = loss(model.params, row), loss(model.params, alone)
    assert float(sft_loss(model.params, row, cfg=model.cfg)[1]) == float(alone["loss_mask"][:, 1:].sum())
    np.testing.assert_allclose(float(packed_loss), float(alone_loss), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(packed_grads), jax.tree.leaves(alone_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    del row["segments"]  # without them, the sequences would see each other
    assert abs(float(loss(model.params, row)[0]) - float(alone_loss)) > 1e-3


def test_bad_sft_data_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(conversations(1)[0]) + "\n" + json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl:2: field 'messages'.*assistant"):
        ConversationSource(path)


def _batch(tokenizer, rows, width=64):
    from dalign_jax.data.sft_data import collate

    return collate([tokenize_conversation(tokenizer, r["messages"], width) for r in rows], [width], 0)


def _hf_loss(hf, local):
    """The HF model's mean loss on our batch's completion tokens (labels -100 elsewhere)."""
    import torch

    labels = np.where((local["loss_mask"] == 1) & (local["positions"] >= 0), local["tokens"], -100)
    return hf(input_ids=torch.tensor(local["tokens"], dtype=torch.long),
              attention_mask=torch.tensor(local["positions"] >= 0, dtype=torch.long),
              labels=torch.tensor(labels, dtype=torch.long)).loss


def test_sft_loss_matches_pytorch(tiny_models, tiny_chat_model):
    import torch

    model = load_model(str(tiny_chat_model))
    local = _batch(model.tokenizer, conversations(3))
    loss_sum, count, _ = sft_loss(jax.device_put(model.params), local, cfg=model.cfg)
    with torch.no_grad():
        reference = _hf_loss(tiny_models["llama2"][1], local)
    np.testing.assert_allclose(float(loss_sum / count), float(reference), rtol=1e-5)


def test_sft_gradients_match_pytorch(tiny_models, tiny_chat_model):
    """The gradient of every weight equals PyTorch's backward pass through the HF model (the
    projections' weight gradients are contracted by hand, `transformer.linear`)."""
    from dalign_jax.model.families import params_to_hf

    model = load_model(str(tiny_chat_model))
    local = _batch(model.tokenizer, conversations(3))
    grads = jax.jit(jax.grad(lambda p: (lambda s, n, _: s / n)(*sft_loss(p, local, cfg=model.cfg))))(model.params)
    ours = params_to_hf(jax.device_get(grads), model.cfg)
    hf = tiny_models["llama2"][1]
    hf.zero_grad()
    _hf_loss(hf, local).backward()
    reference = {name: p.grad.numpy() for name, p in hf.named_parameters()}
    assert set(ours) == set(reference)
    for name, g in reference.items():
        np.testing.assert_allclose(ours[name], g, rtol=1e-4, atol=1e-6 * np.abs(g).max(), err_msg=name)


def _one_step(model, local, mesh, accum, shard_optimizer=False):
    train = Train(learning_rate=1e-3, warmup_steps=0, grad_accum=accum)
    optimizer = make_optimizer(train, 4)
    state, sharding = init_state(model.params, optimizer, mesh, shard_optimizer)
    step = compile_train_step(functools.partial(sft_loss, cfg=model.cfg), optimizer,
                              learning_rate_schedule(train, 4), sharding, mesh, shard_optimizer=shard_optimizer)
    state, metrics = step(state, device_batch(local, mesh, accum))
    if shard_optimizer:  # each data-parallel replica holds a share of the moments, all of the parameters
        moment = state.opt_state.mu["layers"][0]["w_up"]
        assert "data" in jax.tree.leaves(tuple(moment.sharding.spec)), moment.sharding
        assert moment.addressable_shards[0].data.size * mesh.shape["data"] <= moment.size
        assert state.params["layers"][0]["w_up"].sharding == sharding.params["layers"][0]["w_up"]
    return jax.device_get(state.params), {k: float(v) for k, v in metrics.items()}


@pytest.mark.parametrize("max_grad_norm, weight_decay", [(1.0, 0.1), (0.0, 0.0)])
def test_fused_optimizer_equals_optax_chain(max_grad_norm, weight_decay):
    """Our one-pass clip + AdamW against optax's clip_by_global_norm + adamw (warm-up, cosine decay,
    decay on matrices only), over steps where the clip acts and where it does not."""
    train = Train(learning_rate=1e-2, warmup_steps=2, max_grad_norm=max_grad_norm, weight_decay=weight_decay)
    ours, reference = make_optimizer(train, 5), reference_optimizer(train, 5)
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(4, 3)).astype(np.float32), "norm": rng.normal(size=(3,)).astype(np.float32)}
    ours_params, ours_state = params, ours.init(params)
    ref_params, ref_state = params, reference.init(params)
    for scale in [5.0, 0.01, 3.0, 0.1, 2.0]:  # gradient norms above and below the clip
        grads = jax.tree.map(lambda p: (scale * rng.normal(size=p.shape)).astype(np.float32), params)
        updates, ours_state = ours.update(grads, ours_state, ours_params)
        ours_params = optax.apply_updates(ours_params, updates)
        updates, ref_state = reference.update(grads, ref_state, ref_params)
        ref_params = optax.apply_updates(ref_params, updates)
        for name in params:
            np.testing.assert_allclose(ours_params[name], ref_params[name], rtol=2e-6, atol=2e-7)
    assert not np.allclose(ours_params["w"], params["w"])


def test_gradient_accumulation_equals_one_large_batch(tiny_chat_model):
    model = load_model(str(tiny_chat_model))
    local = _batch(model.tokenizer, conversations(8))
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    whole, m1 = _one_step(model, local, mesh, 1)
    accumulated, m2 = _one_step(model, local, mesh, 2)
    assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-6)
    assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-5)
    # Adam's first update is about lr * sign(g), so an entry whose gradient is near zero can move by
    # up to 2 lr on rounding alone; the tolerance is 0.5% of lr.
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(accumulated)):
        np.testing.assert_allclose(a, b, atol=5e-6)


@pytest.mark.parametrize("layout, shard_optimizer", [((1, 4, 2), False), ((2, 2, 2), False), ((8, 1, 1), False),
                                                     ((2, 2, 2), True), ((8, 1, 1), True)])
def test_sharded_step_equals_one_device(tiny_chat_model, layout, shard_optimizer):
    """Data, fsdp and tensor parallel, and the optimiser split over the data axis (ZeRO-1)."""
    model = load_model(str(tiny_chat_model))
    local = _batch(model.tokenizer, conversations(8))
    single, m1 = _one_step(model, local, make_mesh(1, 1, 1, devices=jax.devices()[:1]), 1)
    sharded, m2 = _one_step(model, local, make_mesh(*layout), 1, shard_optimizer)
    assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-5)
    assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-5)
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded)):
        np.testing.assert_allclose(a, b, atol=5e-6)


def test_sft_stage_learns_and_exports(tmp_path, tiny_chat_model, sft_data):
    config = load_config(sft_config(tmp_path, tiny_chat_model, sft_data))
    summary = run_sft(config)
    out = config.run_path / "sft"
    assert summary["complete"] and summary["steps"] == 10
    assert summary["final_eval_loss"] < summary["initial_eval_loss"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(11))
    assert {"loss", "learning_rate", "grad_norm", "tokens_per_s", "mfu"} <= set(rows[1])
    assert any(f.name.startswith("events.out.tfevents") for f in (out / "tensorboard").iterdir())
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [8, 10]
    _, cfg, params, _ = load_hf_dir(out / "export")
    assert cfg == load_model(str(tiny_chat_model)).cfg
    assert run_sft(config) == summary  # complete: nothing to do


def test_neftune_noise_is_bounded_per_row_and_in_training_steps_only(tmp_path, tiny_chat_model, sft_data):
    import jax.numpy as jnp

    from dalign_jax.train.step import neftune_noise

    noise = np.asarray(neftune_noise(jnp.array([3, 4, 3], jnp.int32), 16, 32, 5.0))
    bound = 5.0 / np.sqrt(16 * 32)  # alpha / sqrt(length x hidden)
    assert 0.95 * bound < np.abs(noise).max() <= bound and abs(noise.mean()) < 0.05 * bound
    np.testing.assert_array_equal(noise[0], noise[2])  # a row's noise comes from its seed alone
    assert not np.allclose(noise[0], noise[1])

    def run(name, overrides, **sft):
        config = load_config(sft_config(tmp_path / name, tiny_chat_model, sft_data, steps=3, eval_every=3, **sft),
                             overrides)
        run_sft(config)
        return [json.loads(x) for x in (config.run_path / "sft" / "metrics.jsonl").read_text().splitlines()]

    plain = run("plain", [])
    noisy = run("noisy", [], neftune_alpha=5.0)
    split = run("split", ["mesh.devices=2"], neftune_alpha=5.0)
    assert noisy[0]["eval_loss"] == plain[0]["eval_loss"]  # the held-out loss sees no noise
    assert noisy[1]["loss"] != pytest.approx(plain[1]["loss"], rel=1e-4)  # the training step does
    for a, b in zip(noisy[1:], split[1:]):  # the same noise however the rows are split over devices
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert noisy[-1]["eval_loss"] == pytest.approx(split[-1]["eval_loss"], rel=1e-5)


def test_packed_sft_counts_its_steps_and_learns(tmp_path, tiny_chat_model, sft_data):
    """With packing, `epochs` passes take as many steps as the packed stream holds batches: fewer
    than padded rows would."""
    config = load_config(sft_config(tmp_path, tiny_chat_model, sft_data, steps=0, epochs=3, packing=True,
                                    max_seq_len=512))
    summary = run_sft(config)
    train, _ = split_indices(ConversationSource(sft_data), 0.1)
    assert 0 < summary["steps"] < 3 * len(train) / 8
    assert summary["final_eval_loss"] < summary["initial_eval_loss"]
    rows = [json.loads(x) for x in (config.run_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(summary["steps"] + 1))


def test_nonfinite_loss_stops_with_the_last_good_checkpoint(tmp_path, tiny_chat_model, sft_data):
    config = load_config(sft_config(tmp_path, tiny_chat_model, sft_data,
                                    train=dict(learning_rate=1e30, max_grad_norm=0.0, save_every=1)))
    with pytest.raises(UserError, match=r"non-finite loss.*last good checkpoint is step \d"):
        run_sft(config)
    assert not (config.run_path / "sft" / "summary.json").exists()


def _final_params(run_dir: Path):
    return jax.tree.leaves(load_hf_dir(run_dir / "sft" / "export")[2])


@pytest.mark.parametrize("packing", [False, True])
def test_exact_resume_after_kill(tmp_path, tiny_chat_model, sft_data, packing):
    """A run killed (SIGKILL) at a random step and rerun ends with bit-identical parameters."""
    command = lambda config: [sys.executable, "-m", "dalign_jax.cli", "sft", str(config)]  # noqa: E731
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    options = dict(steps=16, packing=True, max_seq_len=512) if packing else dict(steps=16)  # 512: rows of several
    whole = sft_config(tmp_path / "whole", tiny_chat_model, sft_data, **options)
    subprocess.run(command(whole), check=True, env=env, capture_output=True)

    killed = sft_config(tmp_path / "killed", tiny_chat_model, sft_data, **options)
    metrics = tmp_path / "killed" / "run" / "sft" / "metrics.jsonl"
    kill_at = random.Random().randint(3, 13)
    proc = subprocess.Popen(command(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and json.loads(metrics.read_text().splitlines()[-1])["step"] >= kill_at:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "run" / "sft" / "summary.json").exists(), "killed too late"
    subprocess.run(command(killed), check=True, env=env, capture_output=True)
    for a, b in zip(_final_params(tmp_path / "whole" / "run"), _final_params(tmp_path / "killed" / "run")):
        assert np.array_equal(a, b)
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(17))


@pytest.mark.parametrize("option, tolerance", [(dict(remat=True), 1e-6), (dict(compute_dtype="bfloat16"), 3e-2)])
def test_memory_and_precision_options_match_float32(tiny_chat_model, option, tolerance):
    """Remat recomputes the same numbers; bfloat16 compute (float32 master weights) stays close."""
    from dalign_jax.stages.sft import make_loss

    model = load_model(str(tiny_chat_model))
    local = _batch(model.tokenizer, conversations(4))
    params = jax.device_put(model.params)
    grad = lambda train: jax.value_and_grad(lambda p: (lambda l, w, a: l / w)(*make_loss(model.cfg, train)(p, local)))  # noqa: E731
    loss, grads = grad(Train())(params)
    other_loss, other_grads = grad(Train(**option))(params)
    assert float(other_loss) == pytest.approx(float(loss), rel=tolerance)
    assert all(g.dtype == np.float32 for g in jax.tree.leaves(other_grads))
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(other_grads)):
        np.testing.assert_allclose(a, b, atol=tolerance * max(1.0, float(np.abs(a).max())) * 10)


@pytest.mark.parametrize("saved_split, restored_split", [(False, True), (True, False)])
def test_checkpoint_restores_into_either_optimiser_layout(tiny_chat_model, tmp_path, saved_split, restored_split):
    """A run can switch `train.shard_optimizer` and resume: orbax restores into the new layout."""
    from dalign_jax.train.checkpoint import Checkpointer, restore_or_start

    model = load_model(str(tiny_chat_model))
    local = _batch(model.tokenizer, conversations(8))
    mesh = make_mesh(4, 2, 1)
    train = Train(learning_rate=1e-3, warmup_steps=0)
    optimizer = make_optimizer(train, 4)
    checkpoints = Checkpointer(tmp_path / "ckpt", 2)
    state, sharding, _, _ = restore_or_start(checkpoints, model.params, optimizer, mesh, saved_split)
    step = compile_train_step(functools.partial(sft_loss, cfg=model.cfg), optimizer, learning_rate_schedule(train, 4),
                              sharding, mesh, shard_optimizer=saved_split)
    state, _ = step(state, device_batch(local, mesh, 1))
    saved = jax.device_get(state)
    checkpoints.save(1, state, {}, {})
    restored, sharding, start, _ = restore_or_start(checkpoints, model.params, optimizer, mesh, restored_split)
    checkpoints.close()
    assert start == 1
    moment = restored.opt_state.mu["layers"][0]["w_up"]
    assert moment.sharding == sharding.opt_state.mu["layers"][0]["w_up"]
    assert ("data" in jax.tree.leaves(tuple(moment.sharding.spec))) == restored_split
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(jax.device_get(restored))):
        np.testing.assert_array_equal(a, b)
