"""ImageReward (Xu et al. 2023), through the ``image-reward`` package when it is installed."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from diffalign.images import to_pil
from diffalign.rewards import RewardModel


class ImageRewardModel(RewardModel):
    """BLIP-based ImageReward; scores are the package's z-normalised rewards.

    ``model``: ``"ImageReward-v1.0"`` or a local checkpoint path, as ``ImageReward.load`` takes.
    """

    needs_prompts = True

    def __init__(
        self, model: str | Path = "ImageReward-v1.0", device: str | torch.device | None = None
    ) -> None:
        super().__init__()
        try:
            import ImageReward
        except ImportError as err:
            raise RuntimeError(
                "the 'imagereward' reward needs the image-reward package: pip install image-reward "
                "(its BLIP weights then load from a local path or its hub id)"
            ) from err
        self._device = torch.device(device or "cpu")
        self.model = ImageReward.load(str(model), device=str(self._device))

    @property
    def device(self) -> torch.device:
        return self._device

    def score(self, images: Tensor, prompts: list[str] | None) -> Tensor:
        scores = [float(self.model.score(p, im)) for p, im in zip(prompts, to_pil(images), strict=True)]
        return torch.tensor(scores, device=images.device)
