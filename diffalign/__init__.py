"""diffalign: align diffusion models (and causal LMs) with human preferences."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:  # keep `import diffalign` light: torch loads on first use
    if name == "train":
        from diffalign.api import train

        return train
    raise AttributeError(f"module 'diffalign' has no attribute {name!r}")
