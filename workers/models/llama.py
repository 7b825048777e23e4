"""The Llama-shaped decoder layer (Llama, Mistral, Qwen2, Qwen3, Phi-3/Phi-4): a norm before
attention and one before the MLP, each output added to the residual."""

from __future__ import annotations

from flax import nnx

from raysft.workers.models.config import ModelConfig
from raysft.workers.models.decoder import MLP, Attention, DecoderForCausalLM, norm


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs, lora=None):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = norm(cfg, cfg.hidden_size, **kw)
        self.self_attn = Attention(cfg, **kw, rngs=rngs, lora=lora)
        self.post_attention_layernorm = norm(cfg, cfg.hidden_size, **kw)
        self.mlp = MLP(cfg, **kw, rngs=rngs, lora=lora)

    def attention_input(self, x_BxTxD):
        return self.input_layernorm(x_BxTxD)

    def add_attention(self, x_BxTxD, attended_BxTxD):
        return x_BxTxD + attended_BxTxD

    def feed_forward(self, x_BxTxD, dropout_key=None):
        return x_BxTxD + self.mlp(self.post_attention_layernorm(x_BxTxD), dropout_key)


class LlamaForCausalLM(DecoderForCausalLM):
    layer_class = DecoderLayer
