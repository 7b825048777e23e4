"""The pieces every family's decoder is built from, in Flax NNX, laid out like Hugging
Face's so parameter names map 1:1: RMSNorm, rotary tables, attention, the gated MLP, and
`DecoderForCausalLM`, which runs a family's decoder layers over packed rows.

Packed rows: `segment_ids` [B, T] (0 = padding) keep documents from attending to each
other and `positions` [B, T] restart RoPE at every document. With `scan_layers` the
decoder layers are one module whose parameters carry a leading layer axis
(`model.layers.mlp.up_proj.kernel` [L, D, F]), so compile time does not grow with depth;
layers that differ (sliding or global, local or global RoPE) are branches of the scanned
body.

A family's layer (`llama.DecoderLayer`, `gemma.DecoderLayer`) provides `attention_input(x)`,
`add_attention(x, attended)` and `feed_forward(x)`: the training forward and the KV-cache
forward (`kv_cache`) both run a layer through these three.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from raysft.workers.models.config import ModelConfig, RopeTable
from raysft.workers.models.lora import LoraSettings, child_key, linear, project
from raysft.workers.models.runtime import ModelRuntime

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


class RMSNorm(nnx.Module):
    """Llama's: normalise in fp32, cast back, then scale by w. Gemma's (`unit_offset`):
    scale by (1 + w) in fp32, then cast (its w starts at 0)."""

    def __init__(self, dim: int, eps: float, *, dtype, param_dtype, unit_offset: bool = False):
        self.weight = nnx.Param((jnp.zeros if unit_offset else jnp.ones)((dim,), param_dtype))
        self.eps, self.dtype, self.unit_offset = eps, dtype, unit_offset

    def __call__(self, x_BxTxD):
        x32_BxTxD = x_BxTxD.astype(jnp.float32)
        var_BxTx1 = jnp.mean(jnp.square(x32_BxTxD), axis=-1, keepdims=True)
        normed32_BxTxD = x32_BxTxD * jax.lax.rsqrt(var_BxTx1 + self.eps)
        if self.unit_offset:
            return (normed32_BxTxD * (1.0 + self.weight[...].astype(jnp.float32))).astype(self.dtype)
        return self.weight[...].astype(self.dtype) * normed32_BxTxD.astype(self.dtype)


def norm(cfg: ModelConfig, dim: int, *, dtype, param_dtype) -> RMSNorm:
    return RMSNorm(dim, cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype, unit_offset=cfg.norm_unit_offset)


def rope_cos_sin(positions_BxT, table: RopeTable, dtype):
    """cos and sin [B, T, rotary_dim] of `table` at `positions`. LongRoPE's long factors
    apply to the whole batch once its largest position passes the pre-training length."""
    inv_freq_K2 = jnp.asarray(table.inv_freq)
    if table.long is not None:
        longer = jnp.max(positions_BxT) + 1 > table.original_max
        inv_freq_K2 = jnp.where(longer, jnp.asarray(table.long), inv_freq_K2)
    angles_BxTxK2 = positions_BxT[..., None].astype(jnp.float32) * inv_freq_K2
    angles_BxTxK = jnp.concatenate([angles_BxTxK2, angles_BxTxK2], axis=-1)
    cos_BxTxK, sin_BxTxK = jnp.cos(angles_BxTxK), jnp.sin(angles_BxTxK)
    if table.attention_factor != 1.0:
        cos_BxTxK, sin_BxTxK = cos_BxTxK * table.attention_factor, sin_BxTxK * table.attention_factor
    return cos_BxTxK.astype(dtype), sin_BxTxK.astype(dtype)


def rope_per_table(cfg: ModelConfig, positions_BxT, dtype):
    """cos and sin of each of the config's rotary tables, stacked: [R, B, T, rotary_dim]."""
    pairs = [rope_cos_sin(positions_BxT, table, dtype) for table in cfg.rope_tables()]
    return jnp.stack([c for c, _ in pairs]), jnp.stack([s for _, s in pairs])


def rotate_half(x_BxTxNxR):
    """(-x2, x1) of each head's halves (x1, x2). In bf16, the compute dtype of accelerator
    runs, as a product with a signed permutation: exact (one +-1 per column, one product
    per output), and on TPU one MXU pass where the halves' swap is lane shuffles (the
    libtpu cost model: Qwen3-30B-A3B's layer 36.4 -> 34.9 ms). fp32 runs (CPU) swap."""
    r = x_BxTxNxR.shape[-1]
    half = r // 2
    if x_BxTxNxR.dtype != jnp.bfloat16:
        return jnp.concatenate([-x_BxTxNxR[..., half:], x_BxTxNxR[..., :half]], axis=-1)
    signed_RxR = np.zeros((r, r), np.float32)
    signed_RxR[np.arange(half) + half, np.arange(half)] = -1
    signed_RxR[np.arange(half), np.arange(half) + half] = 1
    # One permutation per head, a batch dimension, so that remat policies treat the rotation
    # as the elementwise op it stands for (dots_with_no_batch_dims_saveable would save it).
    signed_NxRxR = jnp.broadcast_to(jnp.asarray(signed_RxR, jnp.bfloat16), (x_BxTxNxR.shape[-2], r, r))
    return jnp.einsum("...nr,nrs->...ns", x_BxTxNxR, signed_NxRxR)


def apply_rope(x_BxTxNxK, cos_BxTxR, sin_BxTxR):
    """Rotate the first R dims of each head (all of them unless the rotary is partial)."""
    r = cos_BxTxR.shape[-1]
    x_rot, x_pass = x_BxTxNxK[..., :r], x_BxTxNxK[..., r:]
    rotated = rotate_half(x_rot)
    out = x_rot * cos_BxTxR[:, :, None, :] + rotated * sin_BxTxR[:, :, None, :]
    return out if x_pass.shape[-1] == 0 else jnp.concatenate([out, x_pass], axis=-1)


def _linear(fan_in, fan_out, *, bias=False, dtype, param_dtype, rngs, lora: LoraSettings | None = None, kind=""):
    return linear(fan_in, fan_out, kind, lora, use_bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs, lora=None):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, lora=lora)
        h, g, k = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = _linear(cfg.hidden_size, h * k, bias=cfg.qkv_bias, kind="q_proj", **kw)
        self.k_proj = _linear(cfg.hidden_size, g * k, bias=cfg.qkv_bias, kind="k_proj", **kw)
        self.v_proj = _linear(cfg.hidden_size, g * k, bias=cfg.qkv_bias, kind="v_proj", **kw)
        self.o_proj = _linear(h * k, cfg.hidden_size, bias=cfg.o_bias, kind="o_proj", **kw)
        if cfg.qk_norm:  # Qwen3, Gemma 3: RMSNorm over each head's vector, before RoPE
            self.q_norm = norm(cfg, k, dtype=dtype, param_dtype=param_dtype)
            self.k_norm = norm(cfg, k, dtype=dtype, param_dtype=param_dtype)
        self.heads, self.kv_heads, self.head_dim, self.qk_norm = h, g, k, cfg.qk_norm

    def qkv(self, x_BxTxD, cos_BxTxK, sin_BxTxK, dropout_key=None):
        """Queries, keys and values of x at its positions (RoPE applied)."""
        b, t, _ = x_BxTxD.shape
        q_BxTxHxK = project(self.q_proj, x_BxTxD, child_key(dropout_key, 0)).reshape(b, t, self.heads, self.head_dim)
        k_BxTxGxK = project(self.k_proj, x_BxTxD, child_key(dropout_key, 1)).reshape(b, t, self.kv_heads, self.head_dim)
        v_BxTxGxK = project(self.v_proj, x_BxTxD, child_key(dropout_key, 2)).reshape(b, t, self.kv_heads, self.head_dim)
        if self.qk_norm:
            q_BxTxHxK, k_BxTxGxK = self.q_norm(q_BxTxHxK), self.k_norm(k_BxTxGxK)
        return apply_rope(q_BxTxHxK, cos_BxTxK, sin_BxTxK), apply_rope(k_BxTxGxK, cos_BxTxK, sin_BxTxK), v_BxTxGxK

    def out(self, attended_BxTxHxK, dropout_key=None):
        b, t = attended_BxTxHxK.shape[:2]
        return project(self.o_proj, attended_BxTxHxK.reshape(b, t, self.heads * self.head_dim), dropout_key)

    def __call__(self, x_BxTxD, cos_BxTxK, sin_BxTxK, segment_ids_BxT, window, attend, dropout_key=None):
        q_BxTxHxK, k_BxTxGxK, v_BxTxGxK = self.qkv(x_BxTxD, cos_BxTxK, sin_BxTxK, dropout_key)
        attended_BxTxHxK = attend(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, segment_ids_BxT, window)
        return self.out(attended_BxTxHxK, child_key(dropout_key, 3))


class MLP(nnx.Module):
    """The gated MLP: down(act(gate(x)) * up(x)), SwiGLU or GeGLU."""

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs, lora=None):
        kw = dict(bias=cfg.mlp_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs, lora=lora)
        self.gate_proj = _linear(cfg.hidden_size, cfg.intermediate_size, kind="gate_proj", **kw)
        self.up_proj = _linear(cfg.hidden_size, cfg.intermediate_size, kind="up_proj", **kw)
        self.down_proj = _linear(cfg.intermediate_size, cfg.hidden_size, kind="down_proj", **kw)
        self.activation = cfg.hidden_activation

    def __call__(self, x_BxTxD, dropout_key=None):
        gate_BxTxF = project(self.gate_proj, x_BxTxD, child_key(dropout_key, 4))
        up_BxTxF = project(self.up_proj, x_BxTxD, child_key(dropout_key, 5))
        hidden_BxTxF = ACTIVATIONS[self.activation](gate_BxTxF) * up_BxTxF
        return project(self.down_proj, hidden_BxTxF, child_key(dropout_key, 6))


class DecoderModel(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer_class, runtime: ModelRuntime, *, dtype, param_dtype, rngs, lora=None):
        kw = dict(dtype=dtype, param_dtype=param_dtype, lora=lora, runtime=runtime)
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if runtime.scan_layers:
            if cfg.mixes_dense_and_sparse:
                raise ValueError(
                    "scan_layers holds every decoder layer in one array, and this model mixes dense layers with "
                    "mixture-of-experts layers (mlp_only_layers, decoder_sparse_step); set scan_layers false"
                )

            @nnx.split_rngs(splits=cfg.num_hidden_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def stacked_layers(rngs):
                return layer_class(cfg, **kw, rngs=rngs)

            self.layers = stacked_layers(rngs)
        else:
            self.layers = nnx.List(
                [layer_class(cfg, **kw, rngs=rngs, index=index) for index in range(cfg.num_hidden_layers)]
            )
        self.norm = norm(cfg, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype)


class DecoderForCausalLM(nnx.Module):
    """`__call__` returns logits [B, T, vocab] in the compute dtype. With `lora`, the
    projections it names carry adapters (`workers.models.lora`). A family subclasses it
    and names its decoder layer (`layer_class`)."""

    layer_class: type

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        runtime: ModelRuntime = ModelRuntime(),
        lora: LoraSettings | None = None,
        rngs: nnx.Rngs,
    ):
        self.config, self.dtype, self.runtime = cfg, dtype, runtime
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, lora=lora)
        self.model = DecoderModel(cfg, self.layer_class, runtime, **kw)
        if not cfg.tie_word_embeddings:
            self.lm_head = _linear(cfg.hidden_size, cfg.vocab_size, kind="lm_head", **kw)

    def embed(self, input_ids_BxT):
        x_BxTxD = self.runtime.embed(self.model.embed_tokens, input_ids_BxT)
        if self.config.scale_embeddings:  # Gemma: by sqrt(hidden) rounded to the compute dtype, as transformers
            x_BxTxD = x_BxTxD * jnp.asarray(self.config.hidden_size**0.5, x_BxTxD.dtype)
        return x_BxTxD

    def hidden_states(self, input_ids_BxT, segment_ids_BxT=None, positions_BxT=None, dropout_key=None):
        """Final-norm hidden states [B, T, D]. `dropout_key`: LoRA dropout's randomness
        (training only; without it adapters see their whole input)."""
        return self.hidden_states_and_routing(input_ids_BxT, segment_ids_BxT, positions_BxT, dropout_key)[0]

    def hidden_states_and_routing(self, input_ids_BxT, segment_ids_BxT=None, positions_BxT=None, dropout_key=None):
        """`hidden_states`, and a mixture-of-experts model's routing sums over the real
        tokens (`experts.routing_sums`), stacked over its sparse layers (None when dense)."""
        cfg = self.config
        if segment_ids_BxT is None:
            segment_ids_BxT = jnp.ones_like(input_ids_BxT)
        if positions_BxT is None:
            positions_BxT = jnp.broadcast_to(jnp.arange(input_ids_BxT.shape[1]), input_ids_BxT.shape)
        cos_RxBxTxK, sin_RxBxTxK = rope_per_table(cfg, positions_BxT, self.dtype)
        x_BxTxD = self.runtime.constrain(self.embed(input_ids_BxT))
        attend = self.runtime.attention(scale=cfg.attention_scale, softcap=cfg.attn_logit_softcapping)
        real_BxT = segment_ids_BxT > 0

        def layer_fn(graphdef):
            # A pure function of the layer's parameters, so it can be remat'ed and scanned.
            def run(state, window, table, x_BxTxD, layer_index):
                layer = nnx.merge(graphdef, state)
                cos_BxTxK, sin_BxTxK = cos_RxBxTxK[table], sin_RxBxTxK[table]
                attended_BxTxD = layer.self_attn(
                    layer.attention_input(x_BxTxD), cos_BxTxK, sin_BxTxK, segment_ids_BxT, window, attend,
                    child_key(dropout_key, layer_index),
                )
                x_BxTxD = layer.add_attention(x_BxTxD, attended_BxTxD)
                x_BxTxD, routing = layer.routed_feed_forward(x_BxTxD, real_BxT, child_key(dropout_key, layer_index))
                return self.runtime.constrain(x_BxTxD), routing

            return run

        windows, tables = cfg.window_per_layer, cfg.rope_table_per_layer
        if self.runtime.scan_layers:
            graphdef, stacked_state = nnx.split(self.model.layers)
            x_BxTxD, routing = self._scan_layers(layer_fn(graphdef), stacked_state, windows, tables, x_BxTxD)
        else:
            per_layer = []
            for index, (layer, window, table) in enumerate(zip(self.model.layers, windows, tables)):
                graphdef, state = nnx.split(layer)
                run = layer_fn(graphdef)
                x_BxTxD, sums = self.runtime.remat(
                    lambda s, x, run=run, w=window, r=table, i=index: run(s, w, r, x, i)
                )(state, x_BxTxD)
                per_layer += [sums] if sums is not None else []
            routing = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer) if per_layer else None
        return self.model.norm(x_BxTxD), routing

    def _scan_layers(self, run_layer, stacked_state, windows, tables, x_BxTxD):
        index_L = jnp.arange(len(windows), dtype=jnp.int32)
        kinds = list(dict.fromkeys(zip(windows, tables)))
        if len(kinds) == 1:
            body = lambda x, xs: run_layer(xs[0], *kinds[0], x, xs[1])  # noqa: E731
            return jax.lax.scan(self.runtime.remat(body), x_BxTxD, (stacked_state, index_L))
        # Layers that differ (Gemma's sliding and global layers, Qwen's max_window_layers):
        # each kind of layer is a branch with its window and rotary table static, so every
        # attention kernel applies (splash builds one kernel per window), and the scanned
        # kind picks the branch.
        kind_L = jnp.asarray([kinds.index(kind) for kind in zip(windows, tables)], jnp.int32)
        branches = [
            lambda state, x, i, w=window, r=table: run_layer(state, w, r, x, i) for window, table in kinds
        ]
        body = lambda x, xs: jax.lax.switch(xs[1], branches, xs[0], x, xs[2])  # noqa: E731
        return jax.lax.scan(self.runtime.remat(body), x_BxTxD, (stacked_state, kind_L, index_L))

    def logits(self, hidden_BxTxD):
        if self.config.tie_word_embeddings:
            logits_BxTxV = self.runtime.attend(self.model.embed_tokens, hidden_BxTxD)
        else:
            logits_BxTxV = self.lm_head(hidden_BxTxD)
        cap = self.config.final_logit_softcapping
        return logits_BxTxV if cap is None else cap * jnp.tanh(logits_BxTxV / cap)

    def __call__(self, input_ids_BxT, segment_ids_BxT=None, positions_BxT=None):
        return self.logits(self.hidden_states(input_ids_BxT, segment_ids_BxT, positions_BxT))
