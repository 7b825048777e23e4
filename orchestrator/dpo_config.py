"""`DPOConfig`: a preference-tuning run's settings (DPO and its loss types, SimPO, ORPO),
`SFTConfig`'s and the preference ones, with TRL's and EasyDeL's names."""

from __future__ import annotations

import dataclasses
from typing import Literal

from pydantic import Field, field_validator, model_validator

from raysft.data.settings import DataSettings
from raysft.orchestrator.config import SFTConfig


class DPOConfig(SFTConfig):
    """Every `SFTConfig` field with the same meaning, and the preference ones. A row holds
    whole pairs, each sequence at most `max_length` tokens: `max_sequence_length` (the row
    length) is 2 x max_length."""

    beta: float = Field(0.1, gt=0, description="DPO's beta: how far the policy may move from the reference (IPO's "
                        "tau; SimPO's and ORPO's beta).")
    loss_type: Literal["sigmoid", "hinge", "ipo", "simpo", "orpo"] = Field(
        "sigmoid", description="sigmoid (DPO), hinge (SLiC), ipo; simpo and orpo need no reference model."
    )
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="cDPO's probability that a pair's preference is "
                                   "flipped (sigmoid and simpo).")
    simpo_gamma: float = Field(0.5, description="SimPO's target reward margin gamma.")
    reference_free: bool = Field(False, description="DPO against a uniform reference (log-probabilities 0).")
    max_length: int = Field(1024, gt=1, description="Most tokens of one sequence (prompt and completion), TRL's "
                            "keep_start truncation; a pair whose prompt alone reaches it is dropped and counted.")
    max_prompt_length: int | None = Field(None, gt=0, description="Keep the last this many tokens of a prompt.")
    max_completion_length: int | None = Field(None, gt=0, description="Keep the first this many tokens of a "
                                              "completion.")
    precompute_ref_log_probs: bool = Field(
        True, description="The reference's log-probabilities are always computed once before training (no second "
        "model in device memory); false is refused."
    )
    packing: bool = Field(True, description="Pack several pairs per row (segment-aware); false: one pair per row.")
    learning_rate: float = Field(1e-6, gt=0, description="Peak learning rate (TRL's DPO default).")
    dataset_format: Literal["preference"] = Field(
        "preference", description="prompt/chosen/rejected rows (strings or messages), or chosen/rejected alone "
        "(an implicit prompt)."
    )

    @model_validator(mode="before")
    @classmethod
    def _row_length(cls, values):
        """A row holds a pair's two sequences: 2 x max_length, unless set to hold more."""
        if isinstance(values, dict) and "max_sequence_length" not in values:
            max_length = values.get("max_length", cls.model_fields["max_length"].default)
            if isinstance(max_length, (int, str)) and str(max_length).isdigit():  # else max_length's own error
                values = {**values, "max_sequence_length": 2 * int(max_length)}
        return values

    @field_validator("precompute_ref_log_probs")
    @classmethod
    def _precomputed(cls, value: bool) -> bool:
        if not value:
            raise ValueError("raysft always precomputes the reference log-probabilities (a sharded pass before "
                             "training, stored beside the rows), so no reference model shares device memory with "
                             "training; leave precompute_ref_log_probs true")
        return value

    @model_validator(mode="after")
    def _pairs_fit(self) -> "DPOConfig":
        if self.max_sequence_length < 2 * self.max_length:
            raise ValueError(f"max_sequence_length {self.max_sequence_length} is under 2 x max_length "
                             f"{self.max_length}: a row must hold a pair's two sequences")
        if self.generate_during_eval:
            raise ValueError("generate_during_eval answers eval conversations; preference rows have two answers: set "
                             "generation_prompts to watch answers change")
        if self.packing_strategy == "wrapped":
            raise ValueError("packing_strategy 'wrapped' would cut pairs; preference rows pack pairs whole ('bfd')")
        return self

    @property
    def preference(self) -> dict:
        from raysft.workers.training.preference import PreferenceSettings  # JAX: not for `raysft --help`

        return dataclasses.asdict(PreferenceSettings(self.loss_type, self.beta, self.label_smoothing, self.simpo_gamma,
                                                     self.reference_free))

    def data_settings(self, packing: bool) -> DataSettings:
        settings = super().data_settings(packing)
        return dataclasses.replace(settings, max_length=self.max_length, max_prompt_length=self.max_prompt_length,
                                   max_completion_length=self.max_completion_length)
