"""Inpainting examples: an image, a mask (white = repaint) and an optional prompt; the training
data of PrefPaint's RL (:mod:`diffalign.methods.prefpaint`).

``read_inpainting_examples`` reads them from

- a ``.jsonl`` file, one object per line: ``image`` and ``mask`` (paths relative to the file's
  folder, or encoded image bytes), optional ``prompt`` (default ""); a ``.parquet`` file or a
  folder of parquet shards with these columns reads the same way;
- a folder (recursive, sorted): every image ``X.png`` / ``X.jpg`` (``.jpeg .webp .bmp`` too, any
  case) with its mask ``X.mask.png`` beside it, its prompt the stripped text of an optional
  ``X.txt``. A folder holding ``examples.jsonl`` (what ``write_inpainting_examples`` writes) is
  read as that file.

``InpaintingDataset`` decodes a record into ``{"prompt", "image": (3, R, R), "mask": (1, R, R)}``,
float in [0, 1], the mask binarised at 0.5. Errors name the file and row ("file:row", or a folder
image's path): a malformed row (a missing key, a prompt that is not text) when it is read, a
missing or corrupt file or a mask whose size differs from its image's when it is decoded. With
``on_bad_sample="skip"`` the reader drops malformed rows (one warning counts them) and the
dataset replaces an example that fails to decode by the next one, counted in ``skipped``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import torch
from torch import Tensor

from diffalign.data.experts import IMAGE_SUFFIXES
from diffalign.data.pairs import ImageRecordDataset
from diffalign.data.preference import ImageRef, _image_ref, load_image
from diffalign.data.rows import parse_rows, read_rows
from diffalign.images import to_pil

__all__ = [
    "InpaintingDataset",
    "InpaintingRecord",
    "collate_inpainting",
    "read_inpainting_examples",
    "write_inpainting_examples",
]

EXAMPLES_FILE = "examples.jsonl"
MASK_SUFFIX = ".mask.png"
T = TypeVar("T")


@dataclass
class InpaintingRecord:
    image: ImageRef
    mask: ImageRef  # white (>= 0.5 once decoded) = repaint
    prompt: str
    where: str  # "file:row", or a folder image's path, for error messages


def read_inpainting_examples(
    path: str | Path, on_bad_sample: Literal["error", "skip"] = "error"
) -> list[InpaintingRecord]:
    """The inpainting examples of ``path`` (see the module's docstring), files not yet opened
    (``InpaintingDataset`` decodes them).

    ``on_bad_sample="error"``: a malformed row raises ``ValueError`` naming its file and row;
    ``"skip"``: such rows are dropped, with a warning counting them.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a malformed row (``"error"``), or no usable example (naming ``path`` and, if
            any, the first malformed row).
    """
    if on_bad_sample not in ("error", "skip"):  # before any file is touched
        raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"inpainting data not found: {path}")
    if path.is_dir() and (path / EXAMPLES_FILE).is_file():
        path = path / EXAMPLES_FILE
    if path.is_dir() and not any(path.glob("*.parquet")):
        images = sorted(
            p for p in path.rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.endswith(MASK_SUFFIX)
        )  # fmt: skip
        return _parse_all(images, _folder_example, on_bad_sample, path)
    folder = path if path.is_dir() else path.parent
    rows = read_rows(path, what="inpainting data")
    return _parse_all(rows, lambda r: _row_example(*r, folder), on_bad_sample, path)


def _parse_all(
    entries: Iterable[T], parse: Callable[[T], InpaintingRecord], on_bad_sample: str, source: Path
) -> list[InpaintingRecord]:
    records = parse_rows(entries, parse, on_bad_sample, source, "inpainting examples")
    if not records:
        raise ValueError(f"{source}: no inpainting examples")
    return records


def _row_example(where: str, row: dict, folder: Path) -> InpaintingRecord:
    for key in ("image", "mask"):
        if key not in row:
            raise ValueError(f"{where}: missing key '{key}' (an inpainting example needs image and mask)")
    prompt = "" if row.get("prompt") is None else row["prompt"]
    if not isinstance(prompt, str):
        raise ValueError(f"{where}: 'prompt' must be text, got {prompt!r:.60}")
    return InpaintingRecord(
        _image_ref(row, "image", folder, where), _image_ref(row, "mask", folder, where), prompt, where
    )


def _folder_example(image: Path) -> InpaintingRecord:
    """The example of a folder image: its mask ``X.mask.png`` (opened when decoded) and the text
    of ``X.txt`` beside it, if any."""
    text = image.with_suffix(".txt")
    try:
        prompt = text.read_text(encoding="utf-8").strip() if text.is_file() else ""
    except UnicodeDecodeError as err:
        raise ValueError(f"{text}: the prompt of {image.name} is not UTF-8 text ({err})") from err
    return InpaintingRecord(image, image.with_name(image.stem + MASK_SUFFIX), prompt, str(image))


class InpaintingDataset(ImageRecordDataset):
    """Inpainting records as items ``{"prompt": str, "image": (3, R, R), "mask": (1, R, R)}``, float
    in [0, 1]: image and mask resized together so the short side is R (bilinear, antialiased) and
    center-cropped to R x R (``square_crop``, no flip), then the mask binarised at 0.5 (as diffusers'
    mask processor resizes, then binarises). A missing or corrupt file, or a mask whose size
    differs from its image's, raises naming the file and row (``on_bad_sample="error"``) or is
    replaced by the next record and counted in ``skipped`` (``"skip"``)."""

    no_records = "no inpainting examples to train on"
    all_failed = "every inpainting example failed to load"

    def __init__(
        self,
        records: list[InpaintingRecord],
        resolution: int,
        on_bad_sample: Literal["error", "skip"] = "error",
    ) -> None:
        super().__init__(records, resolution, random_crop=False, hflip=False, on_bad_sample=on_bad_sample)

    def _load(self, record: InpaintingRecord) -> Tensor:
        image = load_image(record.image, record.where)
        mask = load_image(record.mask, record.where, grey=True)
        if mask.shape[-2:] != image.shape[-2:]:
            name = record.mask if isinstance(record.mask, Path) else "embedded bytes"
            raise ValueError(
                f"{record.where}: the mask ({name}) is {mask.shape[-1]}x{mask.shape[-2]}, its image "
                f"{image.shape[-1]}x{image.shape[-2]}: they must be the same size"
            )
        return torch.stack([image, mask.expand_as(image)])

    def _item(self, record: InpaintingRecord, images: Tensor) -> dict:
        return {"prompt": record.prompt, "image": images[0], "mask": (images[1, :1] >= 0.5).float()}


def collate_inpainting(items: list[dict]) -> dict:
    """A batch of B items: ``images`` (B, 3, R, R) in [0, 1], ``masks`` (B, 1, R, R) in {0, 1},
    ``prompts`` (list of B str)."""
    return {
        "images": torch.stack([it["image"] for it in items]),
        "masks": torch.stack([it["mask"] for it in items]),
        "prompts": [it["prompt"] for it in items],
    }


def write_inpainting_examples(
    folder: str | Path, images: Tensor, masks: Tensor, prompts: Sequence[str] | None = None
) -> Path:
    """Write examples as ``read_inpainting_examples`` reads them: ``images/<i>.png`` (RGB, 8 bit),
    ``images/<i>.mask.png`` (greyscale, white = repaint) and ``examples.jsonl``; returns the
    JSONL's path. ``images`` (N, 3, H, W) and ``masks`` (N, 1, H, W) in [0, 1]; ``prompts``: N
    strings, or None for none.

    Raises:
        ValueError: shapes that do not match, or not one prompt per image.
    """
    n = len(images)
    if images.dim() != 4 or images.shape[1] != 3 or masks.shape != (n, 1, *images.shape[-2:]):
        raise ValueError(
            f"images must be (N, 3, H, W) and masks (N, 1, H, W) of the same N, H, W; got "
            f"{tuple(images.shape)} and {tuple(masks.shape)}"
        )
    prompts = [""] * n if prompts is None else list(prompts)
    if len(prompts) != n:
        raise ValueError(f"one prompt per image: {n} images, {len(prompts)} prompts")
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (image, mask) in enumerate(zip(to_pil(images), to_pil(masks.expand(-1, 3, -1, -1)), strict=True)):
        image.save(folder / "images" / f"{i}.png")
        mask.convert("L").save(folder / "images" / f"{i}{MASK_SUFFIX}")
        rows.append({"image": f"images/{i}.png", "mask": f"images/{i}{MASK_SUFFIX}", "prompt": prompts[i]})
    path = folder / EXAMPLES_FILE
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
