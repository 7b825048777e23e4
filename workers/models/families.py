"""The model families raysft trains: one entry per family, everything that differs
between families in one place.

An entry names the Hugging Face `architectures` it reads, how its `config.json` sets
`ModelConfig`'s switches, the module that computes it, which of its projections tensor
parallelism splits by column or by row, and the projections LoRA may adapt
(`all-linear`). Loading, export, sharding, LoRA, FLOPs and generation ask the registry;
none of them names an architecture.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# A sparse layer's experts, as LoRA targets: each projection of every expert (a LoRA
# `experts.gate_proj` gives each expert its own A and B). Not in "all-linear": PEFT's
# "all-linear" takes Linear modules, and transformers holds experts as 3-D parameters.
EXPERT_PROJECTIONS = tuple(f"experts.{name}" for name in MLP_PROJECTIONS)


@dataclasses.dataclass(frozen=True)
class ExpertTensors:
    """Where a checkpoint keeps a sparse layer's router and experts: under `block` of each
    layer, the router as `{block}.gate.weight` [E, D] and expert e's projections as
    `{block}.experts.{e}.{name}.weight` (torch's [out, in]); `names` maps each of ours
    (gate_proj, up_proj, down_proj) to the checkpoint's. A checkpoint may instead hold
    transformers 5's fused tensors, `mlp.experts.gate_up_proj` [E, 2F, D] and
    `mlp.experts.down_proj` [E, D, F]; loading reads either."""

    block: str = "mlp"
    names: tuple[tuple[str, str], ...] = tuple((name, name) for name in MLP_PROJECTIONS)


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    architectures: tuple[str, ...]
    # `ModelConfig` fields this family sets from a `config.json` (architecture, hf dict,
    # number of layers), with transformers' defaults.
    switches: Callable[[str, dict[str, Any], int], dict[str, Any]]
    # The NNX module: (config, dtype=, param_dtype=, runtime=, lora=, rngs=) -> model.
    module: Callable[[], type]
    # Tensor parallelism: projections whose outputs split over `tp` (column) and whose
    # inputs do (row); their names are the decoder layer's, as Hugging Face's.
    column: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head")
    row: tuple[str, ...] = ("o_proj", "down_proj")
    # The decoder-layer projections LoRA may adapt, in PEFT's order (`all-linear`).
    lora_targets: tuple[str, ...] = ATTENTION_PROJECTIONS + MLP_PROJECTIONS
    # transformers' default when a config.json leaves `tie_word_embeddings` out.
    tied_by_default: bool = False
    # Projections the Hugging Face checkpoint stores fused, in a decoder layer:
    # (fused name, the names it concatenates along the output), split on load, fused on export.
    fused: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # Multimodal architectures whose language model raysft trains: architecture ->
    # (the text-only architecture, the prefix of its tensors in the checkpoint, and where
    # transformers' model holds the text model's modules, PEFT's names, for `model.`).
    language_models: tuple[tuple[str, tuple[str, str, str]], ...] = ()
    # Mixture-of-experts families: how the checkpoint names the router and experts.
    experts: ExpertTensors | None = None

    def language_model(self, architecture: str, hf: dict[str, Any]) -> tuple[dict[str, Any], str, str]:
        """The config of the language model a checkpoint holds, as its text-only
        architecture has it, its tensors' prefix ("" for a text-only checkpoint) and
        its modules' root in transformers' model (`model.` for a text-only one)."""
        if architecture not in dict(self.language_models):
            return hf, "", "model."
        text_architecture, prefix, root = dict(self.language_models)[architecture]
        import transformers  # its config class fills what the checkpoint's text_config leaves to defaults

        text_class = getattr(transformers, text_architecture).config_class
        text = text_class(**(hf.get("text_config") or {})).to_dict()
        return {**text, "architectures": [text_architecture]}, prefix, root

    def checkpoint_projection(self, projection: str) -> str:
        """The name the checkpoint (and PEFT) gives the module holding `projection`:
        `qkv_proj` for Phi-3's `q_proj`; the projection's own name elsewhere."""
        for fused, parts in self.fused:
            if projection in parts:
                return fused.rsplit(".", 1)[1]
        return projection

    def parts(self, checkpoint_projection: str) -> tuple[str, ...]:
        """The projections a checkpoint module holds (inverse of `checkpoint_projection`)."""
        for fused, parts in self.fused:
            if fused.rsplit(".", 1)[1] == checkpoint_projection:
                return parts
        return (checkpoint_projection,)

    def module_path(self, checkpoint_projection: str) -> str:
        """`self_attn.qkv_proj`, `mlp.down_proj`: where a layer holds a checkpoint module."""
        parts = self.parts(checkpoint_projection)
        return f"{'self_attn' if parts[0] in ATTENTION_PROJECTIONS else 'mlp'}.{checkpoint_projection}"


def _llama_module():
    from raysft.workers.models.llama import LlamaForCausalLM

    return LlamaForCausalLM


def _llama_switches(architecture: str, hf: dict[str, Any], layers: int) -> dict[str, Any]:
    """Llama, Mistral, Qwen2 and Qwen3 are one decoder with a few switches (projection
    biases, q/k norms, sliding windows)."""
    if architecture == "LlamaForCausalLM":
        bias = bool(hf.get("attention_bias", False))
        return dict(qkv_bias=bias, o_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False)))
    if architecture == "MistralForCausalLM":
        window = hf.get("sliding_window")
        return dict(sliding_windows=(window,) * layers if window else ())
    # Qwen2 and Qwen3 window only layers from `max_window_layers` on, and only when asked.
    window = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None
    layer_types = hf.get("layer_types") or [
        "sliding_attention" if window and i >= hf.get("max_window_layers", 28) else "full_attention"
        for i in range(layers)
    ]
    windows = tuple(window if kind == "sliding_attention" else None for kind in layer_types)
    windows = windows if any(windows) else ()
    if architecture == "Qwen2ForCausalLM":
        return dict(qkv_bias=True, sliding_windows=windows)
    bias = bool(hf.get("attention_bias", False))
    return dict(qkv_bias=bias, o_bias=bias, qk_norm=True, sliding_windows=windows)


def _gemma_module():
    from raysft.workers.models.gemma import GemmaForCausalLM

    return GemmaForCausalLM


def _gemma_switches(architecture: str, hf: dict[str, Any], layers: int) -> dict[str, Any]:
    """Gemma 2 alternates sliding and global layers and soft-caps attention and final
    logits; Gemma 3 has five sliding layers to a global one, q/k norms, a local RoPE base
    and no attention cap (transformers ignores its `attn_logit_softcapping`). Both:
    (1 + w) norms, sqrt(hidden)-scaled embeddings, GeGLU."""
    if hf.get("use_bidirectional_attention"):
        raise ValueError("bidirectional Gemma (an embedding model) is not a causal LM raysft trains")
    gemma2 = architecture == "Gemma2ForCausalLM"
    pattern = 2 if gemma2 else hf.get("sliding_window_pattern", 6)
    layer_types = hf.get("layer_types") or [
        "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)
    ]
    window = hf.get("sliding_window")
    windows = tuple(window if kind == "sliding_attention" else None for kind in layer_types) if window else ()
    bias = bool(hf.get("attention_bias", False))
    switches = dict(
        qkv_bias=bias, o_bias=bias, sliding_windows=windows, norm_unit_offset=True, scale_embeddings=True,
        hidden_activation=hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh",
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
        attn_logit_softcapping=hf.get("attn_logit_softcapping", 50.0) if gemma2 else None,
        final_logit_softcapping=hf.get("final_logit_softcapping", 30.0 if gemma2 else None),
    )
    if not gemma2:  # transformers 5 keeps the local base with the sliding layers' RoPE
        local = (hf.get("rope_parameters") or {}).get("sliding_attention") or {}
        local_theta = local.get("rope_theta", hf.get("rope_local_base_freq", 10_000.0))
        switches.update(qk_norm=True, rope_local_theta=local_theta)
    return switches


def _phi3_switches(architecture: str, hf: dict[str, Any], layers: int) -> dict[str, Any]:
    """Phi-3/Phi-4: Llama's layer with fused projections in the checkpoint; a window on
    every layer where the config sets one."""
    window = hf.get("sliding_window")
    return dict(sliding_windows=(window,) * layers if window else (), hidden_activation=hf.get("hidden_act", "silu"))


def _moe_module():
    from raysft.workers.models.moe import MoeForCausalLM

    return MoeForCausalLM


def _moe_switches(architecture: str, hf: dict[str, Any], layers: int) -> dict[str, Any]:
    """Qwen3-MoE: Qwen3's attention (q/k norms), experts in the layers that neither
    `mlp_only_layers` nor `decoder_sparse_step` keep dense, top-k optionally renormalised.
    Mixtral: Mistral's attention, every layer sparse, the top-k always renormalised."""
    window = hf.get("sliding_window")
    if architecture == "Qwen3MoeForCausalLM":
        window = window if hf.get("use_sliding_window", False) else None
        dense, step = set(hf.get("mlp_only_layers") or ()), hf.get("decoder_sparse_step", 1)
        bias = bool(hf.get("attention_bias", False))
        switches = dict(
            qkv_bias=bias, o_bias=bias, qk_norm=True, norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            moe_intermediate_size=hf["moe_intermediate_size"],
            sparse_layers=tuple(i not in dense and (i + 1) % step == 0 for i in range(layers)),
        )
    else:
        switches = dict(
            norm_topk_prob=True, moe_intermediate_size=hf["intermediate_size"], sparse_layers=(True,) * layers,
        )
    # transformers 5 writes Qwen3-MoE's `num_experts` as `num_local_experts`, Mixtral's name.
    experts = hf.get("num_experts", hf.get("num_local_experts"))
    if experts is None:
        raise KeyError("num_experts")
    return dict(
        switches, sliding_windows=(window,) * layers if window else (), num_experts=experts,
        num_experts_per_tok=hf["num_experts_per_tok"], router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.001),
        hidden_activation=hf.get("hidden_act", "silu"),
    )


FAMILIES = (
    Family(
        name="llama",
        architectures=("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"),
        switches=_llama_switches,
        module=_llama_module,
    ),
    Family(
        name="gemma",
        architectures=("Gemma2ForCausalLM", "Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"),
        switches=_gemma_switches,
        module=_gemma_module,
        tied_by_default=True,
        # Gemma 3 4B, 12B and 27B ship with their vision tower: raysft trains the text model.
        language_models=(
            ("Gemma3ForConditionalGeneration", ("Gemma3ForCausalLM", "language_model.", "model.language_model.")),
        ),
    ),
    Family(
        name="phi3",
        architectures=("Phi3ForCausalLM",),
        switches=_phi3_switches,
        module=_llama_module,
        fused=(("self_attn.qkv_proj", ("q_proj", "k_proj", "v_proj")), ("mlp.gate_up_proj", ("gate_proj", "up_proj"))),
    ),
    Family(
        name="qwen3_moe",
        architectures=("Qwen3MoeForCausalLM",),
        switches=_moe_switches,
        module=_moe_module,
        lora_targets=ATTENTION_PROJECTIONS + EXPERT_PROJECTIONS,
        experts=ExpertTensors(),
    ),
    Family(
        name="mixtral",
        architectures=("MixtralForCausalLM",),
        switches=_moe_switches,
        module=_moe_module,
        lora_targets=ATTENTION_PROJECTIONS + EXPERT_PROJECTIONS,
        experts=ExpertTensors("block_sparse_moe", (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2"))),
    ),
)
_BY_ARCHITECTURE = {architecture: family for family in FAMILIES for architecture in family.architectures}
SUPPORTED_ARCHITECTURES = tuple(_BY_ARCHITECTURE)
# What every family splits by column or by row: the mesh's rules go by projection name.
COLUMN_PROJECTIONS = tuple(dict.fromkeys(name for family in FAMILIES for name in family.column))
ROW_PROJECTIONS = tuple(dict.fromkeys(name for family in FAMILIES for name in family.row))


def family_of(architecture: str) -> Family | None:
    return _BY_ARCHITECTURE.get(architecture)
