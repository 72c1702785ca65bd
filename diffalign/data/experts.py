"""Expert images with their prompts: the training data of Diffusion-DRO.

Diffusion-DRO (official code: basiclab/DiffusionDRO, ``misc/dataset.py`` ``ExpertDataset`` and
``tools/pickapic.py``) learns from "expert" images, e.g. the 500 Pick-a-Pic images with the
highest reward score (PickScore or HPSv2), each with its prompt. ``read_experts`` reads them from

- a folder of images (recursive, sorted; ``.png .jpg .jpeg .webp .bmp``, any case): an image's
  prompt is the text of a sidecar ``<stem>.txt`` beside it, else of a ``caption.txt`` in its folder
  (the official layout, ``<root>/<n>/<n>.png`` + ``<root>/<n>/caption.txt``), stripped. Folders
  carry no scores;
- a ``.jsonl`` file of expert rows (or a ``.parquet`` file / folder of shards with these columns):
  ``prompt``, ``image`` (a path relative to the file's folder, or encoded image bytes), optional
  ``score`` (a finite number; all rows or none);
- preference pairs, anything ``read_preference_pairs`` reads (Pick-a-Pic parquet, pair JSONL
  with ``prompt`` / ``chosen`` / ``rejected``, the parquet ``scripts/score_dataset.py`` writes;
  ties kept): scored pairs (``score_prefix``, or JSONL ``chosen_reward`` / ``rejected_reward``)
  give both images, each with its own score; unscored pairs give their chosen image only (the one
  a person preferred; a tie has none). An image in several pairs with the same prompt is kept
  once (the first, with its first score), as the official script keys images by (uid, caption).
  A JSONL / parquet source is read as expert rows unless its first row has ``chosen``,
  ``rejected``, ``jpg_0`` or ``jpg_1``; a ``save_to_disk`` folder or hub id is read as pairs.

``top_k`` keeps the K best-scored images (overall, or K per prompt with ``per_prompt``), as
``tools/pickapic.py --top`` does; it needs scores. ``usable_experts`` decodes every image once,
before training; ``ExpertDataset`` turns records into training items.

Errors are ``ValueError`` naming what is wrong and where: the file and row ("file:row") of a bad
row (a missing key, a blank prompt, a score that is not a finite number), the image file of a
folder image without a prompt, the source when it has no expert image or no scores for
``top_k``; a missing or corrupt image is named (``FileNotFoundError`` / ``ValueError``) when it
is decoded.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from diffalign.data.pairs import ImageRecordDataset
from diffalign.data.preference import ImageRef, PairRecord, _image_ref, load_image, read_preference_pairs
from diffalign.data.rows import read_rows

__all__ = ["ExpertDataset", "ExpertRecord", "collate_experts", "read_experts", "usable_experts"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
PAIR_KEYS = ("chosen", "rejected", "jpg_0", "jpg_1")


@dataclass
class ExpertRecord:
    prompt: str
    image: ImageRef
    where: str  # "file:row" or the image's path, for error messages
    score: float | None = None  # reward score, when the source has one


def read_experts(
    path: str | Path,
    *,
    split: str = "train",
    score_prefix: str | None = None,
    top_k: int | None = None,
    per_prompt: bool = False,
) -> list[ExpertRecord]:
    """The expert images of ``path`` (a folder of images, expert rows, or preference pairs: see the
    module's docstring), images still encoded or on disk (``usable_experts`` decodes them).

    ``split``: the split of a ``save_to_disk`` folder or hub dataset. ``score_prefix``: read the
    score columns ``scripts/score_dataset.py`` wrote with that ``column_prefix`` (preference pairs
    only). ``top_k``: keep the ``top_k`` highest-scored records (``per_prompt``: per prompt); among
    equal scores the earlier record wins; the kept records stay in their original order.

    Raises ``ValueError``: a bad row (naming file:row), a folder image without a prompt (naming the
    image), no expert image (naming ``path``), ``top_k`` without scores (naming ``path``),
    ``top_k < 1``, ``per_prompt`` without ``top_k``, ``score_prefix`` for a source without
    pairs; ``FileNotFoundError``: no such source."""
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    if per_prompt and top_k is None:
        raise ValueError("per_prompt keeps the top_k images of each prompt: set top_k too")
    path = Path(path)
    if not path.exists() and (path.suffix or path.is_absolute()):  # else maybe a hub dataset id
        raise FileNotFoundError(f"expert data not found: {path}")
    kind = _source_kind(path)
    if score_prefix and kind != "pairs":
        what = "a folder of images (no scores)" if kind == "folder" else "expert rows (their score: 'score')"
        raise ValueError(f"{path}: score_prefix names score columns of preference pairs; this is {what}")
    if kind == "folder":
        records = _read_folder(path)
    elif kind == "rows":
        records = _read_expert_rows(path, split)
    else:
        records = _pair_images(
            read_preference_pairs(path, ties="half", split=split, score_prefix=score_prefix)
        )
    if not records:
        raise ValueError(f"{path}: no expert images found")
    return records if top_k is None else _top_k(records, top_k, per_prompt, path)


def _source_kind(path: Path) -> Literal["folder", "rows", "pairs"]:
    """What ``path`` holds, from its layout and the keys of its first row, without reading it all."""
    is_dataset_folder = (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
    if path.is_dir() and not is_dataset_folder and not any(path.glob("*.parquet")):
        return "folder"
    first = min(path.glob("*.parquet"), default=None) if path.is_dir() else path
    if first is None or not first.is_file() or first.suffix not in (".parquet", ".jsonl", ".json"):
        return "pairs"  # a datasets folder or a hub id; read_preference_pairs names what is wrong
    keys = _first_row_keys(first)
    return "pairs" if keys is None or any(k in keys for k in PAIR_KEYS) else "rows"


def _first_row_keys(path: Path) -> set[str] | None:
    """The columns of a parquet file, or the keys of a JSONL file's first row (None: not readable
    here; the full reader will name the problem)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return set(pq.read_schema(path).names)
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    return None
                return set(row) if isinstance(row, dict) else None
    return set()


def _read_folder(folder: Path) -> list[ExpertRecord]:
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return [ExpertRecord(_folder_prompt(image), image, str(image)) for image in images]


def _folder_prompt(image: Path) -> str:
    """The stripped text of ``<stem>.txt`` beside the image, else of ``caption.txt`` in its folder."""
    for text in (image.with_suffix(".txt"), image.parent / "caption.txt"):
        if text.is_file():
            try:
                prompt = text.read_text(encoding="utf-8").strip()
            except UnicodeDecodeError as err:
                raise ValueError(f"{text}: the prompt of {image.name} is not UTF-8 text ({err})") from err
            if not prompt:
                raise ValueError(f"{image}: blank prompt in {text.name} (an expert image needs a prompt)")
            return prompt
    raise ValueError(
        f"{image}: no prompt (an expert image needs a sidecar {image.stem}.txt or a caption.txt beside it)"
    )


def _read_expert_rows(path: Path, split: str) -> list[ExpertRecord]:
    folder = path if path.is_dir() else path.parent
    records = [_expert_row(row, where, folder) for where, row in read_rows(path, split, what="expert data")]
    unscored = [r for r in records if r.score is None]
    if unscored and len(unscored) < len(records):
        raise ValueError(f"{unscored[0].where}: no 'score', while other rows have one; give all rows or none")
    return records


def _expert_row(row: dict, where: str, folder: Path) -> ExpertRecord:
    for key in ("prompt", "image"):
        if key not in row:
            raise ValueError(
                f"{where}: missing key '{key}' (expert rows need prompt and image; "
                "preference pairs need prompt, chosen and rejected)"
            )
    prompt = row["prompt"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: blank or missing prompt ({prompt!r:.60}); an expert image needs a prompt")
    score = row.get("score")
    if "score" in row and (isinstance(score, bool) or not isinstance(score, (int, float))):
        raise ValueError(f"{where}: 'score' must be a number, got {score!r:.60}")
    if score is not None and not math.isfinite(score):
        raise ValueError(f"{where}: 'score' must be finite, got {score}")
    image = _image_ref(row, "image", folder, where)
    return ExpertRecord(prompt, image, where, None if score is None else float(score))


def _pair_images(pairs: list[PairRecord]) -> list[ExpertRecord]:
    """Every image of scored pairs, with its score; the chosen image of unscored ones (not of a
    tie); each (image, prompt) once, the first time it appears."""
    seen: set[tuple[ImageRef, str]] = set()
    records = []
    for pair in pairs:
        if not pair.prompt.strip():
            raise ValueError(f"{pair.where}: blank prompt; an expert image needs a prompt")
        if pair.rewards is not None:
            sides = [("chosen", pair.chosen, pair.rewards[0]), ("rejected", pair.rejected, pair.rewards[1])]
        else:
            sides = [("chosen", pair.chosen, None)] if pair.label == 1.0 else []
        for side, image, score in sides:
            if (image, pair.prompt) not in seen:
                seen.add((image, pair.prompt))
                records.append(ExpertRecord(pair.prompt, image, f"{pair.where} ({side})", score))
    return records


def _top_k(records: list[ExpertRecord], top_k: int, per_prompt: bool, path: Path) -> list[ExpertRecord]:
    """The ``top_k`` best-scored records (per prompt), in their original order; ties: earlier first."""
    keep = {i for ranked in _ranked(records, per_prompt, str(path)) for i in ranked[:top_k]}
    return [record for i, record in enumerate(records) if i in keep]


def _ranked(records: list[ExpertRecord], per_prompt: bool, source: str) -> list[list[int]]:
    """Indices of ``records`` grouped (by prompt, or one group) and sorted by descending score,
    equal scores in their order. Raises ``ValueError`` naming ``source`` when a record has no score."""
    unscored = next((r for r in records if r.score is None), None)
    if unscored is not None:
        raise ValueError(
            f"{source}: top_k needs a reward score for every image ({unscored.where} has none): score "
            "preference pairs with scripts/score_dataset.py and pass its column_prefix as score_prefix "
            "(method_options.score_prefix), or give expert rows a 'score'"
        )
    groups: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        groups.setdefault(record.prompt if per_prompt else "", []).append(i)
    # sorted() is stable: equal scores keep their order
    return [sorted(indices, key=lambda i: -records[i].score) for indices in groups.values()]


def usable_experts(
    records: list[ExpertRecord],
    on_bad_sample: Literal["error", "skip"] = "error",
    top_k: int | None = None,
    per_prompt: bool = False,
) -> tuple[list[ExpertRecord], int]:
    """The records whose image decodes (each decoded once, with ``load_image``), in their order,
    and how many were dropped. ``"error"``: the first missing or corrupt image raises
    (``FileNotFoundError`` / ``ValueError`` naming it); ``"skip"``: such records are dropped and
    counted. With ``top_k`` (``per_prompt``: per prompt), images are decoded best score first
    until ``top_k`` decode, so that a skipped image leaves its place to the next best, and the
    others are never decoded.

    Raises ``ValueError`` when no image is usable (naming the first failure), or, with ``top_k``,
    when a record has no score."""
    if on_bad_sample not in ("error", "skip"):
        raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
    ranked = [list(range(len(records)))] if top_k is None else _ranked(records, per_prompt, "expert data")
    keep, failures = set(), []
    for order in ranked:
        kept = 0
        for i in order:
            if top_k is not None and kept == top_k:
                break
            try:
                load_image(records[i].image, records[i].where)
            except (FileNotFoundError, ValueError) as err:
                if on_bad_sample == "error":
                    raise
                failures.append(err)
                continue
            keep.add(i)
            kept += 1
    if not keep:
        cause = f"; the first failure: {failures[0]}" if failures else " (no records)"
        raise ValueError(f"the expert set has no usable image{cause}")
    return [record for i, record in enumerate(records) if i in keep], len(failures)


class ExpertDataset(ImageRecordDataset):
    """Expert records as training items ``{"prompt": str, "image": (3, R, R) float in [0, 1]}``:
    resized so the short side is R, cropped to R x R (center, or random with ``random_crop``),
    flipped with probability 1/2 (``hflip``), the crop and flip drawn from a generator seeded by
    (``seed``, epoch, index) (``set_epoch``). A missing or corrupt image raises, naming it
    (``on_bad_sample="error"``), or is replaced by the next record and counted in ``skipped``."""

    no_records = "no expert images to train on"
    all_failed = "every expert image failed to load"

    def _load(self, record: ExpertRecord) -> Tensor:
        return load_image(record.image, record.where)[None]

    def _item(self, record: ExpertRecord, images: Tensor) -> dict:
        return {"prompt": record.prompt, "image": images[0]}


def collate_experts(items: list[dict]) -> dict:
    """A batch of B expert items: ``prompts`` (list of B str), ``images`` (B, 3, R, R) in [0, 1]."""
    return {"prompts": [it["prompt"] for it in items], "images": torch.stack([it["image"] for it in items])}
