"""A torch Dataset of preference pairs, with the image transforms of Diffusion-DPO's training.

Each item is ``{"prompt", "chosen", "rejected", "label", "rewards"}`` with images float (3, R, R) in [0, 1]
and ``rewards`` the record's (chosen, rejected) reward scores or None:
resized so the short side is R (bilinear, as the official script), cropped to R x R (center or
random), and flipped horizontally with probability 1/2 (the same flip and crop for both images
of a pair, so that they stay comparable): ``square_crop``. Bad rows (missing or corrupt images)
raise an error naming the row (``on_bad_sample="error"``) or are replaced by another row and
counted (``"skip"``): ``dataset.skipped`` is the number seen so far in this process.

Crops and flips are drawn from a generator seeded by (seed, epoch, index), not from the global
RNG: an item's augmentation does not depend on when it is loaded, so a resumed run sees exactly
the batches the interrupted run would have.

``ImageRecordDataset`` holds what is common to every dataset of image records (this one, and
``diffalign.data.experts.ExpertDataset``): the seeding, the transform and the skip-and-count loop.
"""

from __future__ import annotations

import random
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from diffalign.data.preference import PairRecord, load_image

__all__ = ["ImageRecordDataset", "PreferencePairDataset", "collate_pairs", "square_crop"]


def square_crop(
    images: Tensor, resolution: int, random_crop: bool, hflip: bool, rng: random.Random
) -> Tensor:
    """Images (K, 3, H, W) in [0, 1] → (K, 3, R, R) in [0, 1], R = ``resolution``: resized (bilinear,
    antialiased) so the short side is R, cropped to R x R (centered, or at a place drawn from
    ``rng``), flipped horizontally with probability 1/2 when ``hflip``; the same crop and flip for
    all K images."""
    r = resolution
    h, w = images.shape[-2:]
    scale = r / min(h, w)
    size = (max(r, round(h * scale)), max(r, round(w * scale)))
    if size != (h, w):
        images = F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
    top = rng.randint(0, size[0] - r) if random_crop else (size[0] - r) // 2
    left = rng.randint(0, size[1] - r) if random_crop else (size[1] - r) // 2
    images = images[..., top : top + r, left : left + r]
    if hflip and rng.random() < 0.5:
        images = images.flip(-1)
    return images.clamp(0, 1)


class ImageRecordDataset(Dataset):
    """Records whose images are decoded, stacked (K, 3, H, W) by ``_load`` and ``square_crop``-ed
    into an item by ``_item``. A record whose images fail to load (``FileNotFoundError`` or
    ``ValueError``) raises (``on_bad_sample="error"``) or is replaced by the next one and counted
    in ``skipped`` (``"skip"``)."""

    no_records = "no records to train on"  # the errors, in the subclass's words
    all_failed = "every record failed to load"

    def __init__(
        self,
        records: list[Any],
        resolution: int,
        random_crop: bool = False,
        hflip: bool = True,
        on_bad_sample: Literal["error", "skip"] = "error",
        seed: int = 0,
    ) -> None:
        if not records:
            raise ValueError(self.no_records)
        self.records, self.resolution = records, resolution
        self.random_crop, self.hflip, self.on_bad_sample = random_crop, hflip, on_bad_sample
        self.seed, self.epoch, self.skipped = seed, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def _load(self, record: Any) -> Tensor:
        """The record's images, (K, 3, H, W) in [0, 1]."""
        raise NotImplementedError

    def _item(self, record: Any, images: Tensor) -> dict:
        """The item of a record, from its transformed images (K, 3, R, R)."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict:
        for attempt in range(len(self.records)):
            record = self.records[(index + attempt) % len(self.records)]
            try:
                images = self._load(record)
            except (FileNotFoundError, ValueError):
                if self.on_bad_sample == "error":
                    raise
                self.skipped += 1
                continue
            rng = random.Random(f"{self.seed}-{self.epoch}-{index}")
            return self._item(record, square_crop(images, self.resolution, self.random_crop, self.hflip, rng))
        raise ValueError(self.all_failed)


class PreferencePairDataset(ImageRecordDataset):
    no_records = "no preference pairs to train on"
    all_failed = "every preference pair failed to load"

    def _load(self, record: PairRecord) -> Tensor:
        chosen = load_image(record.chosen, record.where)
        rejected = load_image(record.rejected, record.where)
        if chosen.shape != rejected.shape:  # resize the rejected to the chosen's size first
            rejected = F.interpolate(rejected[None], size=chosen.shape[-2:], mode="bilinear")[0]
        return torch.stack([chosen, rejected])

    def _item(self, record: PairRecord, images: Tensor) -> dict:
        return {
            "prompt": record.prompt,
            "chosen": images[0],
            "rejected": images[1],
            "label": record.label,
            "rewards": record.rewards,
        }


def collate_pairs(items: list[dict]) -> dict:
    """A batch of B pairs: ``prompts`` (list), ``chosen`` / ``rejected`` (B, 3, R, R), ``labels`` (B,)
    and ``chosen_rewards`` / ``rejected_rewards`` (B,) float64 (scores keep their precision), or
    None for unscored data (the reader makes a dataset all scored or all unscored)."""
    scored = items[0]["rewards"] is not None
    rewards = torch.tensor([it["rewards"] for it in items], dtype=torch.float64) if scored else None
    return {
        "prompts": [it["prompt"] for it in items],
        "chosen": torch.stack([it["chosen"] for it in items]),
        "rejected": torch.stack([it["rejected"] for it in items]),
        "labels": torch.tensor([it["label"] for it in items], dtype=torch.float32),
        "chosen_rewards": None if rewards is None else rewards[:, 0],
        "rejected_rewards": None if rewards is None else rewards[:, 1],
    }
