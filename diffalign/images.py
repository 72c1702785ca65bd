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

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

__all__ = ["from_pil", "masked_for_inpainting", "masked_for_reward", "paste_unmasked", "save_grid", "to_pil"]

_WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit greys (32-bit "I": older Pillow's 16-bit PNGs)


def from_pil(image: Image.Image, grey: bool = False, size: int | None = None) -> Tensor:
    """An image as it is displayed, as float (3, H, W), or (1, H, W) with ``grey``, in [0, 1],
    resized (bicubic) to ``size`` x ``size`` when given.

    Where PIL's ``convert`` alone goes wrong: the EXIF orientation is applied (a phone's portrait
    photo stays upright); 16-bit greys are scaled from 0-65535 (``convert`` clips them at 255, so
    most pixels turn white; 32-bit ``I`` is taken as 16-bit and clipped); float ``F`` images are
    taken as [0, 1] and clipped; transparency (RGBA, LA, a palette's or a colour's transparent
    key) is composited over white (``convert`` drops alpha and shows whatever colour transparent
    pixels hold, often black). CMYK, YCbCr, 1-bit and palette images go through ``convert``.

    Raises whatever PIL raises for image data it cannot decode (``OSError``, ``ValueError``).
    """
    image = ImageOps.exif_transpose(image)
    if image.mode in _WIDE_GREY or image.mode == "F":
        scale = 65535.0 if image.mode in _WIDE_GREY else 1.0
        image = Image.fromarray(np.asarray(image, dtype=np.float32) / scale)  # mode F
    elif image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA")).convert("L" if grey else "RGB")
    else:
        image = image.convert("L" if grey else "RGB")
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    if image.mode == "F":
        values = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).clamp(0, 1)[None]
        return values if grey else values.expand(3, -1, -1).clone()
    tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
    return tensor[None] if grey else tensor.permute(2, 0, 1).contiguous()


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


def paste_unmasked(samples: Tensor, originals: Tensor, masks: Tensor) -> Tensor:
    """Inpaintings as a user receives them: ``samples`` (N, 3, H, W) where ``masks`` (N, 1, H, W)
    ``>= 0.5``, the input ``originals`` (N, 3, H, W) exactly elsewhere (what diffusers'
    ``VaeImageProcessor.apply_overlay`` does for an inpainting pipeline's output). An inpainting
    UNet regenerates the whole image, so without this its changes outside the hole reach a reward
    although no user keeps them."""
    return torch.where(masks.to(samples.device) >= 0.5, samples, originals.to(samples.device, samples.dtype))
