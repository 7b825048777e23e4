"""`AutoModelForCausalLM.from_pretrained`: a local directory, a GGUF file or a hub id."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from raysft.workers.models.config import ModelConfig, ModelLoadError, read_hf_config
from raysft.workers.models.export import save_pretrained, write_assets
from raysft.workers.models.gguf_import import convert_gguf
from raysft.workers.models.llama import LlamaForCausalLM
from raysft.workers.models.loading import load_params
from raysft.workers.models.params import ParamLayout
from raysft.workers.models.runtime import ModelRuntime

_HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]


def _looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))


def resolve_model_dir(name_or_path: str | Path, config_only: bool = False) -> Path:
    """Local Hugging Face directory for a directory, a `.gguf` file or a hub repo id;
    absolute, since workers run in other directories than the driver. `config_only`:
    a `config.json` is all that is needed (no weights are fetched from the hub)."""
    path = Path(name_or_path).expanduser().absolute()
    if path.suffix == ".gguf":
        return convert_gguf(path)
    if config_only and path.name == "config.json" and path.is_file():
        return path.parent
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model directory {path} has no config.json")
        return path
    if path.exists():
        raise ModelLoadError(f"model path {path} is neither a directory nor a .gguf file")
    if _looks_like_repo_id(str(name_or_path)):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        try:
            patterns = ["config.json"] if config_only else _HUB_FILES
            return Path(snapshot_download(str(name_or_path), allow_patterns=patterns))
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as err:
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ModelLoadError(
                f"model {name_or_path!r} is not a local directory and the hub download failed: {first_line}"
            ) from None
    raise ModelLoadError(f"model directory not found: {path}")


def build_layout(cfg: ModelConfig, dtype, param_dtype, runtime: ModelRuntime = ModelRuntime()) -> ParamLayout:
    return ParamLayout.of(
        lambda: LlamaForCausalLM(cfg, dtype=dtype, param_dtype=param_dtype, runtime=runtime, rngs=nnx.Rngs(0))
    )


@dataclasses.dataclass
class CausalLM:
    """A loaded model: call it for logits, hand it to `SFTTrainer`, or save it."""

    model_dir: Path
    config: ModelConfig
    hf_config: dict[str, Any]
    layout: ParamLayout
    params: dict[str, jax.Array]
    dtype: Any
    param_dtype: Any

    def __call__(self, input_ids, segment_ids=None, positions=None):
        """Logits [batch, T, vocab]."""
        return _forward(self.layout, self.params, jnp.asarray(input_ids), segment_ids, positions)

    def save_pretrained(self, out_dir: str | Path, dtype: str = "float32") -> None:
        """Hugging Face layout: weights in `dtype` (float32 or bfloat16), config, generation
        config and the tokenizer files found next to the source weights."""
        save_pretrained(self.params, self.hf_config, Path(out_dir), dtype=dtype)
        write_assets(Path(out_dir), self.hf_config, self.model_dir)


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
        """A Hugging Face directory, a `.gguf` file or a hub repo id, on the first device."""
        model_dir = resolve_model_dir(name_or_path)
        hf_config = read_hf_config(model_dir / "config.json")
        cfg = ModelConfig.from_hf_dict(hf_config, source=str(model_dir / "config.json"))
        runtime = ModelRuntime(attn_mechanism=attn_mechanism, scan_layers=scan_layers)
        layout = build_layout(cfg, dtype, param_dtype, runtime)
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        params, _ = load_params(model_dir, layout, lambda name, shape: device)
        return CausalLM(model_dir, cfg, hf_config, layout, params, dtype, param_dtype)
