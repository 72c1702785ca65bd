"""The Python API: ``diffalign.train(config)``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from diffalign.config import load_config
from diffalign.training.config import TrainConfig
from diffalign.training.loop import Callback, TrainResult, run_training


def train(
    config: TrainConfig | str | Path, overrides: Sequence[str] = (), callbacks: Sequence[Callback] = ()
) -> TrainResult:
    """Train with a config (a ``TrainConfig`` or a YAML path plus ``key=value`` overrides); returns
    the output directory, the final logged metrics and the step reached. ``callbacks``: functions
    of (step, metrics) called at every log."""
    from diffalign.methods import get_method

    cfg = config if isinstance(config, TrainConfig) else load_config(TrainConfig, config, overrides)
    return run_training(get_method(cfg.method)(cfg), callbacks)
