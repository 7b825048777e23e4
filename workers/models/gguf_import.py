"""Convert a llama.cpp GGUF file into a Hugging Face model directory we can load.

Tensors are dequantized to fp32 and llama.cpp's q/k row permutation (which it applies so
its RoPE kernel can rotate adjacent pairs) is undone, giving transformers' layout.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np

from raysft.storage.locations import default_cache_dir
from raysft.workers.models.config import ModelLoadError
from raysft.workers.models.loading import SINGLE_FILE

_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma 3's layer: norms around attention and the MLP, and q/k norms.
_GEMMA3_LAYER_TENSORS = {
    **_LAYER_TENSORS,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _hf_tensor_name(gguf_name: str, layer_tensors: dict[str, str]) -> str:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    _, layer, kind, suffix = gguf_name.split(".")
    return f"model.layers.{layer}.{layer_tensors[kind]}.{suffix}"


def _unpermute_rows(w_OxI: np.ndarray, heads: int) -> np.ndarray:
    half_head = w_OxI.shape[0] // heads // 2
    return w_OxI.reshape(heads, half_head, 2, *w_OxI.shape[1:]).swapaxes(1, 2).reshape(w_OxI.shape)


def _hf_config(fields: dict, tensor_names: set[str]) -> dict:
    arch = fields["general.architecture"]
    if arch not in ("llama", "gemma3"):
        raise ModelLoadError(f"GGUF architecture {arch!r} is not supported (llama, gemma3)")
    heads = fields[f"{arch}.attention.head_count"]
    hidden = fields[f"{arch}.embedding_length"]
    head_dim = fields.get(f"{arch}.attention.key_length", fields.get(f"{arch}.rope.dimension_count", hidden // heads))
    config = {
        "vocab_size": fields.get(f"{arch}.vocab_size", len(fields["tokenizer.ggml.tokens"])),
        "hidden_size": hidden,
        "intermediate_size": fields[f"{arch}.feed_forward_length"],
        "num_hidden_layers": fields[f"{arch}.block_count"],
        "num_attention_heads": heads,
        "num_key_value_heads": fields.get(f"{arch}.attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": fields[f"{arch}.attention.layer_norm_rms_epsilon"],
        "rope_theta": fields.get(f"{arch}.rope.freq_base", 10000.0),
        "max_position_embeddings": fields.get(f"{arch}.context_length", 2048),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": fields.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": fields.get("tokenizer.ggml.eos_token_id"),
        "attention_bias": False,
        "torch_dtype": "float32",
    }
    if arch == "llama":
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **config, "hidden_act": "silu",
                "mlp_bias": False}
    # What llama.cpp's Gemma 3 takes as given rather than reading from the file: five sliding
    # layers to a global one, a local RoPE base of 10,000, and the attention scale of
    # 1/sqrt(head_dim), but 1/sqrt(hidden / heads) for the 62-layer 27B.
    scalar = hidden // heads if config["num_hidden_layers"] == 62 else head_dim
    return {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", **config,
            "hidden_activation": "gelu_pytorch_tanh", "sliding_window": fields[f"{arch}.attention.sliding_window"],
            "sliding_window_pattern": 6, "rope_local_base_freq": 10000.0, "query_pre_attn_scalar": scalar,
            "final_logit_softcapping": None, "attn_logit_softcapping": None}


def convert_gguf(gguf_path: Path, cache_dir: Path | None = None) -> Path:
    """Hugging Face directory (config, fp32 safetensors, tokenizer) for `gguf_path`, cached."""
    import gguf
    from safetensors.numpy import save_file

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise ModelLoadError(f"GGUF file not found: {gguf_path}")
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out_dir = (cache_dir or default_cache_dir()) / "gguf" / f"{gguf_path.stem}-{key}"
    if (out_dir / "config.json").is_file():
        return out_dir
    if importlib.util.find_spec("torch") is None:  # else transformers fails at the end, naming one of its modules
        raise ModelLoadError(f"{gguf_path}: transformers reads a GGUF file's tokenizer with torch: pip install 'raysft[gguf]'")

    reader = gguf.GGUFReader(gguf_path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    config = _hf_config(fields, {t.name for t in reader.tensors})
    llama = config["model_type"] == "llama"
    tensors = {}
    for t in reader.tensors:
        weights = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        name = _hf_tensor_name(t.name, _LAYER_TENSORS if llama else _GEMMA3_LAYER_TENSORS)
        if llama and ".attn_q." in t.name:
            weights = _unpermute_rows(weights, config["num_attention_heads"])
        elif llama and ".attn_k." in t.name:
            weights = _unpermute_rows(weights, config["num_key_value_heads"])
        elif not llama and "norm.weight" in name:  # llama.cpp stores Gemma's norms as 1 + w
            weights = weights - 1.0
        tensors[name] = weights.reshape(tuple(reversed([int(d) for d in t.shape])))

    tmp_dir = out_dir.with_name(out_dir.name + ".tmp")
    tmp_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, tmp_dir / SINGLE_FILE, metadata={"format": "pt"})
    (tmp_dir / "config.json").write_text(json.dumps(config, indent=2))
    _save_tokenizer(gguf_path, tmp_dir)
    tmp_dir.rename(out_dir)  # atomic: a half-written conversion is never reused
    return out_dir


def _save_tokenizer(gguf_path: Path, out_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer.save_pretrained(out_dir)
