"""`SFTConfig`: every setting of a run, with the seed's names, validated once here."""

from __future__ import annotations

import difflib
from pathlib import Path

import yaml
from pydantic import ConfigDict, model_validator

from raysft.orchestrator.config_groups import (
    ClusterFields, DataFields, EvalFields, LoraFields, ModelFields, OptimizerFields, RunFields, Schedulers,
)
from raysft.storage.locations import location
from raysft.workers.runtime.mesh import ShardingError, check_dims, resolve_dims


class SFTConfig(ClusterFields, EvalFields, LoraFields, ModelFields, OptimizerFields, DataFields, RunFields):
    """Every setting of a run: the groups of `config_groups` (pydantic lists the fields of the
    last base first: run, data, optimizer, model, LoRA, eval, cluster), and the checks
    between groups."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=True)

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, values):
        """An unknown key names the closest field, as a typo usually is one."""
        if isinstance(values, dict):
            names = set(cls.model_fields)
            for key in values:
                if key not in names:
                    close = difflib.get_close_matches(str(key), names, n=1)
                    hint = f"; did you mean {close[0]!r}?" if close else ""
                    raise ValueError(f"unknown field {key!r}{hint}")
        return values

    @model_validator(mode="before")
    @classmethod
    def _scan_on_tpu(cls, values):
        """TPU runs scan their layers unless told otherwise: the compile time of an unscanned
        step grows with depth (a 70B model's 80 layers ran past 10 minutes on a 2-core
        head, for `raysft plan` and again on every host)."""
        if isinstance(values, dict) and "scan_layers" not in values and not values.get("unfreeze_schedule"):
            if values.get("backend") == "tpu" or any(values.get(k) for k in ("tpu_type", "accelerator_type", "topology")):
                values = {**values, "scan_layers": True}
        return values

    @model_validator(mode="after")
    def _consistent(self) -> "SFTConfig":
        location(self.save_directory)  # an unknown URI scheme is refused, never a local folder "scheme:"
        if self.scheduler == Schedulers.NONE and self.learning_rate_end is not None:
            raise ValueError("learning_rate_end is set but scheduler is 'none'; use scheduler='linear' or 'cosine'")
        if self.warmup_ratio is not None and self.warmup_steps:
            raise ValueError("set warmup_steps or warmup_ratio, not both")
        if self.learning_rate_end is not None and self.learning_rate_end > self.learning_rate:
            raise ValueError(
                f"learning_rate_end {self.learning_rate_end} is above learning_rate {self.learning_rate}; "
                "the schedules decay towards it"
            )
        if self.backend == "tpu" or self.tpu_type or self.accelerator_type or self.topology:
            if self.backend != "tpu":
                raise ValueError(f"a TPU slice is set (tpu_type, accelerator_type or topology) but backend is {self.backend!r}; use backend='tpu'")
            tpu = self.tpu_slice  # a bad type or topology is a config error here
            if "num_hosts" in self.model_fields_set and self.num_hosts != tpu.num_workers:
                raise ValueError(
                    f"num_hosts {self.num_hosts} contradicts {tpu.num_slices} x {tpu.tpu_type}, which has "
                    f"{tpu.num_workers} hosts; leave num_hosts out"
                )
        elif self.num_slices != 1:
            raise ValueError("num_slices > 1 needs a TPU slice: set tpu_type")
        if self.unfreeze_schedule and self.scan_layers:
            raise ValueError(
                "unfreeze_schedule unfreezes decoder layers one by one, and scan_layers holds them all in one array; "
                "set scan_layers false"
            )
        lora_fields = {
            "lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_init_from", "quantize_base",
            "quantization_block_size",
        }
        if not self.use_lora and lora_fields & self.model_fields_set:
            raise ValueError(f"{', '.join(sorted(lora_fields & self.model_fields_set))} set but use_lora is false")
        check_dims(self.sharding_axis_dims)
        if self.backend == "cpu":  # the device count is known here: check the mesh now
            try:
                resolved = resolve_dims(self.sharding_axis_dims, self.num_hosts * self.cpu_devices_per_host)
            except ShardingError as err:
                raise ValueError(
                    f"{err} (num_hosts {self.num_hosts} x cpu_devices_per_host {self.cpu_devices_per_host})"
                ) from None
            rows = resolved[0] * resolved[1] * self.gradient_accumulation_steps
            if self.total_batch_size % rows:
                raise ValueError(
                    f"total_batch_size {self.total_batch_size} must be a multiple of {rows}: the "
                    f"{resolved[0] * resolved[1]} data-parallel devices (dp x fsdp) x gradient_accumulation_steps "
                    f"{self.gradient_accumulation_steps}"
                )
        return self

    @property
    def preference(self) -> dict | None:
        """The preference objective's settings (`DPOConfig`); None: SFT."""
        return None

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> "SFTConfig":
        return cls(**{**read_yaml(path), **overrides})


def read_yaml(path: str | Path) -> dict:
    """The mapping in a YAML config file; a missing or malformed file is one clear line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file not found: {path}")
    try:
        with path.open() as file:
            values = yaml.safe_load(file) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of config fields")
    return values
