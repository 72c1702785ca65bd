"""Datasets: preference pairs from Pick-a-Pic-style parquet files or a local JSONL + image folder, and
expert images with their prompts (Diffusion-DRO) from an image folder, expert rows or scored pairs."""

from diffalign.data.experts import ExpertDataset, ExpertRecord, collate_experts, read_experts, usable_experts
from diffalign.data.preference import PairRecord, load_image, read_preference_pairs

__all__ = [
    "ExpertDataset",
    "ExpertRecord",
    "PairRecord",
    "collate_experts",
    "load_image",
    "read_experts",
    "read_preference_pairs",
    "usable_experts",
]
