"""Images as tensors (float NCHW in [0, 1]): to PIL, sample grids, inpainting's masked images.

A masked image has two conventions, and each model must get the one it was built with:

- :func:`masked_for_inpainting`: grey (0.5) in the hole, what diffusers' inpainting pipelines
  encode into the UNet's masked-image channels (and what the demo world's examples hold);
- :func:`masked_for_reward`: black (0) in the hole, what PrefPaint's reward was trained on and
  what diffalign's Bradley-Terry inpainting reward trains and scores with.

Both take ``masks`` (N, 1, H, W) or (1, H, W), broadcast against the images, with the hole
where ``masks >= 0.5``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

__all__ = ["masked_for_inpainting", "masked_for_reward", "save_grid", "to_pil"]


def to_pil(images: Tensor) -> list[Image.Image]:
    """(N, 3, H, W) in [0, 1] to 8-bit RGB images (rounded, as PIL stores them)."""
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(a) for a in pixels.permute(0, 2, 3, 1).cpu().numpy()]


def save_grid(rows: list[Tensor], path: str | Path, scale: int = 1) -> None:
    """Save rows of images (each (k, 3, H, W), equal k) as one PNG, enlarged ``scale`` times."""
    grid = torch.cat([torch.cat(list(row), dim=2) for row in rows], dim=1)
    (image,) = to_pil(grid[None])
    if scale != 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    image.save(path)


def masked_for_inpainting(images: Tensor, masks: Tensor) -> Tensor:
    """The masked image an inpainting UNet is given: grey (0.5) where ``masks >= 0.5``, the image
    elsewhere. Diffusers' ``StableDiffusionInpaintPipeline.__call__`` computes
    ``init_image * (mask_condition < 0.5)`` on the image normalised to [-1, 1]: 0 there is 0.5
    in [0, 1]."""
    return torch.where(masks >= 0.5, 0.5, images)


def masked_for_reward(images: Tensor, masks: Tensor) -> Tensor:
    """The masked input an inpainting reward scores beside the result: black (0) where
    ``masks >= 0.5``, the image elsewhere. PrefPaint's reward was trained on this (official
    ``InpaintRewardDataset.py``: ``color = (1 - mask) * color`` with the 8-bit mask thresholded
    at 125, i.e. 0.49; binary masks agree with 0.5). Not the grey :func:`masked_for_inpainting`."""
    return torch.where(masks >= 0.5, 0.0, images)
