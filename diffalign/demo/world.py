"""The embedded world: 16x16 images of one shape, drawn from a text prompt.

A prompt is ``"a {colour} {shape}"`` with 4 colours and 3 shapes (circle, ring, cross: 12
classes). An image is the shape, in its colour, near the centre (within 1 px) with a random size
(radius 3-6 px), on a fixed dark grey background. The inpainting variant (``World.inpainting``)
hides a random box over part of the shape. Everything is generated from a seed; nothing is
stored or downloaded. The shapes differ in topology rather than in outline (a disc, an
annulus, a plus sign) because at 16x16 a small model blurs a square or a triangle into a disc.

The "human" preference of the demo (``diffalign_rewards.demo``): bigger shapes are better, up
to the largest the world draws, on a clean background.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor

from diffalign.images import masked_for_inpainting

__all__ = [
    "BACKGROUND",
    "COLOURS",
    "SHAPES",
    "SIZE",
    "InpaintingExamples",
    "World",
    "class_of",
    "fingerprint",
    "prompts",
    "shape_masks",
]

SIZE = 16
BACKGROUND = (0.2, 0.2, 0.2)
COLOURS = {
    "red": (0.9, 0.15, 0.15),
    "green": (0.15, 0.8, 0.2),
    "blue": (0.2, 0.35, 0.95),
    "yellow": (0.95, 0.85, 0.15),
}
SHAPES = ("circle", "ring", "cross")
RADIUS = (3.0, 6.0)  # below 3 px a ring has no hole
RING_WIDTH = 1.6
JITTER = 1.0


def fingerprint() -> str:
    """Identifies everything that defines the world (cache keys of models trained on it)."""
    spec = (SIZE, BACKGROUND, sorted(COLOURS.items()), SHAPES, RADIUS, RING_WIDTH, JITTER, 2)
    return hashlib.sha256(repr(spec).encode()).hexdigest()[:8]


def prompts() -> list[str]:
    return [f"a {c} {s}" for c in COLOURS for s in SHAPES]


def class_of(prompt: str) -> int:
    """Index of a prompt's (colour, shape) class in ``prompts()``."""
    return prompts().index(prompt)


def parse(prompt: str) -> tuple[str, str]:
    words = prompt.split()
    if len(words) != 3 or words[1] not in COLOURS or words[2] not in SHAPES:
        raise ValueError(f"not a prompt of the demo world: {prompt!r} (expected 'a <colour> <shape>')")
    return words[1], words[2]


def shape_masks(shapes: list[str], cx: Tensor, cy: Tensor, r: Tensor, size: int = SIZE) -> Tensor:
    """Anti-aliased masks (N, 1, size, size) in [0, 1] (4x4 supersampling)."""
    n, s = len(shapes), 4
    coords = (torch.arange(size * s, dtype=torch.float32) + 0.5) / s
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    dx, dy = xx[None] - cx[:, None, None], yy[None] - cy[:, None, None]
    rr = r[:, None, None]
    d = (dx**2 + dy**2).sqrt()
    circle = d <= rr
    ring = (d <= rr) & (d >= rr - RING_WIDTH)
    arm = 0.35 * rr
    cross = ((dx.abs() <= arm) & (dy.abs() <= rr)) | ((dy.abs() <= arm) & (dx.abs() <= rr))
    kind = torch.tensor([SHAPES.index(sh) for sh in shapes])[:, None, None]
    fine = torch.where(kind == 0, circle, torch.where(kind == 1, ring, cross)).float()
    return fine.reshape(n, size, s, size, s).mean(dim=(2, 4))[:, None]


@dataclass
class InpaintingExamples:
    """What an inpainting model sees and should restore. ``masked_images`` are the UNet's input,
    grey (0.5) under the mask (:func:`~diffalign.images.masked_for_inpainting`, as diffusers'
    inpainting pipelines prepare them); an inpainting reward takes
    :func:`~diffalign.images.masked_for_reward` (black) instead."""

    images: Tensor  # (N, 3, SIZE, SIZE) in [0, 1]: the full pictures
    masks: Tensor  # (N, 1, SIZE, SIZE), 1 where the model paints
    masked_images: Tensor
    prompts: list[str]


@dataclass
class World:
    seed: int = 0

    def sample(
        self, prompt_list: list[str], generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Images (N, 3, 16, 16) in [0, 1] for the prompts, and their radii (N,)."""
        g = generator or torch.Generator().manual_seed(self.seed)
        n = len(prompt_list)
        parsed = [parse(p) for p in prompt_list]
        r = RADIUS[0] + (RADIUS[1] - RADIUS[0]) * torch.rand(n, generator=g)
        cx = SIZE / 2 + JITTER * (2 * torch.rand(n, generator=g) - 1)
        cy = SIZE / 2 + JITTER * (2 * torch.rand(n, generator=g) - 1)
        masks = shape_masks([s for _, s in parsed], cx, cy, r)
        colour = torch.tensor([COLOURS[c] for c, _ in parsed])[:, :, None, None]
        background = torch.tensor(BACKGROUND)[None, :, None, None]
        return masks * colour + (1 - masks) * background, r

    def inpainting(self, n: int, generator: torch.Generator) -> InpaintingExamples:
        """``n`` pictures with uniformly drawn prompts, each with a square hole of side 5-9 px that
        contains the centre pixel, so that it always hides part of the shape."""
        images, chosen = self.dataset(n, generator)
        side = torch.randint(5, 10, (n,), generator=generator)
        x0, y0 = (SIZE // 2 - (torch.rand(n, generator=generator) * side).long() for _ in range(2))
        pos = torch.arange(SIZE)
        inside_x = (pos[None] >= x0[:, None]) & (pos[None] < (x0 + side)[:, None])
        inside_y = (pos[None] >= y0[:, None]) & (pos[None] < (y0 + side)[:, None])
        masks = (inside_y[:, :, None] & inside_x[:, None, :]).float()[:, None]
        return InpaintingExamples(images, masks, masked_for_inpainting(images, masks), chosen)

    def dataset(self, n: int, generator: torch.Generator) -> tuple[Tensor, list[str]]:
        """``n`` images with uniformly drawn prompts."""
        all_prompts = prompts()
        idx = torch.randint(len(all_prompts), (n,), generator=generator).tolist()
        chosen = [all_prompts[i] for i in idx]
        return self.sample(chosen, generator)[0], chosen
