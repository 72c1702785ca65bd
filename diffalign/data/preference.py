"""Preference pairs: reading them, and decoding their images.

Two sources, one record type:

- a Pick-a-Pic-style parquet file (columns ``caption``, ``jpg_0``, ``jpg_1`` (encoded image
  bytes), ``label_0``, ``label_1``): the image with label 1 is the chosen one; a 0.5/0.5 row is
  a tie, dropped by default (``ties="drop"``, as the official Diffusion-DPO code does) or kept
  with label 0.5 (``ties="half"``);
- a JSONL file, one object per line: ``prompt``, ``chosen`` and ``rejected`` (image paths,
  relative to the JSONL's folder), optional ``label`` (1, or 0.5 for a tie) and ``mask`` (for
  inpainting, white = repainted region).

Bad input names the file and row: a missing column or key, an unreadable label, a missing or
corrupt image (when it is decoded).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

__all__ = ["PairRecord", "load_image", "read_preference_pairs"]

ImageRef = bytes | Path


@dataclass
class PairRecord:
    prompt: str
    chosen: ImageRef
    rejected: ImageRef
    label: float  # P(chosen preferred): 1.0, or 0.5 for a tie kept
    where: str  # "file:row", for error messages
    mask: ImageRef | None = None


def _tie_or_win(label_0: float, where: str) -> float | None:
    if label_0 in (0, 1):
        return 1.0
    if label_0 == 0.5:
        return None
    raise ValueError(f"{where}: label_0 must be 0, 0.5 or 1, got {label_0!r}")


def read_preference_pairs(path: str | Path, ties: Literal["drop", "half"] = "drop") -> list[PairRecord]:
    """All pairs of a ``.parquet`` (Pick-a-Pic columns) or ``.jsonl`` file; images stay encoded."""
    path = Path(path)
    if ties not in ("drop", "half"):
        raise ValueError(f"ties must be 'drop' or 'half', got {ties!r}")
    if not path.is_file():
        raise FileNotFoundError(f"preference data not found: {path}")
    if path.suffix == ".parquet":
        return _read_parquet(path, ties)
    if path.suffix in (".jsonl", ".json"):
        return _read_jsonl(path, ties)
    raise ValueError(f"{path}: unsupported preference data format (use .parquet or .jsonl)")


def _read_parquet(path: Path, ties: str) -> list[PairRecord]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    missing = [c for c in ("caption", "jpg_0", "jpg_1", "label_0") if c not in table.column_names]
    if missing:
        raise ValueError(
            f"{path}: missing column '{missing[0]}' (Pick-a-Pic columns: caption, jpg_0, jpg_1, label_0)"
        )
    rows = table.select(["caption", "jpg_0", "jpg_1", "label_0"]).to_pylist()
    out = []
    for i, row in enumerate(rows):
        where = f"{path}:{i}"
        win = _tie_or_win(row["label_0"], where)
        if win is None and ties == "drop":
            continue
        first_wins = row["label_0"] >= 0.5
        chosen, rejected = (row["jpg_0"], row["jpg_1"]) if first_wins else (row["jpg_1"], row["jpg_0"])
        out.append(PairRecord(str(row["caption"] or ""), chosen, rejected, win or 0.5, where))
    return out


def _read_jsonl(path: Path, ties: str) -> list[PairRecord]:
    out = []
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{i}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err.msg})") from err
        for key in ("prompt", "chosen", "rejected"):
            if key not in row:
                raise ValueError(f"{where}: missing key '{key}' (need prompt, chosen, rejected)")
        label = float(row.get("label", 1.0))
        if label not in (0.5, 1.0):
            raise ValueError(f"{where}: label must be 1 or 0.5 (a tie), got {row['label']!r}")
        if label == 0.5 and ties == "drop":
            continue
        mask = path.parent / row["mask"] if row.get("mask") else None
        out.append(
            PairRecord(
                str(row["prompt"]),
                path.parent / row["chosen"],
                path.parent / row["rejected"],
                label,
                where,
                mask,
            )
        )
    return out


def load_image(ref: ImageRef, where: str, size: int | None = None, grey: bool = False) -> Tensor:
    """Decode an image to float (C, H, W) in [0, 1], resized (bicubic) to ``size`` x ``size``."""
    try:
        image = Image.open(io.BytesIO(ref) if isinstance(ref, bytes) else ref)
        image = image.convert("L" if grey else "RGB")
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{where}: image file not found: {ref}") from err
    except (UnidentifiedImageError, OSError) as err:
        name = ref if isinstance(ref, Path) else "embedded bytes"
        raise ValueError(f"{where}: cannot decode image ({name}): {err}") from err
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array.copy())
    return tensor[None] if grey else tensor.permute(2, 0, 1)
