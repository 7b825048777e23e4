"""How a model computes, as opposed to what it is: attention kernel, remat, scanned layers."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from raysft.workers.models.attention import ATTENTION_MECHANISMS, IMPLEMENTATIONS, resolve_mechanism, splash_kernel
from raysft.workers.runtime.mesh import BATCH_AXES, ShardingError, activation_spec

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
    # Mixture of experts: None routes every token to its experts (dropless); a factor caps
    # each expert at that many times its balanced share of a device's assignments.
    moe_capacity_factor: float | None = None
    # Mixture of experts: whole experts over fsdp, tokens sent to them (expert parallelism),
    # or the experts' weights gathered like dense ones, tokens kept (`experts`).
    moe_expert_parallel: bool = True

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
    def platform(self) -> str:
        """Where the model runs: the mesh's devices (a TPU slice that `raysft plan`
        compiles for from a CPU host), else the default backend."""
        return self.mesh.devices.flat[0].platform if self.mesh is not None else jax.default_backend()

    @property
    def mechanism(self) -> str:
        return resolve_mechanism(self.attn_mechanism, self.platform)

    def attention(self, scale: float | None = None, softcap: float | None = None) -> Callable:
        """`attend(q, k, v, segment_ids, window)` on global arrays [B, T, ...], scores
        scaled by `scale` (default 1/sqrt(K)) and capped at `softcap`.

        XLA partitions plain attention over the batch and heads itself. A Pallas kernel
        is opaque to its partitioner, and with `sp` every device should attend only its
        own queries: there each device gets its rows, heads and query shard in a
        `shard_map`, and all keys of its rows (gathered over sp).
        """
        fn = functools.partial(IMPLEMENTATIONS[self.mechanism], scale=scale, softcap=softcap)
        splash = self.mechanism == "splash"
        if splash:
            fn = functools.partial(fn, interpret=self.platform != "tpu")
        mesh = self.mesh
        if mesh is None or mesh.size == 1 or (not splash and mesh.shape["sp"] == 1):
            return fn
        sp = mesh.shape["sp"]
        q_heads, kv_heads = P(BATCH_AXES, "sp", "tp", None), P(BATCH_AXES, None, "tp", None)
        q_rows, kv_rows = P(BATCH_AXES, "sp"), P(BATCH_AXES, None)

        def sharded(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, segment_ids_BxT, window=None):
            t, heads, groups = q_BxTxHxK.shape[1], q_BxTxHxK.shape[2], k_BxTxGxK.shape[2]
            if groups % mesh.shape["tp"]:
                raise ShardingError(
                    f"tp={mesh.shape['tp']} does not divide the {groups} key/value heads; choose a tp that does"
                )
            if t % sp:
                raise ShardingError(f"sp={sp} does not divide max_sequence_length {t}")
            extra, extra_specs = (), ()
            if splash:
                kernel = splash_kernel(t, heads // groups, window, self.platform != "tpu", sp, softcap)
                extra += (kernel,)
                extra_specs += (kernel.manual_sharding_spec(jax.sharding.NamedSharding(mesh, P(None, "sp"))),)

            def local(q, k, v, segments, kv_segments, *kernel):
                kw = {"kernel": kernel[0]} if splash else {"q_offset": jax.lax.axis_index("sp") * (t // sp)}
                return fn(q, k, v, segments, window, kv_segment_ids=kv_segments, **kw)

            return jax.shard_map(
                local,
                mesh=mesh,
                in_specs=(q_heads, kv_heads, kv_heads, q_rows, kv_rows, *extra_specs),
                out_specs=q_heads,
                check_vma=False,
            )(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, segment_ids_BxT, segment_ids_BxT, *extra)

        return sharded

    def embed(self, table, ids_BxT):
        """`table(ids)` (an `nnx.Embed`), with each data-parallel replica looking up only
        its own rows: the table's gradient is then each replica's partial sum, added in
        one all-reduce over dp. Left to itself XLA gathers every replica's token
        cotangents over dp (across slices: over the data-center network) first."""
        mesh = self.mesh
        if mesh is None or mesh.shape["dp"] == 1:
            return table(ids_BxT)
        embedding_VxD = table.embedding[...].astype(table.dtype or table.embedding.dtype)
        return jax.shard_map(
            lambda e_VxD, ids: jnp.take(e_VxD, ids, axis=0),
            mesh=mesh, in_specs=(P(), P("dp")), out_specs=P("dp"), axis_names={"dp"}, check_vma=False,
        )(embedding_VxD, ids_BxT)

    def attend(self, table, hidden_BxTxD):
        """The tied LM head, `table.attend(hidden)` (an `nnx.Embed`). On a CPU the table's
        gradient is computed as [D, V] and transposed: asked for [V, D], XLA:CPU first
        copies the logits' cotangent [tokens, V], the step's largest array, into [V, tokens]
        (on W1's shapes the copy and product take 1.5 s against 0.16 s for this one)."""
        if self.platform != "cpu":
            return table.attend(hidden_BxTxD)
        query_BxTxD, embedding_VxD = table.promote_dtype((hidden_BxTxD, table.embedding[...]), dtype=table.dtype)
        return _tied_logits(query_BxTxD, embedding_VxD)

    def constrain(self, x_BxTxD):
        """Keep activations split over the batch axes and the sequence over sp."""
        if self.mesh is None or self.mesh.size == 1:
            return x_BxTxD
        return jax.lax.with_sharding_constraint(x_BxTxD, jax.sharding.NamedSharding(self.mesh, activation_spec()))

    def remat(self, fn: Callable) -> Callable:
        policy = REMAT_POLICIES[self.gradient_checkpointing]
        if self.gradient_checkpointing == "none":
            return fn
        return jax.checkpoint(fn, policy=policy)


@jax.custom_vjp
def _tied_logits(query_BxTxD, embedding_VxD):
    return jnp.dot(query_BxTxD, embedding_VxD.T)


def _tied_logits_forward(query_BxTxD, embedding_VxD):
    return _tied_logits(query_BxTxD, embedding_VxD), (query_BxTxD, embedding_VxD)


def _tied_logits_backward(residuals, d_logits_BxTxV):
    query_BxTxD, embedding_VxD = residuals
    d_query = jnp.dot(d_logits_BxTxV, embedding_VxD)
    query_NxD = query_BxTxD.reshape(-1, query_BxTxD.shape[-1])
    d_logits_NxV = d_logits_BxTxV.reshape(-1, d_logits_BxTxV.shape[-1])
    # The barrier keeps XLA from folding the transpose back into the product.
    d_embedding_DxV = jax.lax.optimization_barrier(jnp.dot(query_NxD.T, d_logits_NxV))
    return d_query, d_embedding_DxV.T


_tied_logits.defvjp(_tied_logits_forward, _tied_logits_backward)
