"""`AutoModelForCausalLM.from_pretrained`: a local directory, a GGUF file, a hub id or an
object-storage URI, as a handle that reads its weights only when they are used."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from raysft.storage.locations import location
from raysft.workers.models.config import ModelConfig, read_hf_config
from raysft.workers.models.export import save_pretrained, write_assets
from raysft.workers.models.loading import load_params, tensor_files
from raysft.workers.models.lora import LoraSettings
from raysft.workers.models.params import ParamLayout
from raysft.workers.models.runtime import ModelRuntime
from raysft.workers.models.source import ModelSource


def build_layout(
    cfg: ModelConfig, dtype, param_dtype, runtime: ModelRuntime = ModelRuntime(), lora: LoraSettings | None = None
) -> ParamLayout:
    module = cfg.family.module()
    return ParamLayout.of(
        lambda: module(cfg, dtype=dtype, param_dtype=param_dtype, runtime=runtime, lora=lora, rngs=nnx.Rngs(0)),
        cfg.window_per_layer,
    )


@dataclasses.dataclass
class CausalLM:
    """A model: call it for logits, hand it to `SFTTrainer`, or save it. Its weights are
    read onto the first device when first used (a call, `params`, `save_pretrained`):
    `SFTTrainer` never uses them, its workers read their own shards."""

    source: ModelSource
    model_dir: Path  # config and tokenizer here; the weights too once fetched
    config: ModelConfig
    hf_config: dict[str, Any]
    layout: ParamLayout
    dtype: Any
    param_dtype: Any

    @functools.cached_property
    def params(self) -> dict[str, jax.Array]:
        self.model_dir = self.source.fetch(weights=True)
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        params, _ = load_params(self.model_dir, self.layout, lambda name, shape: device)
        return params

    def __call__(self, input_ids, segment_ids=None, positions=None):
        """Logits [batch, T, vocab]."""
        return _forward(self.layout, self.params, jnp.asarray(input_ids), segment_ids, positions)

    def save_pretrained(self, out_dir: str | Path, dtype: str = "float32") -> None:
        """Hugging Face layout (in a local directory or under `s3://`/`gs://`): weights in
        `dtype` (float32 or bfloat16), config, generation config and the tokenizer files
        found next to the source weights."""
        save_pretrained(self.params, self.hf_config, location(out_dir), dtype=dtype)
        write_assets(location(out_dir), self.hf_config, self.model_dir)


@functools.partial(jax.jit, static_argnums=0)
def _forward(layout, params, input_ids, segment_ids, positions):
    return layout.bind(params)(input_ids, segment_ids, positions)


class AutoModelForCausalLM:
    @staticmethod
    def from_pretrained(
        name_or_path: str | Path,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        attn_mechanism: str = "auto",
        scan_layers: bool = False,
    ) -> CausalLM:
        """A Hugging Face directory, a `.gguf` file, a hub id or an `s3://`/`gs://` URI.
        Reads the config now (an unsupported model fails here) and the weights on first use."""
        source = ModelSource.parse(name_or_path)
        model_dir = source.fetch(weights=source.kind in ("local", "gguf"))
        if source.kind == "local":
            tensor_files(model_dir)  # a directory without weights fails here, not at first use
        hf_config = read_hf_config(model_dir / "config.json")
        cfg = ModelConfig.from_hf_dict(hf_config, source=str(model_dir / "config.json"))
        runtime = ModelRuntime(attn_mechanism=attn_mechanism, scan_layers=scan_layers)
        layout = build_layout(cfg, dtype, param_dtype, runtime)
        return CausalLM(source, model_dir, cfg, hf_config, layout, dtype, param_dtype)
