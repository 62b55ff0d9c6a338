"""The SFT data pipeline: conversations (no spec in them) -> chat template -> tokens with the loss on
the assistant's turns only -> batches padded to a few length buckets, or packed several to a row,
streamed by grain.

Records are `{"id", "messages": [..., {"role": "assistant", ...}]}` in ArrayRecord (what the judge
stage writes) or JSONL. Padded, the pipeline is a grain `MapDataset`, so a batch is a pure function of
its index; packed, it continues as a grain `IterDataset` through grain's first-fit packer. Either way
the iterator's state is saved with each checkpoint and a resumed run sees the same batches as an
uninterrupted one. Each process reads its own slice of every global batch.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import grain
import numpy as np

from dalign_jax.engine.chat import encode_conversation
from dalign_jax.errors import UserError
from dalign_jax.userfiles import read_text

MIN_BUCKET = 64
# Rows the packer fills at once (at least): on the smollm2-cpu set (162 tokens an example on average,
# rows of 512) 2 bins filled 84% of the tokens, 8 88%, 16 90%, 64 92%.
PACKING_BINS = 16


def _check_record(record, where: str) -> dict:
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object")
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: field 'messages': expected a non-empty list")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise UserError(f"{where}: field 'messages[{i}]': expected {{'role': str, 'content': str}}")
    if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
        raise UserError(f"{where}: field 'messages': the last message must be a non-empty assistant turn")
    return record


class ConversationSource:
    """Random access to validated conversation records from one `.array_record` or `.jsonl` file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: SFT data file does not exist")
        if self.path.suffix == ".array_record":
            raw = grain.sources.ArrayRecordDataSource([str(self.path)])
            lines = [raw[i] for i in range(len(raw))]
            where = lambda i: f"{self.path}: record {i}"  # noqa: E731
        elif self.path.suffix == ".jsonl":
            text = read_text(self.path, "SFT data file").splitlines()
            numbered = [(n, line) for n, line in enumerate(text, 1) if line.strip()]
            lines = [line for _, line in numbered]
            where = lambda i: f"{self.path}:{numbered[i][0]}"  # noqa: E731
        else:
            raise UserError(f"{self.path}: expected a .jsonl or .array_record file of conversations")
        self.records = []
        for i, line in enumerate(lines):
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise UserError(f"{where(i)}: invalid JSON: {e}") from None
            self.records.append(_check_record(record, where(i)))
        if not self.records:
            raise UserError(f"{self.path}: no conversations")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        return self.records[index]

    def example_id(self, index: int) -> str:
        r = self.records[index]
        return str(r.get("prompt_id", r.get("id", index)))


def is_heldout(example_id: str, fraction: float) -> bool:
    """A fixed rule (a hash of the prompt id), so every sample of one prompt lands on the same side."""
    return int(hashlib.sha256(example_id.encode()).hexdigest()[:8], 16) % 10_000 < fraction * 10_000


def split_indices(source: ConversationSource, fraction: float) -> tuple[list[int], list[int]]:
    held = [is_heldout(source.example_id(i), fraction) for i in range(len(source))]
    train = [i for i, h in enumerate(held) if not h]
    heldout = [i for i, h in enumerate(held) if h]
    if fraction > 0 and not heldout and len(train) > 1:  # tiny sets: hold out one example anyway
        heldout, train = train[-1:], train[:-1]
    return train, heldout


def tokenize_conversation(tokenizer, messages: list[dict], max_len: int,
                          stops: Sequence[int] = ()) -> dict[str, np.ndarray]:
    """tokens [n] and loss_mask [n]: 1 on every assistant turn, 0 on the rest (system and user turns,
    role headers), as TRL's `assistant_only_loss`. The last turn counts with everything the template
    writes after it; an earlier one with the template's tokens after it through the first of `stops`
    (its end-of-turn token), so the model learns to stop there too, and not the next turn's header."""
    ids, owner = encode_conversation(tokenizer, messages, add_generation_prompt=False)
    mask = np.zeros(len(ids), bool)
    stops = set(stops)
    last = len(messages) - 1
    owners = np.asarray(owner)
    for turn, message in enumerate(messages):
        own = np.flatnonzero(owners == turn) if message["role"] == "assistant" else ()
        if not len(own):
            continue
        start, end = int(own[0]), int(own[-1]) + 1
        if turn == last:
            end = len(ids)
        else:
            after = end
            while after < len(ids) and owner[after] == -1:
                if ids[after] in stops:
                    end = after + 1
                    break
                after += 1
        mask[start:end] = True
    return {"tokens": np.asarray(ids[:max_len], np.int32), "loss_mask": mask[:max_len].astype(np.int32)}


def count_batches(stream) -> int:
    """How many batches a finite stream holds (a packed one's count is known only by packing it)."""
    return sum(1 for _ in stream)


def length_buckets(max_len: int) -> list[int]:
    buckets = [MIN_BUCKET]
    while buckets[-1] < max_len:
        buckets.append(buckets[-1] * 2)
    return sorted({min(b, max_len) for b in buckets})


def collate(examples: Sequence[dict], buckets: Sequence[int], pad_id: int) -> dict[str, np.ndarray]:
    """Right-pad to the smallest bucket that holds the longest example. Positions are -1 on padding."""
    width = next(b for b in buckets if b >= max(len(e["tokens"]) for e in examples))
    batch = {"tokens": np.full((len(examples), width), pad_id, np.int32),
             "positions": np.full((len(examples), width), -1, np.int32),
             "loss_mask": np.zeros((len(examples), width), np.int32)}
    for row, e in enumerate(examples):
        n = len(e["tokens"])
        batch["tokens"][row, :n] = e["tokens"]
        batch["positions"][row, :n] = np.arange(n)
        batch["loss_mask"][row, :n] = e["loss_mask"]
    return batch


def packed_row(example: dict, pad_id: int) -> dict[str, np.ndarray]:
    """grain's packer output (features with `_segment_ids` and `_positions`; 0 on padding) -> our row:
    tokens, positions (-1 on padding), loss_mask and segments (each sequence numbered from 1)."""
    segments = example["tokens_segment_ids"].astype(np.int32)
    real = segments > 0
    return {"tokens": np.where(real, example["tokens"], pad_id).astype(np.int32),
            "positions": np.where(real, example["tokens_positions"], -1).astype(np.int32),
            "loss_mask": np.where(real, example["loss_mask"], 0).astype(np.int32), "segments": segments}


def batches(source: ConversationSource, indices: Sequence[int], tokenizer, *, global_batch: int, max_len: int,
            seed: int, num_batches: int | None, process_index: int = 0, process_count: int = 1,
            capability: tuple[ConversationSource, float] | None = None, packing: bool = False,
            num_examples: int | None = None, stops: Sequence[int] = ()) -> grain.MapDataset | grain.IterDataset:
    """`num_batches` batches of this process's rows of each global batch, shuffled afresh every epoch.

    `capability`: (source, ratio) mixes that share of plain helpful conversations into the stream.
    `packing`: rows of `max_len` tokens, each holding as many whole examples as fit (grain's first-fit
    packer over `PACKING_BINS` rows at a time) instead of one example padded to a bucket; the stream
    then ends after `num_examples` examples (None: it does not end, and the caller takes what it
    needs), and `num_batches` is not used. `count_batches` says how many batches such a stream holds.
    `stops`: the model's end-of-turn tokens (see `tokenize_conversation`).
    """
    if global_batch % process_count:
        raise UserError(f"sft.batch_size x train.grad_accum = {global_batch} must divide over {process_count} processes")
    ratio = capability[1] if capability else 0.0
    if packing:
        # Enough passes for any plan: an example holds at least a few template tokens, so no batch
        # takes more than global_batch * max_len / 4 of them (the repeat is lazy).
        needed = num_examples if num_examples is not None else (num_batches or 1) * global_batch * max_len // 4
    else:
        needed = num_batches * global_batch
    main_rows = int(np.ceil(needed * (1 - ratio))) + global_batch
    epochs = -(-main_rows // len(indices))
    ds = grain.MapDataset.source(list(indices)).seed(seed).shuffle().repeat(epochs).map(lambda i: source[i])
    if capability and ratio > 0:
        extra = grain.MapDataset.source(capability[0]).seed(seed + 1).shuffle().repeat(
            -(-int(needed * ratio + global_batch) // len(capability[0])))
        ds = grain.MapDataset.mix([ds, extra], weights=[1 - ratio, ratio])
    buckets = length_buckets(max_len)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # Every process collates the whole global batch (so all agree on its padded width) and keeps
    # every `process_count`-th row from its own index.
    rows = slice(process_index, None, process_count)
    if packing:
        if num_examples is not None:
            ds = ds.slice(slice(0, num_examples))
        packed = grain.experimental.FirstFitPackIterDataset(
            ds.map(lambda r: tokenize_conversation(tokenizer, r["messages"], max_len, stops)).to_iter_dataset(),
            length_struct={"tokens": max_len, "loss_mask": max_len}, num_packing_bins=max(global_batch, PACKING_BINS),
            shuffle_bins=False)
        return (packed.map(lambda e: packed_row(e, pad_id))
                .batch(global_batch, drop_remainder=True)
                .map(lambda b: {k: v[rows] for k, v in b.items()}))
    return (ds.slice(slice(0, needed))
            .map(lambda r: tokenize_conversation(tokenizer, r["messages"], max_len, stops))
            .batch(global_batch, drop_remainder=True, batch_fn=lambda xs: collate(xs, buckets, pad_id))
            .map(lambda b: {k: v[rows] for k, v in b.items()}))
