"""How a model computes, as opposed to what it is: attention kernel, remat, scanned layers."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
from jax.sharding import PartitionSpec as P

from raysft.workers.models.attention import ATTENTION_MECHANISMS, IMPLEMENTATIONS, resolve_mechanism

# Names as EasyDeL and MaxText spell them; `full` saves nothing, like `nothing_saveable`.
REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class ModelRuntime:
    attn_mechanism: str = "auto"
    gradient_checkpointing: str = "none"
    scan_layers: bool = False
    # The training mesh, for kernels that must be told how their inputs are split.
    mesh: jax.sharding.Mesh | None = None

    def __post_init__(self):
        # Only validate here: resolving `auto` asks for the backend, which must wait for
        # jax.distributed on the workers.
        if self.attn_mechanism not in ATTENTION_MECHANISMS:
            resolve_mechanism(self.attn_mechanism)
        if self.gradient_checkpointing not in REMAT_POLICIES:
            raise ValueError(
                f"gradient_checkpointing {self.gradient_checkpointing!r} is not one of "
                f"{', '.join(REMAT_POLICIES)}"
            )

    @property
    def mechanism(self) -> str:
        return resolve_mechanism(self.attn_mechanism)

    def attention(self) -> Callable:
        fn = IMPLEMENTATIONS[self.mechanism]
        if self.mechanism != "splash" or self.mesh is None or self.mesh.size == 1:
            return fn
        from raysft.workers.mesh import BATCH_AXES

        # A Pallas kernel is opaque to XLA's partitioner: hand each device its own rows and heads.
        heads = P(BATCH_AXES, None, "tp", None)
        rows = P(BATCH_AXES, None)

        def sharded(q, k, v, segment_ids, window=None):
            local = lambda q, k, v, s: fn(q, k, v, s, window)  # noqa: E731
            return jax.shard_map(
                local, mesh=self.mesh, in_specs=(heads, heads, heads, rows), out_specs=heads, check_vma=False
            )(q, k, v, segment_ids)

        return sharded

    def constrain(self, x_BxTxD):
        """Keep activations split over the batch axes and the sequence over sp."""
        if self.mesh is None or self.mesh.size == 1:
            return x_BxTxD
        from raysft.workers.mesh import activation_spec

        return jax.lax.with_sharding_constraint(x_BxTxD, jax.sharding.NamedSharding(self.mesh, activation_spec()))

    def remat(self, fn: Callable) -> Callable:
        policy = REMAT_POLICIES[self.gradient_checkpointing]
        if self.gradient_checkpointing == "none":
            return fn
        return jax.checkpoint(fn, policy=policy)
