"""Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) in Flax NNX, laid out like
Hugging Face's so parameter names map 1:1.

Packed rows: `segment_ids` [B, T] (0 = padding) keep documents from attending to each
other and `positions` [B, T] restart RoPE at every document. With `scan_layers` the
decoder layers are one module whose parameters carry a leading layer axis
(`model.layers.mlp.up_proj.kernel` [L, D, F]), so compile time does not grow with depth.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from raysft.workers.models.config import ModelConfig
from raysft.workers.models.lora import LoraSettings, child_key, linear, project
from raysft.workers.models.runtime import ModelRuntime


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype, param_dtype):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps, self.dtype = eps, dtype

    def __call__(self, x_BxTxD):
        # Normalise in fp32 as transformers does, then cast back before the scale.
        x32_BxTxD = x_BxTxD.astype(jnp.float32)
        var_BxTx1 = jnp.mean(jnp.square(x32_BxTxD), axis=-1, keepdims=True)
        normed_BxTxD = (x32_BxTxD * jax.lax.rsqrt(var_BxTx1 + self.eps)).astype(self.dtype)
        return self.weight[...].astype(self.dtype) * normed_BxTxD


def rope_cos_sin(positions_BxT, inv_freq_K2, dtype):
    angles_BxTxK2 = positions_BxT[..., None].astype(jnp.float32) * inv_freq_K2
    angles_BxTxK = jnp.concatenate([angles_BxTxK2, angles_BxTxK2], axis=-1)
    return jnp.cos(angles_BxTxK).astype(dtype), jnp.sin(angles_BxTxK).astype(dtype)


def apply_rope(x_BxTxNxK, cos_BxTxK, sin_BxTxK):
    half = x_BxTxNxK.shape[-1] // 2
    rotated_BxTxNxK = jnp.concatenate([-x_BxTxNxK[..., half:], x_BxTxNxK[..., :half]], axis=-1)
    return x_BxTxNxK * cos_BxTxK[:, :, None, :] + rotated_BxTxNxK * sin_BxTxK[:, :, None, :]


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
        if cfg.qk_norm:  # Qwen3: RMSNorm over each head's vector, before RoPE
            self.q_norm = RMSNorm(k, cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
            self.k_norm = RMSNorm(k, cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
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
    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs, lora=None):
        kw = dict(bias=cfg.mlp_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs, lora=lora)
        self.gate_proj = _linear(cfg.hidden_size, cfg.intermediate_size, kind="gate_proj", **kw)
        self.up_proj = _linear(cfg.hidden_size, cfg.intermediate_size, kind="up_proj", **kw)
        self.down_proj = _linear(cfg.intermediate_size, cfg.hidden_size, kind="down_proj", **kw)

    def __call__(self, x_BxTxD, dropout_key=None):
        gate_BxTxF = project(self.gate_proj, x_BxTxD, child_key(dropout_key, 4))
        up_BxTxF = project(self.up_proj, x_BxTxD, child_key(dropout_key, 5))
        return project(self.down_proj, jax.nn.silu(gate_BxTxF) * up_BxTxF, child_key(dropout_key, 6))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs, lora=None):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.self_attn = Attention(cfg, **kw, rngs=rngs, lora=lora)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.mlp = MLP(cfg, **kw, rngs=rngs, lora=lora)

    def __call__(self, x_BxTxD, cos_BxTxK, sin_BxTxK, segment_ids_BxT, window, attend, dropout_key=None):
        attn_BxTxD = self.self_attn(
            self.input_layernorm(x_BxTxD), cos_BxTxK, sin_BxTxK, segment_ids_BxT, window, attend, dropout_key
        )
        return self.feed_forward(x_BxTxD + attn_BxTxD, dropout_key)

    def feed_forward(self, x_BxTxD, dropout_key=None):
        return x_BxTxD + self.mlp(self.post_attention_layernorm(x_BxTxD), dropout_key)


class LlamaModel(nnx.Module):
    def __init__(self, cfg: ModelConfig, runtime: ModelRuntime, *, dtype, param_dtype, rngs, lora=None):
        kw = dict(dtype=dtype, param_dtype=param_dtype, lora=lora)
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if runtime.scan_layers:

            @nnx.split_rngs(splits=cfg.num_hidden_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def stacked_layers(rngs):
                return DecoderLayer(cfg, **kw, rngs=rngs)

            self.layers = stacked_layers(rngs)
        else:
            self.layers = nnx.List([DecoderLayer(cfg, **kw, rngs=rngs) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)


class LlamaForCausalLM(nnx.Module):
    """`__call__` returns logits [B, T, vocab] in the compute dtype. With `lora`, the
    projections it names carry adapters (`workers.models.lora`)."""

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
        self.model = LlamaModel(cfg, runtime, dtype=dtype, param_dtype=param_dtype, rngs=rngs, lora=lora)
        if not cfg.tie_word_embeddings:
            self.lm_head = _linear(
                cfg.hidden_size, cfg.vocab_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs, lora=lora, kind="lm_head"
            )

    def hidden_states(self, input_ids_BxT, segment_ids_BxT=None, positions_BxT=None, dropout_key=None):
        """Final-norm hidden states [B, T, D]. `dropout_key`: LoRA dropout's randomness
        (training only; without it adapters see their whole input)."""
        if segment_ids_BxT is None:
            segment_ids_BxT = jnp.ones_like(input_ids_BxT)
        if positions_BxT is None:
            positions_BxT = jnp.broadcast_to(jnp.arange(input_ids_BxT.shape[1]), input_ids_BxT.shape)
        cos_BxTxK, sin_BxTxK = rope_cos_sin(
            positions_BxT, jnp.asarray(self.config.rope_inverse_frequencies()), self.dtype
        )
        x_BxTxD = self.runtime.constrain(self.runtime.embed(self.model.embed_tokens, input_ids_BxT))
        attend = self.runtime.attention()
        windows = self.config.window_per_layer

        def layer_fn(graphdef):
            # A pure function of the layer's parameters, so it can be remat'ed and scanned.
            def run(state, window, x_BxTxD, layer_index):
                layer = nnx.merge(graphdef, state)
                out_BxTxD = layer(
                    x_BxTxD, cos_BxTxK, sin_BxTxK, segment_ids_BxT, window, attend, child_key(dropout_key, layer_index)
                )
                return self.runtime.constrain(out_BxTxD)

            return run

        if self.runtime.scan_layers:
            graphdef, stacked_state = nnx.split(self.model.layers)
            x_BxTxD = self._scan_layers(layer_fn(graphdef), stacked_state, windows, x_BxTxD)
        else:
            for index, (layer, window) in enumerate(zip(self.model.layers, windows)):
                graphdef, state = nnx.split(layer)
                run = layer_fn(graphdef)
                x_BxTxD = self.runtime.remat(lambda s, x, run=run, w=window, i=index: run(s, w, x, i))(state, x_BxTxD)
        return self.model.norm(x_BxTxD)

    def _scan_layers(self, run_layer, stacked_state, windows, x_BxTxD):
        index_L = jnp.arange(len(windows), dtype=jnp.int32)
        if len(set(windows)) == 1:  # one static window: every attention kernel applies
            body = lambda x, xs: (run_layer(xs[0], windows[0], x, xs[1]), None)  # noqa: E731
            x_BxTxD, _ = jax.lax.scan(self.runtime.remat(body), x_BxTxD, (stacked_state, index_L))
            return x_BxTxD
        # Layers with different windows (Qwen's max_window_layers): the window is scanned too,
        # with "no window" as the row length.
        no_window = x_BxTxD.shape[1]
        window_L = jnp.asarray([no_window if w is None else w for w in windows], jnp.int32)
        body = lambda x, xs: (run_layer(xs[0], xs[1], x, xs[2]), None)  # noqa: E731
        x_BxTxD, _ = jax.lax.scan(self.runtime.remat(body), x_BxTxD, (stacked_state, window_L, index_L))
        return x_BxTxD

    def logits(self, hidden_BxTxD):
        if self.config.tie_word_embeddings:
            return self.runtime.attend(self.model.embed_tokens, hidden_BxTxD)
        return self.lm_head(hidden_BxTxD)

    def __call__(self, input_ids_BxT, segment_ids_BxT=None, positions_BxT=None):
        return self.logits(self.hidden_states(input_ids_BxT, segment_ids_BxT, positions_BxT))
