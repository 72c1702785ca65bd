"""The embedded world: 16x16 images of one filled shape, drawn from a text prompt.

A prompt is ``"a {colour} {shape}"`` with 4 colours and 3 shapes (12 classes). An image is the
shape, in its colour, at a random position with a random size (radius 3-6 px), on a fixed dark
grey background. Everything is generated from a seed; nothing is stored or downloaded.

The "human" preference of the demo (``diffalign_rewards.demo``): bigger shapes are better, up
to the largest the world draws, on a clean background.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["BACKGROUND", "COLOURS", "SHAPES", "SIZE", "World", "class_of", "prompts"]

SIZE = 16
BACKGROUND = (0.2, 0.2, 0.2)
COLOURS = {
    "red": (0.9, 0.15, 0.15),
    "green": (0.15, 0.8, 0.2),
    "blue": (0.2, 0.35, 0.95),
    "yellow": (0.95, 0.85, 0.15),
}
SHAPES = ("circle", "square", "triangle")
RADIUS = (3.0, 6.0)  # below 3 px a circle and a square are hard to tell apart at 16x16


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
    circle = dx**2 + dy**2 <= rr**2
    square = (dx.abs() <= rr * 0.886) & (dy.abs() <= rr * 0.886)  # the circle's area
    # an upward triangle inscribed in the circle of radius 1.2 r (about the circle's area)
    t = 1.2 * rr
    triangle = (dy <= t * 0.5) & (dy >= -t) & (dx.abs() <= (dy + t) / (1.5 * t) * (t * 0.866))
    kind = torch.tensor([SHAPES.index(sh) for sh in shapes])[:, None, None]
    fine = torch.where(kind == 0, circle, torch.where(kind == 1, square, triangle)).float()
    return fine.reshape(n, size, s, size, s).mean(dim=(2, 4))[:, None]


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
        margin = r + 1.0
        cx = margin + (SIZE - 2 * margin) * torch.rand(n, generator=g)
        cy = margin + (SIZE - 2 * margin) * torch.rand(n, generator=g)
        masks = shape_masks([s for _, s in parsed], cx, cy, r)
        colour = torch.tensor([COLOURS[c] for c, _ in parsed])[:, :, None, None]
        background = torch.tensor(BACKGROUND)[None, :, None, None]
        return masks * colour + (1 - masks) * background, r

    def dataset(self, n: int, generator: torch.Generator) -> tuple[Tensor, list[str]]:
        """``n`` images with uniformly drawn prompts."""
        all_prompts = prompts()
        idx = torch.randint(len(all_prompts), (n,), generator=generator).tolist()
        chosen = [all_prompts[i] for i in idx]
        return self.sample(chosen, generator)[0], chosen
