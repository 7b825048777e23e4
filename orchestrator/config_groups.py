"""The groups of fields `SFTConfig` (and `DPOConfig`) combine: each group's settings with
their defaults and descriptions, and what derives from a group alone (the data settings of
the prepared rows, the TPU slice)."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Literal

from etils import epath
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from raysft.data.settings import DataSettings
from raysft.orchestrator.tpu import TpuSlice
from raysft.storage.locations import location

DType = Literal["float32", "bfloat16"]


class Schedulers(str, enum.Enum):
    """Learning-rate shape after warmup (`rs.Schedulers.COSINE` or the string "cosine")."""

    NONE = "none"
    LINEAR = "linear"
    COSINE = "cosine"


class Optimizers(str, enum.Enum):
    """optax optimizers (`rs.Optimizers.ADAMW` or the string "adamw")."""

    ADAMW = "adamw"
    ADAFACTOR = "adafactor"
    LION = "lion"
    SGD = "sgd"
    RMSPROP = "rmsprop"


class UnfreezeSchedule(BaseModel):
    """The top `layers` decoder layers train from the start, `layers` more every
    `every_steps` steps (or `every_epochs` epochs), each with fresh optimizer state."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layers: int = Field(gt=0, description="Decoder layers unfrozen at each stage.")
    every_steps: int | None = Field(None, gt=0, description="Steps between stages.")
    every_epochs: int | None = Field(None, gt=0, description="Epochs between stages (at epoch boundaries).")

    @model_validator(mode="after")
    def _one_interval(self) -> "UnfreezeSchedule":
        if (self.every_steps is None) == (self.every_epochs is None):
            raise ValueError("unfreeze_schedule: set every_steps or every_epochs, one of them")
        return self


class RunFields(BaseModel):
    """Run identity: checkpoints, data and export live under save_directory/model_name."""

    model_name: str = Field("raysft", description="Run name; the run directory is save_directory/model_name.")
    save_directory: str = Field(
        "runs", description="Root directory of runs: a local directory, or on clusters s3://bucket/prefix, "
        "gs://bucket/prefix or a filesystem every host mounts at the same path."
    )

    @field_validator("model_name")
    @classmethod
    def _one_path_component(cls, name: str) -> str:
        """The run directory is save_directory/model_name, and nowhere else."""
        if not name or name in (".", "..") or any(sep in name for sep in ("/", "\\", "\0")) or ":" in name:
            raise ValueError(
                f"model_name {name!r} must name one directory inside save_directory: not empty, not '.' or '..', "
                "without '/', '\\' or ':'"
            )
        return name

    @property
    def run_dir(self) -> epath.Path:
        """save_directory/model_name: a local directory or an object-storage prefix."""
        return location(self.save_directory) / self.model_name


class DataFields(BaseModel):
    """What the rows hold: the format, masks, truncation and packing of the data (`data_settings`)."""

    dataset_text_field: str | None = Field(
        "text", description="Column holding the training text (or the messages); None: detect the format from the columns."
    )
    add_special_tokens: bool = Field(False, description="Let the tokenizer add its special tokens (BOS).")
    packing: bool = Field(False, description="Pack several documents per row (segment-aware).")
    packing_strategy: Literal["bfd", "wrapped"] = Field(
        "bfd", description="bfd: one best-fit-decreasing plan over the dataset; wrapped: concatenate and cut."
    )
    eval_packing: bool | None = Field(None, description="Pack the eval set (default: as packing).")
    num_of_sequences: int = Field(
        1024, gt=0, description="Seed compatibility (wrapped packing buffer); raysft packs the whole dataset at once."
    )
    chars_per_token: float = Field(3.6, gt=0, description="Seed compatibility (wrapped packing buffer size).")
    dataset_format: Literal["auto", "text", "instruction", "prompt_completion", "messages", "sharegpt", "tokenized"] = Field(
        "auto", description="Row format; auto detects it from the columns."
    )
    completion_only_loss: bool | None = Field(
        None, description="Prompt/completion rows: train only the completion (default on)."
    )
    assistant_only_loss: bool = Field(True, description="Conversations: train only the assistant turns.")
    chat_template_kwargs: dict = Field(
        default_factory=dict, description="Arguments the chat template reads, e.g. {\"enable_thinking\": false}."
    )
    train_on_inputs: bool = Field(False, description="Train on every token, prompts and user turns too.")
    truncation: Literal["truncate", "drop", "split", "drop_turns"] = Field(
        "truncate", description="Rows over max_sequence_length: keep the start, drop, split, or drop early turns."
    )
    mixture_stopping: Literal["first_exhausted", "all_exhausted"] = Field(
        "first_exhausted", description="A weighted train_dataset mixture ends when a source runs out, or when all are "
        "used once (smaller sources repeated)."
    )
    on_bad_rows: Literal["error", "skip"] = Field("error", description="A malformed row stops the run, or is skipped and counted.")
    dataset_split: str = Field("train", description="Split of a hub dataset_name.")
    data_dir: str | None = Field(None, description="data_dir of a hub dataset_name.")
    dataset_kwargs: dict = Field(default_factory=dict, description="More datasets.load_dataset arguments.")
    max_sequence_length: int = Field(2048, gt=1, description="Row length T in tokens.")
    dataset_num_proc: int | None = Field(None, gt=0, description="The most encoding tasks at once in Ray Data (default: as many as the cluster has CPUs, growing with it).")
    dataset_batch_size: int = Field(1000, gt=0, description="Rows per tokenization batch.")

    def data_settings(self, packing: bool) -> DataSettings:
        """What decides the tokens of the rows (and so the prepared store's fingerprint)."""
        return DataSettings(
            seq_len=self.max_sequence_length, text_field=self.dataset_text_field or "text",
            dataset_format=self.dataset_format, packing=packing, packing_strategy=self.packing_strategy,
            add_special_tokens=self.add_special_tokens, completion_only_loss=self.completion_only_loss,
            assistant_only_loss=self.assistant_only_loss, train_on_inputs=self.train_on_inputs,
            truncation=self.truncation, on_bad_rows=self.on_bad_rows, chat_template_kwargs=self.chat_template_kwargs or None,
        )


class OptimizerFields(BaseModel):
    """The optimizer, its schedule and the batch it steps on."""

    total_batch_size: int = Field(16, gt=0, description="Sequences per optimizer step, over all hosts.")
    gradient_accumulation_steps: int = Field(
        1, gt=0, description="Micro-batches per optimizer step, accumulated inside one jitted step."
    )
    num_train_epochs: int = Field(3, gt=0, description="Passes over the training rows.")
    max_training_steps: int | None = Field(None, gt=0, description="Stop after this many steps if sooner.")
    learning_rate: float = Field(2e-5, gt=0, description="Peak learning rate.")
    learning_rate_end: float | None = Field(
        None, ge=0, description="Final learning rate of the linear or cosine schedule (default 0)."
    )
    scheduler: Schedulers = Field(Schedulers.LINEAR, description="Learning-rate shape after warmup: none, linear, cosine.")
    warmup_steps: int = Field(0, ge=0, description="Steps of linear warmup from 0 to learning_rate.")
    warmup_ratio: float | None = Field(
        None, ge=0, lt=1, description="Warmup as a fraction of the total steps (instead of warmup_steps)."
    )
    optimizer: Optimizers = Field(Optimizers.ADAMW, description="adamw, adafactor, lion, sgd or rmsprop (optax).")
    weight_decay: float = Field(0.01, ge=0, description="Decoupled weight decay (never on norms or biases).")
    clip_grad: float | None = Field(1.0, gt=0, description="Clip gradients to this global norm.")
    seed: int = Field(42, description="Seed of the data order.")


class ModelFields(BaseModel):
    """How the model computes: precision, attention, rematerialisation, the loss and mixture-of-experts routing."""

    # Precision
    dtype: DType = Field("float32", description="Compute dtype.")
    param_dtype: DType = Field("float32", description="Parameter (and optimizer state) dtype.")
    export_dtype: DType = Field("float32", description="dtype of the exported safetensors.")

    # Model computation
    attn_mechanism: Literal["auto", "vanilla", "blocked", "dot_product", "splash"] = Field(
        "auto", description="Attention kernel: auto picks splash on TPU, cuDNN on GPU, blocked on CPU."
    )
    gradient_checkpointing: Literal[
        "none", "full", "nothing_saveable", "everything_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable"
    ] = Field("none", description="Rematerialisation policy of each decoder layer (jax.checkpoint).")
    scan_layers: bool = Field(
        False, description="Scan over stacked decoder layers: compile time flat in depth. Default: true on TPU "
        "(without unfreeze_schedule), false elsewhere."
    )
    loss_chunk_size: int | None = Field(
        1024, gt=0, description="Positions per cross-entropy chunk; full logits are never stored (None: no chunking)."
    )
    z_loss: float = Field(0.0, ge=0, description="Weight of the z-loss, z_loss * mean(log Z^2).")
    router_aux_loss_coef: float | None = Field(
        None, ge=0, description="Mixture-of-experts models: weight of the load-balancing loss (transformers' formula, "
        "over real tokens). None: the checkpoint's router_aux_loss_coef; 0 turns it off.",
    )
    router_z_loss_coef: float = Field(
        0.0, ge=0, description="Mixture-of-experts models: weight of the router z-loss, mean(logsumexp(router logits)^2).",
    )
    moe_capacity_factor: float | None = Field(
        None, gt=0, description="Mixture-of-experts models: None routes every token to its experts (dropless); a "
        "factor caps each expert at that many times its balanced share of a device's tokens and drops the overflow "
        "(fixed-shape buffers; the step reports expert_dropped_fraction).",
    )
    moe_expert_parallel: bool = Field(
        True, description="Mixture-of-experts models: True splits whole experts over fsdp (and sp) and sends each "
        "token to its experts' devices and back (an all-to-all each way, on the critical path); False splits the "
        "experts' weights like dense ones and all-gathers them layer by layer (ZeRO-3, prefetched), so tokens stay "
        "where they are. False wins where a device's tokens x k x hidden_size outweigh its share of a layer's "
        "experts, e.g. Qwen3-30B-A3B at 4 rows of 4096 per chip.",
    )


class LoraFields(BaseModel):
    """What trains: LoRA adapters (QLoRA on a quantized base), freezing and gradual unfreezing."""

    use_lora: bool = Field(False, description="Train LoRA adapters on a frozen base (exported merged, and as a PEFT adapter).")
    lora_rank: int = Field(16, gt=0, description="Rank r of the LoRA adapters.")
    lora_alpha: float = Field(32.0, gt=0, description="LoRA scale numerator: adapters add (lora_alpha / lora_rank) * x A B.")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapters' inputs while training.")
    lora_target_modules: str | list[str] = Field(
        "all-linear", description="Projections to adapt, as PEFT reads them: 'all-linear', a list of names "
        "(q_proj, v_proj, ...), or one regular expression over full module names.",
    )
    lora_init_from: str | None = Field(
        None, description="Start from this PEFT adapter directory (adapter_config.json + adapter_model.safetensors).",
    )
    quantize_base: Literal["int8", "nf4"] | None = Field(
        None, description="QLoRA: hold the frozen decoder-layer projections as int8 or nf4 codes with blockwise "
        "absmax scales, dequantized in the matmul (embeddings, norms and lm_head stay in param_dtype).",
    )
    quantization_block_size: int = Field(64, gt=0, description="Inputs per quantization scale (bitsandbytes' nf4: 64).")
    trainable_parameters: list[str] | None = Field(
        None, description="Regular expressions over Hugging Face parameter names: train only these (with LoRA: "
        "these as well as the adapters).",
    )
    frozen_parameters: list[str] | None = Field(
        None, description="Regular expressions over Hugging Face parameter names: never train these.",
    )
    unfreeze_schedule: UnfreezeSchedule | None = Field(
        None, description="Gradual unfreezing from the top decoder layers down: {layers: N, every_steps: K} or "
        "{layers: N, every_epochs: E}.",
    )

    @field_validator("lora_init_from")
    @classmethod
    def _absolute_adapter_path(cls, value: str | None) -> str | None:
        """Workers start elsewhere: a local adapter directory is named absolutely."""
        if value is None or "://" in value:
            return value
        return str(Path(value).expanduser().absolute())


class EvalFields(BaseModel):
    """Checkpoints, metrics, evals and the answers generated at them."""

    save_steps: int | None = Field(None, gt=0, description="Checkpoint every this many steps.")
    save_total_limit: int | None = Field(None, gt=0, description="Keep at most this many checkpoints.")
    do_last_save: bool = Field(True, description="Checkpoint the final step.")
    log_steps: int = Field(10, gt=0, description="Report metrics every this many steps.")
    eval_steps: int | None = Field(
        None, gt=0, description="Evaluate every this many steps (and always at each epoch end and the end)."
    )
    generate_during_eval: int = Field(
        0, ge=0, description="At every eval, answer this many eval conversations (their last answer removed; greedy "
        "unless generation_temperature > 0): printed, in report/generations.md and wandb, with eval_exact_match.",
    )
    generation_prompts: list[str] | None = Field(
        None, description="Prompts to answer at every eval instead of eval rows (chat template applied when the "
        "tokenizer has one); no reference, so no exact match.",
    )
    generation_max_new_tokens: int = Field(128, gt=0, description="Longest answer generated during eval.")
    generation_temperature: float = Field(0.0, ge=0, description="Sampling temperature of eval answers (0: greedy).")
    generation_top_k: int = Field(0, ge=0, description="Sample eval answers from the top k tokens (0: all).")
    generation_top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling of eval answers (1: off).")
    use_wandb: bool = Field(
        False, description="Log config, metrics and summary to Weights & Biases (offline when there is no API key)."
    )
    wandb_project: str = Field("raysft", description="wandb project of the run.")
    wandb_entity: str | None = Field(None, description="wandb entity (team or user); default: the key's own.")

    save_interval_minutes: float | None = Field(
        None, gt=0, description="Also checkpoint when this many minutes passed since the last save (checked every log step)."
    )


class ClusterFields(BaseModel):
    """Hosts, mesh, TPU slices and fault tolerance."""

    max_restarts: int = Field(
        3, ge=0, description="Restarts after failures (a crashed or lost host, a hang); config and data errors never restart."
    )
    max_preemption_restarts: int = Field(
        100, ge=0, description="Restarts after preemptions (a drained node, SIGTERM), counted apart from max_restarts."
    )
    allow_data_change: bool = Field(
        False, description="Resume a checkpoint although the prepared data changed (by default that is refused)."
    )
    step_timeout_s: float = Field(
        900.0, gt=0, description="A host that completes no step for this long is restarted instead of hanging."
    )
    startup_timeout_s: float = Field(
        1800.0, gt=0, description="Limit for joining jax.distributed, loading weights and compiling the first step."
    )
    data_on_tpu_hosts: bool = Field(
        False, description="Prepare data on TPU hosts too; by default only nodes that are not TPU hosts do it.",
    )
    data_timeout_s: float = Field(
        1800.0, gt=0, description="Data preparation that makes no progress for this long (a stuck read, no node with "
        "CPUs to encode on) stops with an error instead of waiting.",
    )

    # Hosts and mesh
    sharding_axis_dims: tuple[int, int, int, int] = Field(
        (1, -1, 1, 1),
        description="Mesh sizes (dp, fsdp, tp, sp) over all devices of all hosts (of each slice when num_slices > 1); "
        "-1 takes the rest.",
    )
    num_hosts: int = Field(1, gt=0, description="Worker processes, one per host (derived from the TPU slice when set).")
    backend: Literal["cpu", "gpu", "tpu"] = Field(
        "cpu", description="Accelerator the workers use: cpu, gpu (one each) or tpu (set by tpu_type)."
    )
    cpu_devices_per_host: int = Field(
        1,
        gt=0,
        description="JAX CPU devices per worker when backend is cpu. One is fastest: virtual devices share one "
        "XLA thread pool and add fsdp collectives (benchmarks/trainer_throughput.py); more test meshes on one machine.",
    )
    worker_resources: dict[str, float] | None = Field(
        None,
        description="Ray resources of each worker (default: 1 CPU, 1 GPU, or a TPU host's chips), "
        "e.g. {'CPU': 8} for one worker per 8-core node.",
    )
    tpu_type: str | None = Field(None, description="TPU slice type, e.g. v4-16, v5litepod-16, v6e-8 (sets backend tpu).")
    accelerator_type: str | None = Field(
        None, description="Instead of tpu_type: Ray's accelerator type, e.g. TPU-V4, with topology."
    )
    topology: str | None = Field(None, description="TPU topology with accelerator_type, e.g. 2x2x2.")
    num_slices: int = Field(1, gt=0, description="TPU slices; data parallel across slices over DCN.")
    plan_before_training: bool = Field(
        True,
        description="On TPU, first compile the train step for the slice on the driver (as raysft plan does) and stop "
        "at once if it cannot fit, before any slice is requested.",
    )

    @model_validator(mode="before")
    @classmethod
    def _tpu_sets_backend(cls, values):
        """`tpu_type` alone is enough to train on TPUs."""
        if isinstance(values, dict) and (values.get("tpu_type") or values.get("accelerator_type")):
            values = {"backend": "tpu", **values}
        return values

    @property
    def tpu_slice(self) -> TpuSlice | None:
        if self.backend != "tpu":
            return None
        return TpuSlice.resolve(self.tpu_type, self.accelerator_type, self.topology, self.num_slices)

    @property
    def hosts(self) -> int:
        """Worker processes: one per TPU host of every slice, else num_hosts."""
        tpu = self.tpu_slice
        return tpu.num_workers if tpu else self.num_hosts
