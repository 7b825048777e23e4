"""Mixture-of-experts compute: the router's top-k, dropless dispatch of every token to its
experts as grouped matmuls, and expert parallelism over the mesh.

Dropless: the (token, expert) assignments are sorted by expert and each expert multiplies
exactly the rows routed to it (`grouped_matmul`), so no token is dropped for want of
capacity and no expert computes rows it was not given, unlike a dense one-hot einsum over
every expert (E / k times the FLOPs). A capacity factor (`with_capacity`, off unless
`moe_capacity_factor` is set) trades that for fixed-shape buffers: each expert takes at
most its share times the factor, and the overflow is dropped.

Expert parallelism: experts are split over the axes that split parameters (`fsdp`, and
`sp` with it), each device holding E / ep of them. A device sorts its own tokens'
assignments by expert, sends each peer the rows for the peer's experts (an all-to-all),
runs its experts over what it received, and sends the results back the same way; `tp`
splits each expert's intermediate dimension, as it does a dense MLP's. Attention and the
rest of the model stay ZeRO-3 over the same axes, so no mesh axis is added. Or
(`moe_expert_parallel` false) the experts' weights are gathered like dense ones and each
device computes its own tokens with every expert: weights move instead of tokens, off the
critical path.

Rows are sorted and unsorted by `row_gathers`, gathers whose gradients are gathers too.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from raysft.workers.models.decoder import ACTIVATIONS
from raysft.workers.models.row_gathers import gather_rows, inverse_permutation, weighted_rows
from raysft.workers.runtime.mesh import BATCH_AXES, PARAM_SHARD_AXES, ShardingError


def top_k_routing(logits_NxE, k: int, renormalise: bool):
    """Softmax over experts in fp32, the k most probable, optionally renormalised to sum to
    one (as transformers routes): (weights [N, k], experts [N, k], probabilities [N, E])."""
    probs_NxE = jax.nn.softmax(logits_NxE.astype(jnp.float32), axis=-1)
    _, experts_NxK = jax.lax.top_k(jax.lax.stop_gradient(probs_NxE), k)
    # The picked probabilities by a one-hot contraction: top_k's own gradient (and a
    # gather's) is a scatter into [N, E], which serializes on TPU (its cost model: -2 s).
    one_hot_NxKxE = jax.nn.one_hot(experts_NxK, probs_NxE.shape[-1], dtype=probs_NxE.dtype)
    weights_NxK = jnp.einsum("ne,nke->nk", probs_NxE, one_hot_NxKxE)
    if renormalise:
        weights_NxK = weights_NxK / jnp.sum(weights_NxK, axis=-1, keepdims=True)
    return weights_NxK, experts_NxK, probs_NxE


def routing_sums(logits_NxE, probs_NxE, experts_NxK, real_N) -> dict[str, jax.Array]:
    """One layer's sums over its real tokens (padding excluded), for the load-balancing
    loss, the router z-loss and the per-expert load: assignments per expert, router
    probability per expert, squared log-normaliser, tokens."""
    real_N = real_N.astype(jnp.float32)
    # A one-hot contraction: it splits over the tokens' devices as they are, where a sort
    # would gather every token's assignments, and a scatter-add serializes on TPU.
    one_hot_NxKxE = jax.nn.one_hot(experts_NxK, logits_NxE.shape[-1], dtype=jnp.float32)
    assigned_E = jnp.einsum("nke,n->e", one_hot_NxKxE, real_N)
    log_norm_N = jax.nn.logsumexp(logits_NxE.astype(jnp.float32), axis=-1)
    return {
        "assigned": jax.lax.stop_gradient(assigned_E),
        "probability": jnp.sum(probs_NxE * real_N[:, None], axis=0),
        "z": jnp.sum(jnp.square(log_norm_N) * real_N),
        "tokens": jax.lax.stop_gradient(jnp.sum(real_N)),
    }


def sorted_bounds(sorted_ids, groups: int):
    """Where each id 0..groups-1 starts in an ascending array, and its end: [groups + 1].
    Counting by search, not by a scatter-add: one into a few bins serializes on TPU
    (its cost model prices it at -2 s)."""
    return jnp.searchsorted(sorted_ids, jnp.arange(groups + 1, dtype=sorted_ids.dtype), side="left")


def _tile_rows(rows: int, groups: int) -> int:
    """Rows per tile of the CPU grouped matmul: about a group's share, 8 to 128."""
    share = max(rows // max(groups, 1), 1)
    return int(min(128, max(8, 1 << (share - 1).bit_length())))


def _tiled_grouped_matmul(x_MxD, w_ExDxF, sizes_E):
    """`ragged_dot` as a scan over tiles of one group each. XLA:CPU lowers `ragged_dot` to a
    masked product with every group (E times the FLOPs); here each group's rows are laid
    out from a tile boundary, and each tile multiplies only its group's weights."""
    m, d = x_MxD.shape
    e = w_ExDxF.shape[0]
    tile = _tile_rows(m, e)
    tiles = -(-(m + e * (tile - 1)) // tile)
    ends_E = jnp.cumsum(sizes_E)
    starts_E = ends_E - sizes_E
    padded_E = -(-sizes_E // tile) * tile
    padded_ends_E = jnp.cumsum(padded_E)
    padded_starts_E = padded_ends_E - padded_E
    # Each padded slot's source row (m: a zero row) and each tile's group.
    slot_P = jnp.arange(tiles * tile)
    group_P = jnp.minimum(jnp.searchsorted(padded_ends_E, slot_P, side="right"), e - 1)
    offset_P = slot_P - padded_starts_E[group_P]
    source_P = jnp.where(offset_P < sizes_E[group_P], starts_E[group_P] + offset_P, m)
    x_padded = jnp.take(jnp.concatenate([x_MxD, jnp.zeros((1, d), x_MxD.dtype)]), source_P, axis=0)
    tile_group = group_P[::tile]

    def one_tile(_, xs):
        x_tile, group = xs
        return None, x_tile @ w_ExDxF[group]

    _, y_tiles = jax.lax.scan(one_tile, None, (x_padded.reshape(tiles, tile, d), tile_group))
    y_PxF = y_tiles.reshape(tiles * tile, -1)
    # Each row's slot; rows past the groups' total get zeros, as `ragged_dot` gives them.
    row_M = jnp.arange(m)
    group_M = jnp.minimum(jnp.searchsorted(ends_E, row_M, side="right"), e - 1)
    slot_M = padded_starts_E[group_M] + row_M - starts_E[group_M]
    return jnp.where((row_M < ends_E[-1])[:, None], jnp.take(y_PxF, slot_M, axis=0), 0).astype(y_PxF.dtype)


def grouped_matmul(x_MxD, w_ExDxF, sizes_E, platform: str):
    """Rows [start_e, start_e + sizes_E[e]) of x times expert e's weights; rows past the
    groups' total give zeros. TPU and GPU have a native ragged matmul."""
    if platform == "cpu":
        return _tiled_grouped_matmul(x_MxD, w_ExDxF, sizes_E)
    return jax.lax.ragged_dot(x_MxD, w_ExDxF, sizes_E.astype(jnp.int32))


def expert_projection(x_MxD, sizes_E, weights: dict, lora_scale: float, platform: str):
    """One projection of each group's expert: x W, plus scale * x A B where LoRA adapts it
    (`weights`: kernel [E, in, out], and lora_a [E, in, r], lora_b [E, r, out])."""
    y_MxF = grouped_matmul(x_MxD, weights["kernel"], sizes_E, platform)
    if "lora_a" not in weights:
        return y_MxF
    low_MxR = grouped_matmul(x_MxD, weights["lora_a"], sizes_E, platform)
    return y_MxF + grouped_matmul(low_MxR, weights["lora_b"], sizes_E, platform) * jnp.asarray(lora_scale, y_MxF.dtype)


def expert_mlp(x_MxD, sizes_E, projections, activation: str, platform: str, lora_scale: float = 1.0):
    """Each group of rows through its expert's gated MLP (`projections`: gate, up, down)."""
    gate, up, down = projections
    gate_MxF = expert_projection(x_MxD, sizes_E, gate, lora_scale, platform)
    up_MxF = expert_projection(x_MxD, sizes_E, up, lora_scale, platform)
    return expert_projection(ACTIVATIONS[activation](gate_MxF) * up_MxF, sizes_E, down, lora_scale, platform)


def dropless(x_NxD, experts_NxK, weights_NxK, projections, activation: str, platform: str, num_experts: int,
             lora_scale: float = 1.0):
    """sum_k weight_k * expert_k(x) for every token, one device holding every expert."""
    n, k = experts_NxK.shape
    flat_A = experts_NxK.reshape(-1)
    order_A = jnp.argsort(flat_A, stable=True)
    sizes_E = jnp.diff(sorted_bounds(jnp.take(flat_A, order_A), num_experts))
    place_A = inverse_permutation(order_A)
    rows_AxD = gather_rows(x_NxD, order_A // k, place_A.reshape(n, k), True)
    y_AxD = expert_mlp(rows_AxD, sizes_E, projections, activation, platform, lora_scale)
    return weighted_rows(y_AxD, weights_NxK, place_A.reshape(n, k), order_A)


def _batched_projection(x_ExCxD, weights: dict, lora_scale: float):
    y = jnp.einsum("ecd,edf->ecf", x_ExCxD, weights["kernel"])
    if "lora_a" not in weights:
        return y
    low = jnp.einsum("ecd,edr->ecr", x_ExCxD, weights["lora_a"])
    return y + jnp.einsum("ecr,erf->ecf", low, weights["lora_b"]) * jnp.asarray(lora_scale, y.dtype)


def batched_expert_mlp(x_ExCxD, projections, activation: str, lora_scale: float = 1.0):
    """Each expert's gated MLP over its own C rows: batched matmuls of fixed shape."""
    gate, up, down = projections
    hidden = ACTIVATIONS[activation](_batched_projection(x_ExCxD, gate, lora_scale)) * _batched_projection(
        x_ExCxD, up, lora_scale
    )
    return _batched_projection(hidden, down, lora_scale)


def capacity_slots(experts_NxK, real_N, num_experts: int, capacity: int):
    """Each assignment's slot in an [E, C] buffer (E C where it is dropped: its expert's C
    slots were taken by earlier real tokens; padding only takes what real tokens leave),
    and the assignment each slot holds (N K if none)."""
    flat_A = experts_NxK.reshape(-1)
    rows = flat_A.shape[0]
    padding_A = jnp.repeat(~real_N, experts_NxK.shape[1]).astype(flat_A.dtype)
    order_A = jnp.argsort(flat_A * 2 + padding_A, stable=True)
    bounds = sorted_bounds(jnp.take(flat_A, order_A), num_experts)
    starts_E = bounds[:-1]
    position_A = jnp.take(jnp.arange(rows) - starts_E[jnp.take(flat_A, order_A)], inverse_permutation(order_A))
    slot_A = jnp.where(position_A < capacity, flat_A * capacity + position_A, num_experts * capacity)
    # Slot c of expert e holds the e-th group's c-th sorted assignment, if it has one.
    offset_ExC = starts_E[:, None] + jnp.arange(capacity)
    taken_ExC = offset_ExC < bounds[1:, None]
    holder_ExC = jnp.where(taken_ExC, jnp.take(order_A, jnp.minimum(offset_ExC, rows - 1)), rows)
    return slot_A, holder_ExC.reshape(-1).astype(jnp.int32)


def with_capacity(x_NxD, experts_NxK, weights_NxK, real_N, projections, activation: str, num_experts: int,
                  capacity_factor: float, lora_scale: float = 1.0, exchange=None):
    """sum_k weight_k * expert_k(x) with each expert taking at most C = capacity_factor x
    N k / E rows (GShard's capacity; the overflow is dropped, its share of the token
    left out): fixed-shape buffers [E, C, D] and batched matmuls. `exchange` moves the
    buffer to the devices holding the experts and back (expert parallelism). Also which
    assignments were dropped [N, k]."""
    n, k = experts_NxK.shape
    d = x_NxD.shape[-1]
    capacity = max(1, -(-int(capacity_factor * n * k) // num_experts))
    slot_A, holder_S = capacity_slots(experts_NxK, real_N, num_experts, capacity)
    # An empty slot holds some token's row: computed, never read, and given no gradient.
    buffer_ExCxD = gather_rows(x_NxD, holder_S // k, slot_A.reshape(n, k), False).reshape(num_experts, capacity, d)
    if exchange is None:
        y_ExCxD = batched_expert_mlp(buffer_ExCxD, projections, activation, lora_scale)
    else:
        y_ExCxD = exchange(buffer_ExCxD, lambda local: batched_expert_mlp(local, projections, activation, lora_scale))
    out = weighted_rows(y_ExCxD.reshape(-1, d), weights_NxK, slot_A.reshape(n, k), holder_S)
    return out, (slot_A == num_experts * capacity).reshape(n, k)


def expert_axes(mesh) -> tuple[str, ...]:
    """The mesh axes experts are split over: those that split parameters (ZeRO-3)."""
    return tuple(a for a in PARAM_SHARD_AXES["fsdp"] if mesh.shape[a] > 1)


def _exchange(rows_MxD, chunk: int, send_starts, send_sizes, axes, ways: int, ragged: bool):
    """Send rows [send_starts[p], +send_sizes[p]) to peer p; what peer p sent lands at
    [p * chunk, p * chunk + its count) of the result [ways * chunk, D]. TPU and GPU move
    only those rows (`ragged_all_to_all`); XLA:CPU has no ragged all-to-all, so there each
    peer's rows travel in a fixed chunk."""
    d = rows_MxD.shape[1]
    if ragged:
        me = jax.lax.axis_index(axes)
        out = jnp.zeros((ways * chunk, d), rows_MxD.dtype)
        recv_sizes = jax.lax.all_to_all(send_sizes, axes, 0, 0, tiled=True)
        offsets = jnp.full((ways,), me * chunk, send_starts.dtype)
        return jax.lax.ragged_all_to_all(rows_MxD, out, send_starts, send_sizes, offsets, recv_sizes, axis_name=axes)
    # Lay each peer's rows out at the start of its chunk, then swap chunks.
    slot_W = jnp.arange(ways * chunk)
    peer_W, offset_W = slot_W // chunk, slot_W % chunk
    source_W = jnp.where(offset_W < send_sizes[peer_W], send_starts[peer_W] + offset_W, rows_MxD.shape[0])
    padded = jnp.take(jnp.concatenate([rows_MxD, jnp.zeros((1, d), rows_MxD.dtype)]), source_W, axis=0)
    return jax.lax.all_to_all(padded.reshape(ways, chunk, d), axes, 0, 0, tiled=False).reshape(ways * chunk, d)


def expert_parallel(mesh, x_BxTxD, experts_BxTxK, weights_BxTxK, real_BxT, projections, activation: str,
                    num_experts: int, lora_scale: float = 1.0, capacity_factor: float | None = None,
                    split_experts: bool = True):
    """`dropless` (or `with_capacity`) on the mesh: with `split_experts`, the experts split
    over `expert_axes`, each device's tokens going to the devices holding their experts and
    coming back; without, every device gathering every expert's weights (as ZeRO-3 gathers
    dense ones) for its own tokens. `tp` splits each expert's intermediate dimension (and a
    down projection's LoRA A with it). Also which assignments were dropped [B, T, k] (none
    when dropless)."""
    axes = expert_axes(mesh) if split_experts else ()
    ways = int(np.prod([mesh.shape[a] for a in axes]))
    if num_experts % ways:
        raise ShardingError(
            f"the {num_experts} experts do not split over {' x '.join(f'{a}={mesh.shape[a]}' for a in axes)}; "
            "choose fsdp (times sp) that divides the number of experts, and dp or tp for the rest"
        )
    platform = mesh.devices.flat[0].platform
    mlp = functools.partial(expert_mlp, activation=activation, platform=platform, lora_scale=lora_scale)

    def local(x_bxtxD, experts_bxtxK, weights_bxtxK, real_bxt, local_projections):
        b, t, d = x_bxtxD.shape
        k = experts_bxtxK.shape[-1]
        x_NxD = x_bxtxD.reshape(b * t, d)
        experts_NxK, weights_NxK = experts_bxtxK.reshape(-1, k), weights_bxtxK.reshape(-1, k)
        dropped_NxK = jnp.zeros((b * t, k), bool)
        if capacity_factor is not None:
            out_NxD, dropped_NxK = with_capacity(
                x_NxD, experts_NxK, weights_NxK, real_bxt.reshape(-1), local_projections, activation, num_experts,
                capacity_factor, lora_scale, _capacity_exchange(axes, ways, num_experts),
            )
        elif ways == 1:  # every expert here; only tp splits them
            out_NxD = dropless(x_NxD, experts_NxK, weights_NxK, local_projections, activation, platform, num_experts,
                               lora_scale)
        else:
            out_NxD = _dispatched(x_NxD, experts_NxK, weights_NxK, lambda rows, sizes: mlp(rows, sizes, local_projections),
                                  axes, ways, num_experts, ragged=platform != "cpu")
        # Each tp device summed over its part of the intermediate dimension (a no-op at tp=1,
        # where it tells shard_map the result is the same on the axis).
        return jax.lax.psum(out_NxD, "tp").reshape(b, t, d), dropped_NxK.reshape(b, t, k)

    tokens = P(BATCH_AXES, "sp", None)
    return jax.shard_map(
        local, mesh=mesh, in_specs=(tokens, tokens, tokens, P(BATCH_AXES, "sp"), _expert_specs(axes, projections)),
        out_specs=(tokens, tokens),
    )(x_BxTxD, experts_BxTxK, weights_BxTxK, real_BxT, projections)


def _expert_specs(axes: tuple[str, ...], projections) -> tuple[dict, ...]:
    """How gate, up and down (and their adapters) enter the shard_map: experts over `axes`;
    gate and up split their outputs over tp (LoRA's B with them), down its inputs (and A)."""
    split = None if not axes else axes if len(axes) > 1 else axes[0]
    column = {"kernel": P(split, None, "tp"), "lora_a": P(split, None, None), "lora_b": P(split, None, "tp")}
    row = {"kernel": P(split, "tp", None), "lora_a": P(split, "tp", None), "lora_b": P(split, None, None)}
    return tuple({key: spec[key] for key in weights} for spec, weights in zip((column, column, row), projections))


def _capacity_exchange(axes: tuple[str, ...], ways: int, num_experts: int):
    """`with_capacity`'s exchange: the [E, C, D] buffer's slots of each peer's experts go to
    that peer ([E / ways, ways x C, D] there), are computed, and come back."""
    local_experts = num_experts // ways

    def exchange(buffer_ExCxD, compute):
        if ways == 1:
            return compute(buffer_ExCxD)
        _, c, d = buffer_ExCxD.shape
        mine = jax.lax.all_to_all(buffer_ExCxD.reshape(ways, local_experts, c, d), axes, 0, 0, tiled=False)
        y = compute(mine.transpose(1, 0, 2, 3).reshape(local_experts, ways * c, d))
        y = y.reshape(local_experts, ways, c, d).transpose(1, 0, 2, 3)
        return jax.lax.all_to_all(y, axes, 0, 0, tiled=False).reshape(num_experts, c, d)

    return exchange


def _dispatched(x_NxD, experts_NxK, weights_NxK, compute, axes: tuple[str, ...], ways: int, num_experts: int,
                ragged: bool):
    """Dropless expert parallelism on one device: each token's weighted sum of its experts'
    results, each computed by its expert's device. The rows sorted by expert go to their
    experts' owners; each device sorts what it received by its own experts,
    `compute(rows, group_sizes)` runs them, and the results come back."""
    n, k = experts_NxK.shape
    rows, local_experts = n * k, num_experts // ways
    flat_A = experts_NxK.reshape(-1)
    order_A = jnp.argsort(flat_A, stable=True)
    sizes_E = jnp.diff(sorted_bounds(jnp.take(flat_A, order_A), num_experts))
    # Sorted by expert, the rows for each peer are contiguous.
    sizes_WxL = sizes_E.reshape(ways, local_experts)
    send_sizes_W = jnp.sum(sizes_WxL, axis=1)
    send_starts_W = jnp.cumsum(send_sizes_W) - send_sizes_W
    place_A = inverse_permutation(order_A)
    sent_AxD = gather_rows(x_NxD, order_A // k, place_A.reshape(n, k), True)
    received = _exchange(sent_AxD, rows, send_starts_W, send_sizes_W, axes, ways, ragged)
    # From each peer: its rows for each of this device's experts, sorted by expert.
    recv_sizes_WxL = jax.lax.all_to_all(sizes_WxL, axes, 0, 0, tiled=True)
    slot_R = jnp.arange(ways * rows)
    peer_R, offset_R = slot_R // rows, slot_R % rows
    ends_WxL = jnp.cumsum(recv_sizes_WxL, axis=1)
    expert_R = jax.vmap(lambda ends, o: jnp.searchsorted(ends, o, side="right"))(ends_WxL[peer_R], offset_R)
    order_R = jnp.argsort(expert_R, stable=True)  # by local expert; padding (= local_experts) last
    place_R = inverse_permutation(order_R)
    y_R = compute(gather_rows(received, order_R, place_R[:, None], True), jnp.sum(recv_sizes_WxL, axis=0))
    y_R = gather_rows(y_R, place_R, order_R[:, None], True)
    back = _exchange(y_R, rows, jnp.arange(ways) * rows, jnp.sum(recv_sizes_WxL, axis=1), axes, ways, ragged)
    # Sorted row i went to peer p = its expert's owner, at offset i - send_starts[p], and
    # came back to the same place in p's chunk; the rest of a chunk is padding.
    peer_A = flat_A // local_experts
    back_A = peer_A * rows + place_A - send_starts_W[peer_A]
    answered_B = jnp.where(offset_R < send_sizes_W[peer_R], jnp.take(order_A, send_starts_W[peer_R] + offset_R,
                                                                     mode="clip"), rows)
    return weighted_rows(back, weights_NxK, back_A.reshape(n, k), answered_B)
