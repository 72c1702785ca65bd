"""Image preprocessing of each reward's official scoring code, reproduced step for step.

Every official scorer reads 8-bit images (files or PIL images), so each reward first rounds its
[0, 1] input to 8 bits as diffusers' ``numpy_to_pil`` does; then it runs its reference's own
steps, through the same library calls where the reference resamples in fixed point:

- :func:`openai_clip_pixels`: OpenAI CLIP's ``_transform`` (``clip.load``'s preprocess), used by
  the improved-aesthetic-predictor's ``simple_inference.py``, jmhessel's ``clipscore.py``,
  PrefPaint's ``InpaintReward.py`` and ImageReward: PIL bicubic resize of the shortest side
  (rounded to 8 bits), a centre crop that *rounds* its offset (torchvision's ``CenterCrop``).
- :func:`hf_processor_pixels`: a transformers image processor (PickScore's model card,
  torchmetrics' ``clip_score``); its centre crop floors the offset.
- :func:`hps_pixels`: hpsv2 1.2.0's ``ResizeMaxSize``: the 8-bit image to a float tensor, then a
  bicubic antialiased resize of the longest side on the tensor (no rounding, no clamp), zero
  padding to a square, normalisation.

With ``differentiable=True`` the PIL and processor steps are replaced by the same steps on float
tensors, with straight-through rounding where the reference rounds: the forward values then
differ from the exact path by at most one 8-bit level at some pixels, and gradients flow.
"""

from __future__ import annotations

import torch
import torchvision.transforms.functional as tvF
from torch import Tensor
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

from diffalign.images import to_pil
from diffalign.rewards import CLIP_MEAN, CLIP_STD


def quantize(images: Tensor) -> Tensor:
    """[0, 1] float32 images rounded to 8 bits (values k / 255), with a straight-through gradient."""
    x = images.float().clamp(0, 1)
    return x + ((x * 255).round() / 255 - x).detach()


def normalize(pixels: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    return tvF.normalize(pixels, list(mean), list(std))


def openai_clip_pixels(images: Tensor, size: int, differentiable: bool = False) -> Tensor:
    """(N, 3, H, W) in [0, 1] -> (N, 3, size, size) float32, as OpenAI CLIP's preprocess sees the
    8-bit image (source: openai/CLIP ``clip/clip.py::_transform``)."""
    if not differentiable:
        transform = Compose(
            [
                Resize(size, interpolation=InterpolationMode.BICUBIC),
                CenterCrop(size),
                ToTensor(),
                Normalize(CLIP_MEAN, CLIP_STD),
            ]
        )
        return torch.stack([transform(image) for image in to_pil(images)]).to(images.device)
    x = tvF.resize(quantize(images), [size], InterpolationMode.BICUBIC, antialias=True)
    return normalize(tvF.center_crop(quantize(x), [size, size]), CLIP_MEAN, CLIP_STD)


def hf_processor_pixels(images: Tensor, processor: object, differentiable: bool = False) -> Tensor:
    """(N, 3, H, W) in [0, 1] -> the ``pixel_values`` a transformers CLIP image processor makes
    of the 8-bit images (shortest side to ``size``, centre crop with a floored offset, rescale,
    normalise), float32."""
    if not differentiable:
        return processor(images=to_pil(images), return_tensors="pt")["pixel_values"].float().to(images.device)
    short = processor.size["shortest_edge"]
    crop_h, crop_w = processor.crop_size["height"], processor.crop_size["width"]
    x = quantize(tvF.resize(quantize(images), [short], InterpolationMode.BICUBIC, antialias=True))
    top, left = (x.shape[-2] - crop_h) // 2, (x.shape[-1] - crop_w) // 2
    x = x[..., top : top + crop_h, left : left + crop_w]
    return normalize(x, tuple(processor.image_mean), tuple(processor.image_std))


def hps_pixels(images: Tensor, size: int) -> Tensor:
    """(N, 3, H, W) in [0, 1] -> (N, 3, size, size) float32 as hpsv2 1.2.0 preprocesses (source:
    ``hpsv2/src/open_clip/transform.py::ResizeMaxSize`` with ``fill=0``). Differentiable.

    The official transform skips resizing *and padding* when the longest side already equals
    ``size``, which fails on a non-square image of that size; here it pads (the only output
    the model accepts), and equals the official output wherever that one exists.
    """
    x = quantize(images)
    h, w = x.shape[-2:]
    scale = size / float(max(h, w))
    new_h, new_w = round(h * scale), round(w * scale)
    if (new_h, new_w) != (h, w):
        x = tvF.resize(x, [new_h, new_w], InterpolationMode.BICUBIC, antialias=True)
    pad_h, pad_w = size - new_h, size - new_w
    x = tvF.pad(x, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
    return normalize(x, CLIP_MEAN, CLIP_STD)
