"""Images as tensors (float NCHW in [0, 1]): to PIL, sample grids, inpainting's masked images."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

__all__ = ["mask_out", "save_grid", "to_pil"]


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


def mask_out(images: Tensor, masks: Tensor) -> Tensor:
    """The masked image an inpainting model is given: grey (0.5) where ``masks`` >= 0.5. Diffusers'
    inpaint pipelines zero the normalised ([-1, 1]) image there, which is grey in [0, 1]."""
    return torch.where(masks >= 0.5, 0.5, images)
