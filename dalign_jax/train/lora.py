"""Low-rank adapters (LoRA, Hu et al. 2021) on the attention and MLP projections, for SFT and RL.

The adapters are a parameter tree of their own, {"layers": [{"wq": {"a": [in, r], "b": [r, out]}}]},
so the optimiser, its state and the checkpoints hold only them; the base weights stay frozen beside
the train state. The step runs the one forward function on merged weights W + (alpha / r) a b,
computed inside the compiled step: the merge costs 2 r / (tokens in the batch) of a layer's matmuls,
and the model code does not know adapters exist. `b` starts at zero, so training starts from the
base model exactly (which RL also uses as its KL reference).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from dalign_jax.model.projections import LORA_TARGETS
from dalign_jax.model.transformer import is_stacked, stack_layers, unstack_layers
from dalign_jax.parallel.mesh import param_shardings, shard_params


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int
    alpha: float
    targets: tuple[str, ...]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_train(cls, train) -> "LoraConfig | None":
        """From a config's `Train` section; None for full fine-tuning (`lora_rank` 0). The config
        checked the targets."""
        if train.lora_rank == 0:
            return None
        return cls(train.lora_rank, train.lora_alpha, tuple(t for t in LORA_TARGETS if t in train.lora_targets))


def init_adapters(base: dict, lora: LoraConfig, key: jax.Array) -> dict:
    """`a` uniform in +-1/sqrt(in) (the usual Kaiming bound), `b` zero: the merge starts as the identity.
    Stacked layers (`scan_layers`) get stacked adapters, with the same values as unrolled ones."""
    if is_stacked(base):
        return stack_layers(init_adapters(unstack_layers(base), lora, key))
    layers = []
    for i, layer in enumerate(base["layers"]):
        adapters = {}
        for j, name in enumerate(lora.targets):
            fan_in, fan_out = layer[name].shape
            bound = 1.0 / math.sqrt(fan_in)
            a = jax.random.uniform(jax.random.fold_in(key, i * len(LORA_TARGETS) + j), (fan_in, lora.rank),
                                   jnp.float32, -bound, bound)
            adapters[name] = {"a": a, "b": jnp.zeros((lora.rank, fan_out), jnp.float32)}
        layers.append(adapters)
    return {"layers": layers}


def merge(base: dict, adapters: dict, lora: LoraConfig) -> dict:
    """The base parameters with every adapted matrix replaced by W + scale * a @ b (in W's dtype); for
    stacked layers the products are batched over the layer axis."""

    def merged(layer, adapted):
        layer = dict(layer)
        for name, ab in adapted.items():
            w = layer[name]
            layer[name] = (w.astype(jnp.float32) + lora.scale * (ab["a"] @ ab["b"])).astype(w.dtype)
        return layer

    if is_stacked(base):
        return dict(base, layers=merged(base["layers"], adapters["layers"]))
    return dict(base, layers=[merged(lp, ad) for lp, ad in zip(base["layers"], adapters["layers"])])


def count(tree) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))


class Trainable:
    """What the optimiser trains for one model: every parameter (`lora` None), or adapters over the
    frozen base. `take_initial()` starts the train state; `full_params(state.params)` is the model."""

    def __init__(self, params: dict, lora: LoraConfig | None, mesh, seed: int):
        self.lora = lora
        self.param_sharding = param_shardings(params, mesh)
        self.total = count(params)
        if lora is None:
            self.initial, self.frozen = params, None
        else:
            self.frozen = shard_params(params, mesh)
            # On the host, like full fine-tuning's parameters: the train state lays them out on the mesh.
            self.initial = jax.device_get(init_adapters(params, lora, jax.random.key(seed)))
            self._merge = jax.jit(lambda base, adapters: merge(base, adapters, lora),
                                  out_shardings=self.param_sharding)
        self.count = count(self.initial)

    def take_initial(self) -> dict:
        """The tree the train state starts from, handed over once (so its host copy can be freed)."""
        initial, self.initial = self.initial, None
        return initial

    def full_params(self, trainable: dict) -> dict:
        return trainable if self.lora is None else self._merge(self.frozen, trainable)

    def describe(self) -> str:
        n = self.count
        how = "full fine-tuning" if self.lora is None else (
            f"LoRA rank {self.lora.rank}, alpha {self.lora.alpha:g} on {', '.join(self.lora.targets)}")
        return f"trainable parameters: {n:,} of {self.total:,} ({100 * n / self.total:.2f}%; {how})"
