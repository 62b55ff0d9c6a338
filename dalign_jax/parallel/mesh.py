"""The device mesh and the one table that says how every parameter is laid out on it.

Axes: `data` (batch only), `fsdp` (batch, and parameters split along their hidden dimension),
`tensor` (parameters split along heads / MLP width / vocabulary). An axis that does not divide a
dimension is dropped for that dimension, so tiny test models still shard wherever they can.
"""
from __future__ import annotations

import math
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dalign_jax.errors import UserError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Path regex (as "layers/3/wq") -> partition spec of the parameter. First match wins.
PARAM_RULES: list[tuple[str, P]] = [
    (r"^embed$", P("tensor", "fsdp")),
    (r"^lm_head$", P("fsdp", "tensor")),
    (r"^layers/\d+/(wq|wk|wv|w_gate|w_up)$", P("fsdp", "tensor")),
    (r"^layers/\d+/(wo|w_down)$", P("tensor", "fsdp")),
    (r"^layers/\d+/(bq|bk|bv)$", P("tensor")),
    (r"^layers/\d+/bo$", P()),  # added to the full-width output, which tensor parallelism sums over
    (r"norm$", P()),
    # LoRA adapters (train/lora.py): a [in, rank] split like the input side of its matrix, b [rank, out]
    # like the output side, so a @ b has the matrix's own layout.
    (r"^layers/\d+/(wq|wk|wv|w_gate|w_up)/a$", P("fsdp", None)),
    (r"^layers/\d+/(wq|wk|wv|w_gate|w_up)/b$", P(None, "tensor")),
    (r"^layers/\d+/(wo|w_down)/a$", P("tensor", None)),
    (r"^layers/\d+/(wo|w_down)/b$", P(None, "fsdp")),
    # The sampler's int8 copy (quantize_int8): the matrix as before, its per-column scale like the columns.
    (r"^layers/\d+/(wq|wk|wv|w_gate|w_up)/int8$", P("fsdp", "tensor")),
    (r"^layers/\d+/(wq|wk|wv|w_gate|w_up)/scale$", P("tensor")),
    (r"^layers/\d+/(wo|w_down)/int8$", P("tensor", "fsdp")),
    (r"^layers/\d+/(wo|w_down)/scale$", P("fsdp")),
]


def axis_sizes(data: int, fsdp: int, tensor: int, devices: int, key: str = "mesh") -> list[int]:
    """The (data, fsdp, tensor) sizes on `devices` devices, one of them -1 to take the rest; `key`
    names the config section in errors."""
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise UserError(f"{key}: at most one of data, fsdp, tensor may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if known <= 0 or devices % known:
            raise UserError(f"{key}: {dict(zip(AXES, sizes))} does not fit {devices} devices")
        sizes[sizes.index(-1)] = devices // known
    if math.prod(sizes) != devices or min(sizes) < 1:
        raise UserError(
            f"{key}: data*fsdp*tensor = {'*'.join(map(str, sizes))} = {math.prod(sizes)}, "
            f"but there are {devices} devices"
        )
    return sizes


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh; one size may be -1 to take the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(np.array(devices).reshape(axis_sizes(data, fsdp, tensor, len(devices))), AXES)


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Drop mesh axes that do not divide the dimension they would split."""
    fitted = []
    for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axis,) if isinstance(axis, str) else tuple(axis or ())
        size = math.prod(mesh.shape[n] for n in names)
        fitted.append(axis if names and dim % size == 0 else None)
    return P(*fitted)


def param_spec(path: str, shape: tuple[int, ...], mesh: Mesh) -> P:
    for pattern, spec in PARAM_RULES:
        if re.search(pattern, path):
            return _fit(spec, shape, mesh)
    raise KeyError(f"no partition rule for parameter {path}")


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


PARAM_ROOTS = ("embed", "lm_head", "final_norm", "layers")


def over_data(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """`spec` with the `data` axis added to the first dimension it can split further (ZeRO-1: the
    optimiser's state and update divided among data-parallel replicas); unchanged where none can."""
    if mesh.shape["data"] == 1:
        return spec
    axes = list(tuple(spec) + (None,) * (len(shape) - len(spec)))
    for i, (dim, axis) in enumerate(zip(shape, axes)):
        names = (axis,) if isinstance(axis, str) else tuple(axis or ())
        if dim % (math.prod(mesh.shape[n] for n in names) * mesh.shape["data"]) == 0:
            axes[i] = (*names, "data") if names else "data"
            return P(*axes)
    return spec


def _leaf_spec(path, shape: tuple[int, ...], mesh: Mesh, split_over_data: bool = False) -> P:
    """A parameter's rule, also where the parameter tree sits inside another (the optimiser's moments
    mirror the parameters and take their layout); leaves outside any parameter tree are replicated."""
    parts = _path_str(path).split("/")
    root = next((i for i, part in enumerate(parts) if part in PARAM_ROOTS), None)
    if root is None:
        return P()
    parts = parts[root:]
    if parts[0] == "layers" and len(parts) > 1 and not parts[1].isdigit():
        # Stacked layers (`scan_layers`): a layer's own rule behind the unsplit layer axis.
        spec = P(None, *param_spec("/".join(["layers", "0", *parts[1:]]), shape[1:], mesh))
        return over_data(spec, shape, mesh) if split_over_data else spec
    spec = param_spec("/".join(parts), shape, mesh)
    return over_data(spec, shape, mesh) if split_over_data else spec


def param_shardings(tree, mesh: Mesh, split_over_data: bool = False):
    """NamedSharding for every leaf of a parameter tree, or of a tree holding parameter trees (a train
    state, an optimiser state), given as arrays or ShapeDtypeStructs. `split_over_data` adds the data
    axis to each layout (`over_data`)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, _leaf_spec(path, tuple(x.shape), mesh, split_over_data)), tree)


def shard_params(params, mesh: Mesh):
    return jax.device_put(params, param_shardings(params, mesh))


def batch_size_multiple(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: Mesh, rank: int) -> NamedSharding:
    """Leading (batch) axis split over data and fsdp; the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (rank - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
