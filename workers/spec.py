"""What a worker is asked to do: plain values, so training never knows how it was started."""

from __future__ import annotations

import dataclasses
from typing import Any


# Paths and handles the driver derives for this run; every other field is a config value.
_RUN_FIELDS = {
    "model", "tokenizer_dir", "train_store", "eval_stores", "checkpoint_dir",
    "export_dir", "adapter_dir", "summary_file", "metrics_queue", "storage_marker", "eval_prompts",
}


_TRAJECTORY_FIELDS = (
    "total_batch_size", "num_train_epochs", "max_training_steps", "learning_rate", "learning_rate_end",
    "scheduler", "warmup_steps", "warmup_ratio", "optimizer", "weight_decay", "clip_grad", "seed", "dtype",
    "param_dtype", "z_loss", "router_aux_loss_coef", "router_z_loss_coef", "moe_capacity_factor",
    "use_lora", "lora_rank", "lora_alpha",
    "lora_dropout", "lora_target_modules",
    "lora_init_from", "quantize_base", "quantization_block_size", "trainable_parameters", "frozen_parameters",
    "unfreeze_schedule", "preference",
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainSpec:
    model: str  # a `ModelSource`, pinned: each host fetches the model itself
    # What a training run reads and writes; an export, a generation server or a plan
    # gives only what it uses.
    tokenizer_dir: str = ""
    train_store: str | None = None
    eval_stores: dict[str, str] | None = None  # name ("" for an unnamed eval_dataset) -> store
    checkpoint_dir: str = ""
    export_dir: str = ""
    summary_file: str | None = None
    backend: str  # cpu | gpu | tpu
    cpu_devices_per_host: int
    sharding_axis_dims: tuple[int, int, int, int]
    num_slices: int
    dtype: str
    param_dtype: str
    export_dtype: str
    max_sequence_length: int
    attn_mechanism: str
    gradient_checkpointing: str
    scan_layers: bool
    loss_chunk_size: int | None
    z_loss: float
    router_aux_loss_coef: float | None
    router_z_loss_coef: float
    moe_capacity_factor: float | None
    moe_expert_parallel: bool
    total_batch_size: int
    gradient_accumulation_steps: int
    num_train_epochs: int
    max_training_steps: int | None
    learning_rate: float
    learning_rate_end: float | None
    scheduler: str
    warmup_steps: int
    warmup_ratio: float | None
    optimizer: str
    weight_decay: float
    clip_grad: float | None
    seed: int
    log_steps: int
    eval_steps: int | None
    save_steps: int | None
    save_total_limit: int | None
    do_last_save: bool
    save_interval_minutes: float | None
    allow_data_change: bool
    step_timeout_s: float
    startup_timeout_s: float
    chat_template_kwargs: dict
    add_special_tokens: bool
    generation_max_new_tokens: int
    generation_temperature: float
    generation_top_k: int
    generation_top_p: float
    use_lora: bool = False
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_target_modules: str | list[str] = "all-linear"
    lora_init_from: str | None = None
    quantize_base: str | None = None  # QLoRA: "int8" or "nf4"
    quantization_block_size: int = 64
    trainable_parameters: list[str] | None = None
    frozen_parameters: list[str] | None = None
    unfreeze_schedule: dict | None = None  # {"layers": N, "every_steps": K} or {"layers": N, "every_epochs": E}
    adapter_dir: str | None = None  # with LoRA: the PEFT adapter directory written at the end
    eval_prompts: list[dict] | None = None  # answered at every eval (`workers.generation.text_generation` prompts)
    metrics_queue: Any = None  # a ray.util.queue.Queue, or None
    storage_marker: tuple[str, str] | None = None  # (path, token) the driver wrote into the run directory
    # A preference run's objective (`workers.training.preference.PreferenceSettings` as a
    # dict, the config's `preference`); None trains SFT.
    preference: dict | None = None

    @classmethod
    def config_fields(cls) -> list[str]:
        """Fields taken as they are from `SFTConfig` fields of the same name."""
        return [f.name for f in dataclasses.fields(cls) if f.name not in _RUN_FIELDS]

    @classmethod
    def from_config(cls, config: Any, **run_fields: Any) -> "TrainSpec":
        """The spec every worker program starts from (training, export, generation, plan):
        the config's fields of the same names, plus the paths and handles given."""
        values = {name: getattr(config, name) for name in cls.config_fields()}
        # Nested settings travel as plain dicts: workers never import the driver's config.
        values = {k: v.model_dump() if hasattr(v, "model_dump") else v for k, v in values.items()}
        return cls(**run_fields, **values)

    def as_dict(self) -> dict[str, Any]:
        """Shallow, so the queue handle travels as itself."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def trajectory(self) -> dict[str, Any]:
        """The settings a resumed run must share with its checkpoint to continue the same
        run (checkpoints record them and a resume names any that changed)."""
        return {name: getattr(self, name) for name in _TRAJECTORY_FIELDS}

    def total_steps(self, steps_per_epoch: int) -> int:
        steps = steps_per_epoch * self.num_train_epochs
        return min(steps, self.max_training_steps) if self.max_training_steps else steps
