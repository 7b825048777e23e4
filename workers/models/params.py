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


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a static jit argument
class ParamLayout:
    """Names, shapes and dtypes of a model's parameters, and how to rebuild the model."""

    graphdef: Any
    treedef: Any
    shapes: dict[str, jax.ShapeDtypeStruct]

    @classmethod
    def of(cls, build: Callable[[], nnx.Module]) -> "ParamLayout":
        """Layout of the model `build()` would make, without allocating its parameters."""
        graphdef, state = nnx.split(nnx.eval_shape(build))
        leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
        shapes = {
            ".".join(_key_name(e) for e in path if _key_name(e) != "value"): leaf
            for path, leaf in leaves
        }
        return cls(graphdef, treedef, shapes)

    @property
    def names(self) -> list[str]:
        return list(self.shapes)

    def bind(self, params: dict[str, jax.Array]) -> nnx.Module:
        """The model with `params` (a flat dict by name) as its parameters."""
        state = jax.tree_util.tree_unflatten(self.treedef, [params[n] for n in self.shapes])
        return nnx.merge(self.graphdef, state)


def hf_name(name: str) -> tuple[str, bool]:
    """Hugging Face tensor name for one of ours, and whether the layout is transposed."""
    stem, leaf = name.rsplit(".", 1)
    if leaf == "kernel":  # ours [in, out], torch Linear [out, in]
        return f"{stem}.weight", True
    if leaf == "embedding":
        return f"{stem}.weight", False
    return name, False
