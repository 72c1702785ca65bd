"""Preference pairs: reading them, and decoding their images.

Two sources, one record type:

- a Pick-a-Pic-style parquet file (columns ``caption``, ``jpg_0``, ``jpg_1`` (encoded image
  bytes), ``label_0``, ``label_1``): the image with label 1 is the chosen one; a 0.5/0.5 row is
  a tie, dropped by default (``ties="drop"``, as the official Diffusion-DPO code does) or kept
  with label 0.5 (``ties="half"``);
- a Hugging Face dataset with those columns: a folder written by ``save_to_disk`` or, where a
  network exists, a hub id (``split`` chooses the split; Pick-a-Pic's public copy is gone, so
  local files are the usual case);
- a JSONL file, one object per line: ``prompt``, ``chosen`` and ``rejected`` (image paths,
  relative to the JSONL's folder), optional ``label`` (1, or 0.5 for a tie) and ``mask`` (for
  inpainting, white = repainted region).

Bad input names the file and row: a missing column or key, an unreadable label, a missing or
corrupt image (when it is decoded).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from diffalign.data.rows import pair_label, read_rows

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


PICK_A_PIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")


def read_preference_pairs(
    path: str | Path, ties: Literal["drop", "half"] = "drop", split: str = "train"
) -> list[PairRecord]:
    """All pairs of a ``.parquet`` / ``.jsonl`` file, a ``save_to_disk`` folder or a hub dataset id;
    images stay encoded until ``load_image``."""
    if ties not in ("drop", "half"):
        raise ValueError(f"ties must be 'drop' or 'half', got {ties!r}")
    path = Path(path)
    if path.suffix in (".jsonl", ".json"):
        return [
            r
            for where, row in read_rows(path, what="preference data")
            if (r := _jsonl_pair(row, where, path.parent, ties))
        ]
    rows = read_rows(path, split, columns=PICK_A_PIC_COLUMNS, what="preference data")
    return [r for where, row in rows if (r := _pick_a_pic(row, where, ties))]


def _pick_a_pic(row: dict, where: str, ties: str) -> PairRecord | None:
    win = _tie_or_win(row["label_0"], where)
    if win is None and ties == "drop":
        return None
    first_wins = row["label_0"] >= 0.5
    chosen, rejected = (row["jpg_0"], row["jpg_1"]) if first_wins else (row["jpg_1"], row["jpg_0"])
    return PairRecord(str(row["caption"] or ""), chosen, rejected, win or 0.5, where)


def _jsonl_pair(row: dict, where: str, folder: Path, ties: str) -> PairRecord | None:
    for key in ("prompt", "chosen", "rejected"):
        if key not in row:
            raise ValueError(f"{where}: missing key '{key}' (need prompt, chosen, rejected)")
    label = pair_label(row, where)
    if label == 0.5 and ties == "drop":
        return None
    mask = folder / row["mask"] if row.get("mask") else None
    return PairRecord(
        str(row["prompt"]), folder / row["chosen"], folder / row["rejected"], label, where, mask
    )


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
