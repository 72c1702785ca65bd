"""JPEG (in)compressibility (DDPO, Black et al. 2023): the size of the image saved as JPEG at
quality 95, in kB; ``jpeg_compressibility`` is its negative. No weights, not differentiable."""

from __future__ import annotations

import io

import torch
from torch import Tensor

from diffalign.images import to_pil
from diffalign.rewards import RewardModel


def jpeg_kilobytes(images: Tensor, quality: int = 95) -> Tensor:
    sizes = []
    for image in to_pil(images):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


class JpegCompressibility(RewardModel):
    """``-kB`` of the JPEG (quality 95): higher for simpler images."""

    def __init__(self, quality: int = 95) -> None:
        super().__init__()
        self.quality = quality

    def score(self, images: Tensor, prompts: list[str] | None) -> Tensor:
        return -jpeg_kilobytes(images, self.quality)


class JpegIncompressibility(JpegCompressibility):
    """``+kB`` of the JPEG (quality 95): higher for more detailed images."""

    def score(self, images: Tensor, prompts: list[str] | None) -> Tensor:
        return jpeg_kilobytes(images, self.quality)
