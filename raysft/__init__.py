"""raysft: supervised fine-tuning of Llama-family models on JAX, orchestrated by Ray.

    import raysft as rs
    rs.SFTTrainer(arguments=rs.SFTConfig(...), model=..., train_dataset=...).train()
"""

from pathlib import Path as _Path

# In a checkout (`ray job submit --working-dir .` on nodes without raysft installed) the
# subpackages sit next to this folder, as pyproject's package-dir maps them.
_checkout = _Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "orchestrator" / "__init__.py").is_file():
    __path__.append(str(_checkout))

from raysft.orchestrator.config import Optimizers, Schedulers, SFTConfig  # noqa: E402
from raysft.orchestrator.export import ExportFailed, export_checkpoint  # noqa: E402
from raysft.orchestrator.plan import DoesNotFit, Plan, plan  # noqa: E402
from raysft.orchestrator.trainer import SFTTrainer, TrainingFailed, TrainOutput  # noqa: E402
from raysft.workers.models.auto import AutoModelForCausalLM, CausalLM  # noqa: E402

__all__ = [
    "AutoModelForCausalLM", "CausalLM", "DoesNotFit", "ExportFailed", "Optimizers", "Plan", "Schedulers", "SFTConfig",
    "SFTTrainer", "TrainOutput", "TrainingFailed", "export_checkpoint", "plan",
]
