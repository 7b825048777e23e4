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

from raysft.data.locations import default_cache_dir
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
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _hf_tensor_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    _, layer, kind, suffix = gguf_name.split(".")
    return f"model.layers.{layer}.{_LAYER_TENSORS[kind]}.{suffix}"


def _unpermute_rows(w_OxI: np.ndarray, heads: int) -> np.ndarray:
    half_head = w_OxI.shape[0] // heads // 2
    return w_OxI.reshape(heads, half_head, 2, *w_OxI.shape[1:]).swapaxes(1, 2).reshape(w_OxI.shape)


def _hf_config(fields: dict, tensor_names: set[str]) -> dict:
    arch = fields["general.architecture"]
    if arch != "llama":
        raise ModelLoadError(f"GGUF architecture {arch!r} is not supported (llama)")
    heads = fields["llama.attention.head_count"]
    hidden = fields["llama.embedding_length"]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": fields.get("llama.vocab_size", len(fields["tokenizer.ggml.tokens"])),
        "hidden_size": hidden,
        "intermediate_size": fields["llama.feed_forward_length"],
        "num_hidden_layers": fields["llama.block_count"],
        "num_attention_heads": heads,
        "num_key_value_heads": fields.get("llama.attention.head_count_kv", heads),
        "head_dim": fields.get("llama.rope.dimension_count", hidden // heads),
        "rms_norm_eps": fields["llama.attention.layer_norm_rms_epsilon"],
        "rope_theta": fields.get("llama.rope.freq_base", 10000.0),
        "max_position_embeddings": fields.get("llama.context_length", 2048),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": fields.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": fields.get("tokenizer.ggml.eos_token_id"),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }


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
    tensors = {}
    for t in reader.tensors:
        weights = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        name = _hf_tensor_name(t.name)
        if ".attn_q." in t.name:
            weights = _unpermute_rows(weights, config["num_attention_heads"])
        elif ".attn_k." in t.name:
            weights = _unpermute_rows(weights, config["num_key_value_heads"])
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
