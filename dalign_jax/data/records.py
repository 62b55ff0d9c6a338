"""Files a person can read and a crash cannot tear: atomic writes, JSONL, and record shards (JSONL for
people, ArrayRecord for grain), written whole or not at all."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterable

from dalign_jax.errors import UserError
from dalign_jax.userfiles import creation_mode


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write beside `path`, flush to disk, then rename: readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, creation_mode())
        os.replace(tmp, path)
    except OSError as e:  # disk full, quota, permissions: say which file, leave no partial one
        Path(tmp).unlink(missing_ok=True)
        raise UserError(f"{path}: cannot write ({e.strerror or e})") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise



def jsonl_text(records: Iterable[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)



def write_records(stem: Path, records: list[dict]) -> None:
    """A shard as `stem.array_record` (for grain) and `stem.jsonl` (for people). The JSONL is written
    last, so its presence means the shard is complete."""
    from array_record.python.array_record_module import ArrayRecordWriter

    stem.parent.mkdir(parents=True, exist_ok=True)
    final = stem.with_suffix(".array_record")
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=stem.parent)
    os.close(fd)
    try:
        writer = ArrayRecordWriter(tmp, "group_size:1")
        for r in records:
            writer.write(json.dumps(r, ensure_ascii=False).encode("utf-8"))
        writer.close()
        os.chmod(tmp, creation_mode())
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    write_atomic(stem.with_suffix(".jsonl"), jsonl_text(records))



def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
