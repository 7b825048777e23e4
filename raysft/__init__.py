"""raysft: supervised fine-tuning of Llama-family models on JAX, orchestrated by Ray.

    import raysft as rs
    rs.SFTTrainer(arguments=rs.SFTConfig(...), model=..., train_dataset=...).train()
"""

from raysft.orchestrator.config import Optimizers, Schedulers, SFTConfig
from raysft.orchestrator.export import ExportFailed, export_checkpoint
from raysft.orchestrator.trainer import SFTTrainer, TrainingFailed, TrainOutput
from raysft.workers.models.auto import AutoModelForCausalLM, CausalLM

__all__ = [
    "AutoModelForCausalLM", "CausalLM", "ExportFailed", "Optimizers", "Schedulers", "SFTConfig", "SFTTrainer",
    "TrainOutput", "TrainingFailed", "export_checkpoint",
]
