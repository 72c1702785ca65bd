"""Rewards for the RL tests, loaded by path (``rl_rewards:Brightness``) as a user's own class is."""

from __future__ import annotations

import torch
from torch import Tensor

from diffalign.rewards import RewardModel


class Brightness(RewardModel):
    """Mean pixel value: differentiable, no weights, no prompts needed."""

    def score(self, images: Tensor, prompts: list[str] | None) -> Tensor:
        return images.mean(dim=(1, 2, 3))


class BrightnessDigit(RewardModel):
    """The fourth decimal digit of the mean pixel value (0 to 9): the random tiny pipeline's images
    differ in brightness by 1e-4, and standardising rewards that close amplifies float rounding;
    whole-unit rewards keep the test of two runs' equality about the code, not the rounding."""

    def score(self, images: Tensor, prompts: list[str] | None) -> Tensor:
        return torch.floor(images.mean(dim=(1, 2, 3)).double() * 1e4).remainder(10).float()


class NanForRed(RewardModel):
    """Brightness, but NaN for every prompt that names red (a reward model that fails on some inputs)."""

    needs_prompts = True

    def score(self, images: Tensor, prompts: list[str] | None) -> Tensor:
        scores = images.mean(dim=(1, 2, 3))
        red = torch.tensor(["red" in p for p in prompts], device=images.device)
        return torch.where(red, torch.full_like(scores, float("nan")), scores)


class HoleFeatures(RewardModel):
    """An inpainting reward with PrefPaint's interface: features (N, 4) of the hole's mean colour and
    brightness, a score, and a V^-1 (identity x 10)."""

    needs_masks = True
    masked_fill = 0.0

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("v_inverse", 10 * torch.eye(4))

    def scores_and_features(
        self, images: Tensor, masks: Tensor, masked_images: Tensor
    ) -> tuple[Tensor, Tensor]:
        hole = (images * masks).sum(dim=(2, 3)) / masks.sum(dim=(2, 3)).clamp(min=1)
        features = torch.cat([hole, hole.mean(1, keepdim=True)], 1)
        return features[:, 3], features

    def score_with_features(
        self, images: Tensor, masks: Tensor, masked_images: Tensor
    ) -> tuple[Tensor, Tensor]:
        return self.scores_and_features(images, masks, masked_images)

    def score(
        self, images: Tensor, prompts: list[str] | None, masks: Tensor, masked_images: Tensor
    ) -> Tensor:
        return self.scores_and_features(images, masks, masked_images)[0]
