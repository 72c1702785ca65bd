"""A torch Dataset of preference pairs, with the image transforms of Diffusion-DPO's training.

Each item is ``{"prompt", "chosen", "rejected", "label", "rewards"}`` with images float (3, R, R) in [0, 1]
and ``rewards`` the record's (chosen, rejected) reward scores or None:
resized so the short side is R (bilinear, as the official script), cropped to R x R (center or
random), and flipped horizontally with probability 1/2 (the same flip and crop for both images
of a pair, so that they stay comparable). Bad rows (missing or corrupt images) raise an error
naming the row (``on_bad_sample="error"``) or are replaced by another row and counted
(``"skip"``): ``dataset.skipped`` is the number seen so far in this process.

Crops and flips are drawn from a generator seeded by (seed, epoch, index), not from the global
RNG: an item's augmentation does not depend on when it is loaded, so a resumed run sees exactly
the batches the interrupted run would have.
"""

from __future__ import annotations

import random
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from diffalign.data.preference import PairRecord, load_image

__all__ = ["PreferencePairDataset", "collate_pairs"]


class PreferencePairDataset(Dataset):
    def __init__(
        self,
        records: list[PairRecord],
        resolution: int,
        random_crop: bool = False,
        hflip: bool = True,
        on_bad_sample: Literal["error", "skip"] = "error",
        seed: int = 0,
    ) -> None:
        if not records:
            raise ValueError("no preference pairs to train on")
        self.records, self.resolution = records, resolution
        self.random_crop, self.hflip, self.on_bad_sample = random_crop, hflip, on_bad_sample
        self.seed, self.epoch, self.skipped = seed, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def _transform(self, images: Tensor, rng: random.Random) -> Tensor:
        r = self.resolution
        h, w = images.shape[-2:]
        scale = r / min(h, w)
        size = (max(r, round(h * scale)), max(r, round(w * scale)))
        if size != (h, w):
            images = F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
        top = rng.randint(0, size[0] - r) if self.random_crop else (size[0] - r) // 2
        left = rng.randint(0, size[1] - r) if self.random_crop else (size[1] - r) // 2
        images = images[..., top : top + r, left : left + r]
        if self.hflip and rng.random() < 0.5:
            images = images.flip(-1)
        return images.clamp(0, 1)

    def __getitem__(self, index: int) -> dict:
        for attempt in range(len(self.records)):
            record = self.records[(index + attempt) % len(self.records)]
            try:
                chosen = load_image(record.chosen, record.where)
                rejected = load_image(record.rejected, record.where)
            except (FileNotFoundError, ValueError):
                if self.on_bad_sample == "error":
                    raise
                self.skipped += 1
                continue
            if chosen.shape != rejected.shape:  # resize the rejected to the chosen's size first
                rejected = F.interpolate(rejected[None], size=chosen.shape[-2:], mode="bilinear")[0]
            rng = random.Random(f"{self.seed}-{self.epoch}-{index}")
            pair = self._transform(torch.stack([chosen, rejected]), rng)
            return {
                "prompt": record.prompt,
                "chosen": pair[0],
                "rejected": pair[1],
                "label": record.label,
                "rewards": record.rewards,
            }
        raise ValueError("every preference pair failed to load")


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
