"""The Llama-shaped decoder layer (Llama, Mistral, Qwen2, Qwen3, Phi-3/Phi-4): a norm before
attention and one before the MLP, each output added to the residual."""

from __future__ import annotations

from flax import nnx

from raysft.workers.models.config import ModelConfig
from raysft.workers.models.decoder import MLP, Attention, DecoderForCausalLM, norm


class DecoderLayer(nnx.Module):
    """`index`: the layer's place in the decoder (None for scanned layers, which are all
    alike); `runtime`: how the model computes, for layers whose compute depends on the mesh."""

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs, lora=None, runtime=None, index=None):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = norm(cfg, cfg.hidden_size, **kw)
        self.self_attn = Attention(cfg, **kw, rngs=rngs, lora=lora)
        self.post_attention_layernorm = norm(cfg, cfg.hidden_size, **kw)
        self.mlp = self.make_mlp(cfg, index, runtime, **kw, rngs=rngs, lora=lora)

    def make_mlp(self, cfg: ModelConfig, index, runtime, *, dtype, param_dtype, rngs, lora):
        return MLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs, lora=lora)

    def attention_input(self, x_BxTxD):
        return self.input_layernorm(x_BxTxD)

    def add_attention(self, x_BxTxD, attended_BxTxD):
        return x_BxTxD + attended_BxTxD

    def feed_forward(self, x_BxTxD, dropout_key=None):
        return x_BxTxD + self.mlp(self.post_attention_layernorm(x_BxTxD), dropout_key)

    def routed_feed_forward(self, x_BxTxD, real_BxT=None, dropout_key=None):
        """`feed_forward`, and a sparse layer's routing sums over the tokens `real_BxT`
        marks (`experts.routing_sums`; None for a dense layer)."""
        return self.feed_forward(x_BxTxD, dropout_key), None


class LlamaForCausalLM(DecoderForCausalLM):
    layer_class = DecoderLayer
