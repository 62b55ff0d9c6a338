"""Checkpoints of a training run through orbax: the train state (parameters, optimiser state, step),
the data iterator's state and a small JSON of run facts, saved together under one step.

Orbax writes each step to a temporary directory and renames it when complete, so a kill mid-save
leaves the previous checkpoint as the latest; unfinished temporary directories are cleaned up on
the next start. Every process calls save and restore (multi-host writes go through orbax).
"""
from __future__ import annotations

import math
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from dalign_jax.errors import UserError


class Checkpointer:
    def __init__(self, directory: Path, keep: int):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                                               enable_async_checkpointing=False)
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, facts: dict, extra: dict | None = None) -> None:
        """`extra`: more arrays kept with the state, by name (RL's reference when it follows the policy),
        in the same atomic checkpoint; `restore_extra` reads one back."""
        items = {name: ocp.args.StandardSave(tree) for name, tree in (extra or {}).items()}
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state), facts=ocp.args.JsonSave(facts),
            **items))
        self.manager.wait_until_finished()

    def restore(self, step: int, target) -> tuple[object, dict, dict]:
        """The state at `step` laid out like `target` (ShapeDtypeStructs with shardings)."""
        _check_stored_shapes(self.directory / str(step) / "state", target)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(), facts=ocp.args.JsonRestore()))
        except (ValueError, KeyError) as e:
            raise UserError(f"{self.directory / str(step)}: checkpoint does not fit this model "
                            f"(a different model shape or optimiser?): {str(e).splitlines()[0][:300]}") from None
        _check_shapes(restored.state, target, self.directory / str(step))
        return restored.state, restored.data, restored.facts

    def restore_extra(self, step: int, name: str, target):
        """The `extra` item `name` saved at `step`, laid out like `target`."""
        try:
            tree = getattr(self.manager.restore(step, args=ocp.args.Composite(
                **{name: ocp.args.StandardRestore(target)})), name)
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise UserError(f"{self.directory / str(step)}: checkpoint has no usable {name}: "
                            f"{str(e).splitlines()[0][:300]}") from None
        _check_shapes(tree, target, self.directory / str(step))
        return tree

    def close(self) -> None:
        self.manager.close()


def _arrays_by_name(tree, dtypes: bool = True) -> dict[str, tuple]:
    """Each array of `tree` (arrays, ShapeDtypeStructs or orbax's stored metadata) by its path,
    "params/layers/0/wq": its shape, and its dtype with `dtypes`."""
    def name(path) -> str:
        return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)

    return {name(p): (tuple(x.shape), str(x.dtype)) if dtypes else tuple(x.shape)
            for p, x in jax.tree_util.tree_leaves_with_path(tree) if hasattr(x, "shape")}


def _refuse_difference(have: dict, want: dict, where: Path) -> None:
    """A UserError naming the first array of `want` that `have` lacks or holds otherwise."""
    for name in list(want) + [n for n in have if n not in want]:
        if have.get(name) != want.get(name):
            raise UserError(f"{where}: checkpoint does not fit this model (a different model shape): "
                            f"{name} is {have.get(name, 'absent')} there, {want.get(name, 'absent')} here")


def _check_stored_shapes(item: Path, target) -> None:
    """Refuse, naming the first array that differs, a checkpoint whose stored shapes are not the
    target's, before orbax starts reading it: orbax finds the mismatch inside its concurrent reads and
    leaves the other reads pending. Stored trees whose names differ from the target's are left to
    orbax's own restore."""
    try:
        stored = ocp.StandardCheckpointHandler().metadata(item)
    except (FileNotFoundError, ValueError, KeyError):
        return
    have, want = _arrays_by_name(stored, dtypes=False), _arrays_by_name(target, dtypes=False)
    if set(have) == set(want):
        _refuse_difference(have, want, item.parent)


def _check_shapes(state, target, where: Path) -> None:
    _refuse_difference(_arrays_by_name(state), _arrays_by_name(target), where)
    if jax.tree.structure(state) != jax.tree.structure(target):
        raise UserError(f"{where}: checkpoint does not fit this model (a different model shape)")


def restore_or_start(checkpoints: Checkpointer, params, optimizer, mesh, shard_optimizer: bool = False):
    """The train state from the latest checkpoint, or a new one from `params`: (state, its shardings,
    the step it is at, the data iterator state saved with it or None). The layout need not be the one
    the checkpoint was saved with: orbax restores into this one."""
    from dalign_jax.train.step import abstract_state, init_state

    start = checkpoints.latest_step() or 0
    if not start:
        state, sharding = init_state(params, optimizer, mesh, shard_optimizer)
        return state, sharding, 0, None
    target, sharding = abstract_state(params, optimizer, mesh, shard_optimizer)
    state, data_state, _ = checkpoints.restore(start, target)
    return state, sharding, start, data_state


def check_finite(metrics: dict, step: int, checkpoints: Checkpointer) -> None:
    """Stop on a NaN or infinity before it can reach a checkpoint."""
    bad = [k for k in ("loss", "grad_norm") if not math.isfinite(metrics[k])]
    if bad:
        last = checkpoints.latest_step()
        kept = f"the last good checkpoint is step {last}" if last else "no checkpoint was written"
        raise UserError(f"step {step}: non-finite {' and '.join(bad)}; training stopped, {kept} "
                        "(lower train.learning_rate, or check the data)")
