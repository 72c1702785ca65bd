"""diffalign: align diffusion models (and causal LMs) with human preferences."""

__version__ = "0.1.0"
