"""raysft: supervised fine-tuning of Llama-family models on JAX, orchestrated by Ray.

    import raysft as rs
    rs.SFTTrainer(arguments=rs.SFTConfig(...), model=..., train_dataset=...).train()
"""

from raysft.orchestrator.config import SFTConfig
from raysft.orchestrator.trainer import SFTTrainer, TrainingFailed, TrainOutput
from raysft.workers.models.auto import AutoModelForCausalLM, CausalLM

__all__ = ["AutoModelForCausalLM", "CausalLM", "SFTConfig", "SFTTrainer", "TrainOutput", "TrainingFailed"]
