"""Preference pairs: reading them, and decoding their images.

Sources, one record type:

- a Pick-a-Pic-style parquet file or folder of shards (columns ``caption``, ``jpg_0``, ``jpg_1``
  (encoded image bytes), ``label_0``, ``label_1``, optional ``mask`` (encoded bytes, white =
  repainted: inpainting pairs)): the image with label 1 is the chosen one; a
  0.5/0.5 row is a tie, dropped by default (``ties="drop"``, as the official Diffusion-DPO code
  does) or kept with label 0.5 (``ties="half"``);
- a Hugging Face dataset with those columns: a folder written by ``save_to_disk`` or, where a
  network exists, a hub id (``split`` chooses the split; Pick-a-Pic's public copy is gone, so
  local files are the usual case);
- a JSONL file, one object per line: ``prompt``, ``chosen`` and ``rejected`` (image paths,
  relative to the JSONL's folder), optional ``label`` (1, or 0.5 for a tie) and ``mask`` (for
  inpainting, white = repainted region); a parquet file with these columns (what
  ``scripts/score_dataset.py`` writes for a JSONL input) reads the same way, its paths relative
  to its own folder;
- scored images (a JSONL or parquet file whose rows have ``image``, ``score`` and ``group``,
  optional ``mask`` and ``prompt``, as PrefPaint's scored inpaintings): the rows of one group
  are images of one input (inpaintings of one masked image), so they must share ``mask`` and
  ``prompt``; every two rows of a group with different scores make a pair, the higher score
  chosen, and equal scores a tie. A group of one row makes no pair. The pair's ``rewards`` are
  the two scores and its ``where`` names both rows (``file:3+5``).

Reward scores (optional; ``PairRecord.rewards``, (chosen, rejected)), for the objectives that use
them (MaPPO, MADPO, SmPO, NCA):

- ``score_prefix`` set: the columns ``scripts/score_dataset.py`` writes with that
  ``column_prefix``, ``<prefix>_0`` / ``<prefix>_1`` beside ``jpg_0`` / ``jpg_1``, or
  ``<prefix>_chosen`` / ``<prefix>_rejected`` for pair rows; every kept row must have both;
- otherwise pair rows may carry ``chosen_reward`` / ``rejected_reward`` (or ``score_chosen`` /
  ``score_rejected``), the text rows' fields; all rows or none.

Annotator ids (optional; ``PairRecord.annotator``, text): a row's ``annotator``, or Pick-a-Pic's
``user_id``; the reward trainer's misspecification report uses them.

Bad input names the file and row: a missing column or key, an unreadable label, a missing,
null, NaN or infinite score, a missing or corrupt image (when it is decoded). A malformed row
raises, or with ``on_bad_sample="skip"`` is dropped and counted (``Parsed.skipped``, a warning).
"""

from __future__ import annotations

import io
import itertools
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from PIL import Image, UnidentifiedImageError
from torch import Tensor

from diffalign.data.rows import (
    REWARD_FIELDS,
    Parsed,
    check_columns,
    check_rewards_all_or_none,
    pair_label,
    pair_rewards,
    parse_rows,
    read_rows,
)
from diffalign.images import from_pil

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
    rewards: tuple[float, float] | None = None  # reward scores of (chosen, rejected)
    annotator: str | None = None  # who labelled it: Pick-a-Pic ``user_id``, a JSONL ``annotator``


def _annotator(row: dict) -> str | None:
    """The row's annotator id (``annotator``, or Pick-a-Pic's ``user_id``) as text; None if absent."""
    value = row.get("annotator", row.get("user_id"))
    return None if value is None else str(value)


def _tie_or_win(label_0: float, where: str) -> float | None:
    if label_0 in (0, 1):
        return 1.0
    if label_0 == 0.5:
        return None
    raise ValueError(f"{where}: label_0 must be 0, 0.5 or 1, got {label_0!r}")


PICK_A_PIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
PAIR_COLUMNS = ("prompt", "chosen", "rejected")
SCORED_COLUMNS = ("image", "score", "group")


def read_preference_pairs(
    path: str | Path,
    ties: Literal["drop", "half"] = "drop",
    split: str = "train",
    score_prefix: str | None = None,
    on_bad_sample: Literal["error", "skip"] = "error",
) -> Parsed[PairRecord]:
    """All pairs of a ``.parquet`` / ``.jsonl`` file, a folder of parquet shards, a ``save_to_disk``
    folder or a hub dataset id; images stay encoded until ``load_image``. ``score_prefix``: read
    the reward-score columns ``scripts/score_dataset.py`` wrote with that ``column_prefix``.
    A malformed row (a bad label, image reference or score, a missing key) raises naming it
    (``on_bad_sample="error"``) or is dropped and counted in the result's ``skipped`` and a warning
    (``"skip"``). Duplicate pairs are kept (each row is a vote) and counted in a warning.

    Raises ``ValueError`` naming the source (a missing column, every row malformed) or the row
    (a malformed one under ``"error"``; a row without scores among scored ones)."""
    if ties not in ("drop", "half"):
        raise ValueError(f"ties must be 'drop' or 'half', got {ties!r}")
    path = Path(path)
    rows = read_rows(path, split, what="preference data")
    names = list(rows[0][1]) if rows else []
    folder = path if path.is_dir() else path.parent
    if set(SCORED_COLUMNS) <= set(names) and "chosen" not in names:
        records = _scored_pairs(rows, folder, ties, on_bad_sample, path)
    elif path.suffix in (".jsonl", ".json") or ("jpg_0" not in names and set(PAIR_COLUMNS) <= set(names)):
        fields = ((f"{score_prefix}_chosen", f"{score_prefix}_rejected"),) if score_prefix else REWARD_FIELDS
        records = parse_rows(
            rows, lambda r: _pair_row(r[1], r[0], folder, ties, fields, bool(score_prefix)),
            on_bad_sample, path, "preference pairs",
        )  # fmt: skip
    else:
        scores = (f"{score_prefix}_0", f"{score_prefix}_1") if score_prefix else ()
        if rows:
            check_columns(names, (*PICK_A_PIC_COLUMNS, *scores), str(path))
        records = parse_rows(
            rows, lambda r: _pick_a_pic(r[1], r[0], ties, scores), on_bad_sample, path, "preference pairs"
        )
    check_rewards_all_or_none(records)
    _warn_duplicates(records, path)
    return records


def _warn_duplicates(records: list[PairRecord], source: Path) -> None:
    """Count pairs that repeat an earlier one (prompt, images and label): kept, since Pick-a-Pic's
    repeated pairs are separate votes, but a copy-paste error in a user's data shows here."""
    seen: set[tuple] = set()
    repeats = 0
    for r in records:
        key = (r.prompt, r.chosen, r.rejected, r.mask, r.label)
        repeats += key in seen
        seen.add(key)
    if repeats:
        warnings.warn(
            f"{source}: {repeats} of {len(records)} pairs repeat an earlier pair (kept: each row is a vote)",
            stacklevel=3,
        )


def _pick_a_pic(row: dict, where: str, ties: str, scores: tuple[str, ...]) -> PairRecord | None:
    win = _tie_or_win(row["label_0"], where)
    if win is None and ties == "drop":
        return None
    first_wins = row["label_0"] >= 0.5
    chosen, rejected = (row["jpg_0"], row["jpg_1"]) if first_wins else (row["jpg_1"], row["jpg_0"])
    rewards = pair_rewards(row, where, (scores,), required=True) if scores else None
    if rewards is not None and not first_wins:
        rewards = rewards[::-1]
    mask = row.get("mask")  # inpainting pairs (``diffalign label`` on examples): encoded bytes
    if mask is not None and not isinstance(mask, bytes):
        raise ValueError(f"{where}: 'mask' must hold encoded image bytes, got {type(mask).__name__}")
    return PairRecord(
        str(row["caption"] or ""), chosen, rejected, win or 0.5, where, mask, rewards, _annotator(row)
    )


def _pair_row(
    row: dict, where: str, folder: Path, ties: str, fields: tuple[tuple[str, str], ...], scored: bool
) -> PairRecord | None:
    for key in PAIR_COLUMNS:
        if key not in row:
            raise ValueError(f"{where}: missing key '{key}' (need prompt, chosen, rejected)")
    label = pair_label(row, where)
    if label == 0.5 and ties == "drop":
        return None
    mask = _image_ref(row, "mask", folder, where) if row.get("mask") else None
    return PairRecord(
        str(row["prompt"]),
        _image_ref(row, "chosen", folder, where),
        _image_ref(row, "rejected", folder, where),
        label,
        where,
        mask,
        pair_rewards(row, where, fields, required=scored),
        _annotator(row),
    )


def _scored_groups(
    rows: list[tuple[str, dict]], folder: Path, on_bad_sample: Literal["error", "skip"], source: Path
) -> tuple[list[list[tuple[str, dict]]], int]:
    """The rows of each group, groups in order of first appearance, and the malformed rows
    skipped. A row is malformed without the scored columns, a finite score, an image reference or
    a string or integer group, or with a mask or prompt other than its group's first row's."""
    groups: dict[object, list[tuple[str, dict]]] = {}

    def join(entry: tuple[str, dict]) -> None:
        where, row = entry
        for key in SCORED_COLUMNS:
            if key not in row:
                raise ValueError(f"{where}: missing key '{key}' (scored images need image, score, group)")
        score, group = row["score"], row["group"]
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise ValueError(f"{where}: 'score' must be a finite number, got {score!r}")
        if isinstance(group, bool) or not isinstance(group, (str, int)):
            raise ValueError(f"{where}: 'group' must be a string or an integer, got {group!r}")
        for key in ("image", *(("mask",) if row.get("mask") else ())):
            _image_ref(row, key, folder, where)
        members = groups.setdefault(group, [])
        for key in ("mask", "prompt"):
            if members and row.get(key) != members[0][1].get(key):
                raise ValueError(
                    f"{where}: '{key}' differs from that of {members[0][0]} in the same group {group!r}"
                )
        members.append(entry)

    skipped = parse_rows(rows, join, on_bad_sample, source, "scored images").skipped
    return [members for members in groups.values() if members], skipped


def _scored_pairs(
    rows: list[tuple[str, dict]], folder: Path, ties: str, on_bad_sample: Literal["error", "skip"],
    source: Path,
) -> Parsed[PairRecord]:  # fmt: skip
    """Every two rows of a group (in file order) as a pair, the higher score chosen; equal
    scores a tie (label 0.5; dropped unless ``ties="half"``), the earlier row first."""
    groups, skipped = _scored_groups(rows, folder, on_bad_sample, source)
    records: Parsed[PairRecord] = Parsed()
    records.skipped = skipped
    for members in groups:
        for first, second in itertools.combinations(members, 2):
            (where_a, a), (where_b, b) = first, second
            tie = a["score"] == b["score"]
            if tie and ties == "drop":
                continue
            (w_where, w), (l_where, lo) = (second, first) if b["score"] > a["score"] else (first, second)
            records.append(
                PairRecord(
                    str(a.get("prompt", "")),
                    _image_ref(w, "image", folder, w_where),
                    _image_ref(lo, "image", folder, l_where),
                    0.5 if tie else 1.0,
                    f"{where_a}+{where_b.rsplit(':', 1)[1]}",
                    _image_ref(a, "mask", folder, where_a) if a.get("mask") else None,
                    (float(w["score"]), float(lo["score"])),
                )
            )
    return records


def _image_ref(row: dict, key: str, folder: Path, where: str) -> ImageRef:
    """A path relative to the data's folder, or encoded image bytes."""
    value = row[key]
    if isinstance(value, bytes):
        return value
    if isinstance(value, str) and value:
        return folder / value
    raise ValueError(f"{where}: '{key}' must be an image path or encoded bytes, got {value!r:.60}")


def load_image(ref: ImageRef, where: str, size: int | None = None, grey: bool = False) -> Tensor:
    """Decode an image (a path or encoded bytes) to float (3, H, W), or (1, H, W) with ``grey``,
    in [0, 1], as it is displayed (:func:`~diffalign.images.from_pil`: EXIF orientation, 16-bit,
    transparency), resized (bicubic) to ``size`` x ``size`` when given.

    Raises:
        FileNotFoundError: no such file, naming ``where`` (the row) and the path.
        ValueError: data that does not decode as an image, naming ``where`` and the file.
    """
    try:
        with Image.open(io.BytesIO(ref) if isinstance(ref, bytes) else ref) as image:
            return from_pil(image, grey, size)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{where}: image file not found: {ref}") from err
    except (
        UnidentifiedImageError,
        OSError,
        ValueError,
        SyntaxError,
    ) as err:  # SyntaxError: broken PNG chunks
        name = ref if isinstance(ref, Path) else "embedded bytes"
        raise ValueError(f"{where}: cannot decode image ({name}): {err}") from err
