"""The Gemma 2 / Gemma 3 decoder layer: Llama's, with norms after attention and around the
MLP ("sandwich" norms), each block's normed output added to the residual. Everything else
Gemma has ((1 + w) norms, scaled embeddings, GeGLU, soft caps, q/k norms, local and
global RoPE) is a switch of the shared pieces in `decoder`."""

from __future__ import annotations

from raysft.workers.models import llama
from raysft.workers.models.config import ModelConfig
from raysft.workers.models.decoder import DecoderForCausalLM, norm


class DecoderLayer(llama.DecoderLayer):
    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs, lora=None, runtime=None, index=None):
        super().__init__(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs, lora=lora, runtime=runtime, index=index)
        # Hugging Face's names: `post_attention_layernorm` here normalises attention's
        # output, and the MLP has a norm on each side.
        self.pre_feedforward_layernorm = norm(cfg, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype)
        self.post_feedforward_layernorm = norm(cfg, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype)

    def add_attention(self, x_BxTxD, attended_BxTxD):
        return x_BxTxD + self.post_attention_layernorm(attended_BxTxD)

    def feed_forward(self, x_BxTxD, dropout_key=None):
        return x_BxTxD + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x_BxTxD), dropout_key))


class GemmaForCausalLM(DecoderForCausalLM):
    layer_class = DecoderLayer
