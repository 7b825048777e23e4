"""Flat, dotted-name view of a model's parameters and its Hugging Face names.

Training state, checkpoints, sharding rules and export all address parameters by these
names (`model.layers.0.self_attn.q_proj.kernel`), so none of them depends on NNX's tree.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
from flax import nnx



def _key_name(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    raise TypeError(f"unexpected tree key {entry!r}")


def _flatten(state) -> tuple[dict[str, Any], Any]:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    flat = {".".join(_key_name(e) for e in path if _key_name(e) != "value"): leaf for path, leaf in leaves}
    return flat, treedef


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a static jit argument
class ParamLayout:
    """Names, shapes and dtypes of a model's parameters, and how to rebuild the model."""

    graphdef: Any
    treedef: Any
    shapes: dict[str, jax.ShapeDtypeStruct]
    # Each layer's sliding window (None: none), for counting attention FLOPs.
    attention_windows: tuple[int | None, ...] = (None,)

    @classmethod
    def of(cls, build: Callable[[], nnx.Module], attention_windows=(None,)) -> "ParamLayout":
        """Layout of the model `build()` would make, without allocating its parameters."""
        graphdef, state = nnx.split(nnx.eval_shape(build))
        shapes, treedef = _flatten(state)
        return cls(graphdef, treedef, shapes, tuple(attention_windows))

    @classmethod
    def initialise(cls, build: Callable[[], nnx.Module]) -> tuple["ParamLayout", dict[str, jax.Array]]:
        """Layout and freshly initialised parameters of `build()` (random-init runs)."""
        graphdef, state = nnx.split(build())
        params, treedef = _flatten(state)
        shapes = {n: jax.ShapeDtypeStruct(p.shape, p.dtype) for n, p in params.items()}
        return cls(graphdef, treedef, shapes), params

    @property
    def names(self) -> list[str]:
        return list(self.shapes)

    def bind(self, params: dict[str, jax.Array]) -> nnx.Module:
        """The model with `params` (a flat dict by name) as its parameters."""
        state = jax.tree_util.tree_unflatten(self.treedef, [params[n] for n in self.shapes])
        return nnx.merge(self.graphdef, state)


def is_stacked(name: str) -> bool:
    """A scanned-layers parameter: one tensor [L, ...] for all decoder layers."""
    parts = name.split(".")
    return parts[:2] == ["model", "layers"] and not parts[2].isdigit()


def hf_name(name: str, layer: int | None = None) -> tuple[str, bool]:
    """Hugging Face tensor name for one of ours (layer `layer` of a stacked one), and
    whether the layout is transposed."""
    if layer is not None:
        name = name.replace("model.layers.", f"model.layers.{layer}.", 1)
    stem, leaf = name.rsplit(".", 1)
    if leaf == "kernel" and stem.split(".")[-2:-1] == ["experts"]:  # [E, in, out]: `expert_tensors` lays it out
        return stem, False
    if leaf == "kernel":  # ours [in, out], torch Linear [out, in]
        return f"{stem}.weight", True
    if leaf == "embedding":
        return f"{stem}.weight", False
    return name, False


def hf_tensors(name: str, shape: tuple[int, ...]) -> list[tuple[str, bool]]:
    """(Hugging Face name, transposed) of each tensor that parameter `name` holds, in order."""
    if is_stacked(name):
        return [hf_name(name, layer) for layer in range(shape[0])]
    return [hf_name(name)]
