"""The demo world's "human" preference, computed from pixels: bigger shapes, clean background.

``demo_size``: ``area / max_area - 2 * mess - 3 * max(area - max_area, 0) / max_area`` where
``area`` is the fraction of pixels close to the prompt's colour, ``max_area`` that of the
largest shape of the prompt's kind the world draws, and ``mess`` the mean distance of each
pixel to the nearer of the prompt's colour and the background. Shortcuts do not pay:
brightening or tinting the background raises ``mess`` (+0.1 on the background costs more than a
whole radius step gains); painting the canvas in the prompt's colour overshoots ``max_area`` and
scores below the smallest honest shape. The weights are no larger than that needs: at 4 x
``mess`` the base model's own sampling noise (mean ``mess`` ~0.08, against 0.02-0.04 for real
images) outweighed a 20-point gain in size, and at 8 x overshoot a shape 10% past the largest
size scored below one at 40% of it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffalign.demo.world import BACKGROUND, COLOURS, RADIUS, SHAPES, SIZE, parse, shape_masks
from diffalign.rewards import RewardModel


def _max_areas() -> dict[str, float]:
    """Pixel fraction of each shape at the largest radius the world draws."""
    centre = torch.full((len(SHAPES),), SIZE / 2)
    masks = shape_masks(list(SHAPES), centre, centre, torch.full_like(centre, RADIUS[1]))
    return dict(zip(SHAPES, masks.mean(dim=(1, 2, 3)).tolist(), strict=True))


MAX_AREA = _max_areas()


class DemoShapeSize(RewardModel):
    needs_prompts = True
    differentiable = True

    def score(self, images: Tensor, prompts: list[str] | None) -> Tensor:
        parsed = [parse(p) for p in prompts]
        colour = torch.tensor([COLOURS[c] for c, _ in parsed], device=images.device)[:, :, None, None]
        max_area = torch.tensor([MAX_AREA[s] for _, s in parsed], device=images.device)
        background = torch.tensor(BACKGROUND, device=images.device)[None, :, None, None]
        to_colour = (images - colour).norm(dim=1)
        to_background = (images - background).norm(dim=1)
        area = torch.sigmoid((0.25 - to_colour) / 0.05).mean(dim=(1, 2))
        mess = torch.minimum(to_colour, to_background).mean(dim=(1, 2))
        return area / max_area - 2 * mess - 3 * torch.relu(area - max_area) / max_area
