"""Image preprocessing of each reward's official scoring code, reproduced step for step.

Every official scorer reads 8-bit images (files or PIL images), so each reward first rounds its
[0, 1] input to 8 bits as diffusers' ``numpy_to_pil`` does; then it runs its reference's steps:

- :func:`clip_pixels` with ``crop="round"``: OpenAI CLIP's ``_transform`` (``clip.load``'s
  preprocess), used by the improved-aesthetic-predictor's ``simple_inference.py``, jmhessel's
  ``clipscore.py``, PrefPaint's ``InpaintReward.py`` and ImageReward: PIL bicubic resize of the
  shortest side (8-bit), a centre crop whose offset is *rounded* (torchvision's ``CenterCrop``).
- :func:`clip_pixels` with ``crop="floor"``: transformers' PIL-backed ``CLIPImageProcessor``
  (transformers 4's default, which the PickScore model card and torchmetrics' ``clip_score`` ran;
  transformers 5 defaults to a torchvision backend that resamples differently): the same resize,
  a centre crop whose offset is *floored*.
- :func:`hps_pixels`: hpsv2 1.2.0's ``ResizeMaxSize``: the 8-bit image to a float tensor, then a
  bicubic antialiased resize of the longest side on the tensor (no rounding, no clamp), zero
  padding to a square, normalisation.

With ``differentiable=True`` PIL's resize is replaced by the same two passes on float tensors
(horizontal, then vertical, each rounded to 8 bits with a straight-through gradient). PIL works
in fixed point, so some pixels land one or two 8-bit levels apart (measured on smooth images);
for some shapes Pillow runs the vertical pass first, and then up to 13 levels differ on noise
(measured resizing 300x700 to 224x522).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torchvision.transforms.functional as tvF
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode

from diffalign.images import to_pil
from diffalign.rewards import CLIP_MEAN, CLIP_STD, RewardInputError


def quantize(images: Tensor) -> Tensor:
    """[0, 1] float32 images clamped and rounded to 8 bits (values k / 255); the gradient passes
    straight through both, at pixels on the bounds too."""
    x = images.float()
    return x + ((x.clamp(0, 1) * 255).round() / 255 - x).detach()


def normalize(pixels: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    return tvF.normalize(pixels, list(mean), list(std))


def shortest_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Output (height, width) when the shortest side goes to ``size``; the long side is floored,
    as torchvision's ``Resize(int)`` and transformers' ``get_resize_output_image_size`` do."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def pil_bicubic(images: Tensor, height: int, width: int, differentiable: bool) -> Tensor:
    """8-bit bicubic resize as PIL's ``Image.resize`` (float32 in [0, 1], values k / 255)."""
    if not differentiable:
        arrays = [np.asarray(im.resize((width, height), Image.Resampling.BICUBIC)) for im in to_pil(images)]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(255).to(images.device)
    x = quantize(images)
    if x.shape[-1] != width:
        x = quantize(tvF.resize(x, [x.shape[-2], width], InterpolationMode.BICUBIC, antialias=True))
    if x.shape[-2] != height:
        x = quantize(tvF.resize(x, [height, width], InterpolationMode.BICUBIC, antialias=True))
    return x


def clip_pixels(
    images: Tensor,
    size: int,
    crop: Literal["round", "floor"],
    differentiable: bool = False,
    crop_size: tuple[int, int] | None = None,
    mean: tuple[float, ...] = CLIP_MEAN,
    std: tuple[float, ...] = CLIP_STD,
) -> Tensor:
    """(N, 3, H, W) in [0, 1] -> (N, 3, crop_h, crop_w) float32: shortest side to ``size`` (PIL
    bicubic, 8-bit), centre crop (``crop_size``, default ``size`` square) with the offset
    ``"round"``-ed (OpenAI CLIP, source: openai/CLIP ``clip/clip.py::_transform``) or
    ``"floor"``-ed (transformers' ``CLIPImageProcessor``), normalised.

    Raises:
        RewardInputError: an image too thin to resize (a side would become 0 pixels).
    """
    crop_h, crop_w = crop_size or (size, size)
    height, width = shortest_side_size(*images.shape[-2:], size)
    x = pil_bicubic(images, height, width, differentiable)
    if crop == "round":
        x = tvF.center_crop(x, [crop_h, crop_w])
    else:
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        x = x[..., top : top + crop_h, left : left + crop_w]
    return normalize(x, mean, std)


def hf_processor_pixels(images: Tensor, processor: object, differentiable: bool = False) -> Tensor:
    """:func:`clip_pixels` with a transformers CLIP image processor's settings (shortest edge,
    crop size, mean and std) and its floored crop."""
    crop_size = (processor.crop_size["height"], processor.crop_size["width"])
    return clip_pixels(
        images,
        processor.size["shortest_edge"],
        "floor",
        differentiable,
        crop_size,
        tuple(processor.image_mean),
        tuple(processor.image_std),
    )


def hps_pixels(images: Tensor, size: int) -> Tensor:
    """(N, 3, H, W) in [0, 1] -> (N, 3, size, size) float32 as hpsv2 1.2.0 preprocesses (source:
    ``hpsv2/src/open_clip/transform.py::ResizeMaxSize`` with ``fill=0``). Differentiable.

    Raises:
        RewardInputError: an image so thin that a side would become 0 pixels.

    The official transform skips resizing *and padding* when the longest side already equals
    ``size``, which fails on a non-square image of that size; here it pads (the only output
    the model accepts), and equals the official output wherever that one exists.
    """
    x = quantize(images)
    h, w = x.shape[-2:]
    scale = size / float(max(h, w))
    new_h, new_w = round(h * scale), round(w * scale)
    if min(new_h, new_w) < 1:
        raise RewardInputError(f"images of {h}x{w} pixels cannot be resized for scoring")
    if (new_h, new_w) != (h, w):
        x = tvF.resize(x, [new_h, new_w], InterpolationMode.BICUBIC, antialias=True)
    pad_h, pad_w = size - new_h, size - new_w
    x = tvF.pad(x, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
    return normalize(x, CLIP_MEAN, CLIP_STD)
