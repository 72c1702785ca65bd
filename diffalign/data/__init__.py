"""Datasets: preference pairs from Pick-a-Pic-style parquet files or a local JSONL + image folder,
expert images with their prompts (Diffusion-DRO) from an image folder, expert rows or scored pairs,
and inpainting examples (image, mask, prompt: PrefPaint) from a JSONL / parquet file or a folder."""

from diffalign.data.experts import ExpertDataset, ExpertRecord, collate_experts, read_experts, usable_experts
from diffalign.data.inpainting import (
    InpaintingDataset,
    InpaintingRecord,
    collate_inpainting,
    read_inpainting_examples,
    write_inpainting_examples,
)
from diffalign.data.preference import PairRecord, load_image, read_preference_pairs

__all__ = [
    "ExpertDataset",
    "ExpertRecord",
    "InpaintingDataset",
    "InpaintingRecord",
    "PairRecord",
    "collate_experts",
    "collate_inpainting",
    "load_image",
    "read_experts",
    "read_inpainting_examples",
    "read_preference_pairs",
    "usable_experts",
    "write_inpainting_examples",
]
