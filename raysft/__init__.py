"""raysft: supervised and preference fine-tuning of dense and mixture-of-experts language models on JAX,
orchestrated by Ray.

    import raysft as rs
    rs.SFTTrainer(arguments=rs.SFTConfig(...), model=..., train_dataset=...).train()
    rs.DPOTrainer(arguments=rs.DPOConfig(...), model=..., train_dataset=pairs).train()
"""

from pathlib import Path as _Path

# In a checkout (`ray job submit --working-dir .` on nodes without raysft installed) the
# subpackages sit next to this folder, as pyproject's package-dir maps them.
_checkout = _Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "orchestrator" / "__init__.py").is_file():
    __path__.append(str(_checkout))

# The public names load on first use, so a Ray task or actor that imports one data module
# (tokenizing, reading, writing rows) does not pay for JAX, Flax and the models.
_EXPORTS = {
    "Optimizers": "raysft.orchestrator.config_groups", "Schedulers": "raysft.orchestrator.config_groups",
    "SFTConfig": "raysft.orchestrator.config", "ExportFailed": "raysft.orchestrator.export",
    "export_checkpoint": "raysft.orchestrator.export", "DoesNotFit": "raysft.orchestrator.plan",
    "Plan": "raysft.orchestrator.plan", "plan": "raysft.orchestrator.plan", "SFTTrainer": "raysft.orchestrator.trainer",
    "TrainingFailed": "raysft.orchestrator.trainer", "TrainOutput": "raysft.orchestrator.trainer",
    "AutoModelForCausalLM": "raysft.workers.models.auto", "CausalLM": "raysft.workers.models.auto",
    "DPOConfig": "raysft.orchestrator.dpo_config", "DPOTrainer": "raysft.orchestrator.dpo",
}
# EasyDeL's names for the same things, so code written for it runs with `import raysft as ed`.
_ALIASES = {
    "AutoEasyDeLModelForCausalLM": "AutoModelForCausalLM", "EasyDeLOptimizers": "Optimizers",
    "EasyDeLSchedulers": "Schedulers",
}
__all__ = sorted([*_EXPORTS, *_ALIASES])


def __getattr__(name: str):
    target = _ALIASES.get(name, name)
    if target not in _EXPORTS:
        raise AttributeError(f"module 'raysft' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_EXPORTS[target]), target)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
