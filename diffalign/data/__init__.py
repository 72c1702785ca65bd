"""Datasets: preference pairs from Pick-a-Pic-style parquet files or a local JSONL + image folder."""

from diffalign.data.preference import PairRecord, load_image, read_preference_pairs

__all__ = ["PairRecord", "load_image", "read_preference_pairs"]
