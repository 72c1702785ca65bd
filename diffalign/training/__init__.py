"""The method-agnostic training loop and its configuration."""

from diffalign.training.config import DataConfig, LoraSettings, ModelConfig, OptimConfig, TrainConfig
from diffalign.training.loop import Method, Stateful, TrainResult, run_training

__all__ = [
    "DataConfig",
    "LoraSettings",
    "Method",
    "ModelConfig",
    "OptimConfig",
    "Stateful",
    "TrainConfig",
    "TrainResult",
    "run_training",
]
