"""`DPOTrainer`: preference tuning on the SFT trainer's run, data, checkpoints, restarts and
reports. The rows are preference pairs (`data.pairs`), the objective
`workers.training.preference`; the reference model's log-probabilities are computed once on
the cluster before training and stored beside the prepared rows
(`workers.training.references`)."""

from __future__ import annotations

from raysft.orchestrator.dpo_config import DPOConfig
from raysft.orchestrator.trainer import SFTTrainer


class DPOTrainer(SFTTrainer):
    """`DPOTrainer(arguments=DPOConfig(...), model=..., train_dataset=..., eval_dataset=...,
    processing_class=...).train()`: as `SFTTrainer`, on preference rows."""

    def __init__(self, arguments: DPOConfig, *args, **kwargs):
        if not isinstance(arguments, DPOConfig):
            raise TypeError(f"DPOTrainer takes a DPOConfig, got {type(arguments).__name__}")
        if kwargs.get("formatting_func") is not None:
            raise ValueError("formatting_func makes text rows; preference rows need prompt, chosen and rejected")
        super().__init__(arguments, *args, **kwargs)
