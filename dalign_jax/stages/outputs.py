"""A stage's output directory: made writable, and guarded by the run header that refuses to resume
into outputs of other inputs."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from dalign_jax.config import Config
from dalign_jax.data.records import write_atomic
from dalign_jax.errors import UserError


def check_run_header(stage_dir: Path, header: dict, force: bool = False) -> None:
    """Record what a stage's outputs depend on; refuse to resume into outputs made from other inputs."""
    path = stage_dir / "run.json"
    if path.is_file() and not force:
        old = json.loads(path.read_text())
        changed = sorted(k for k in set(old) | set(header) if old.get(k) != header.get(k))
        if changed:
            raise UserError(
                f"{stage_dir}: existing outputs were made with different {', '.join(changed)}; "
                "use a new run_dir, delete the stage directory, or pass --force to start it over"
            )
        return
    if path.is_file() and force:
        import shutil

        for f in stage_dir.iterdir():
            if f.is_dir():
                shutil.rmtree(f)
            else:
                f.unlink()
    write_atomic(path, json.dumps(header, indent=2, sort_keys=True) + "\n")



def section(config: Config, name: str) -> dict:
    return dataclasses.asdict(getattr(config, name))



def ensure_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{directory}: cannot create output directory ({e.strerror})") from None
    if not os.access(directory, os.W_OK):
        raise UserError(f"{directory}: output directory is not writable")
