"""The demo world's "human" preference, computed from pixels: bigger shapes, clean background.

``demo_size``: ``area / max_area - 4 * mess - 8 * max(area - max_area, 0) / max_area`` where
``area`` is the fraction of pixels close to the prompt's colour, ``max_area`` that of the
largest shape the world draws, and ``mess`` the mean distance of each pixel to the nearer of
the prompt's colour and the background. Shortcuts do not pay: brightening or tinting the
background raises ``mess``; painting the canvas in the prompt's colour overshoots ``max_area``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffalign.demo.world import BACKGROUND, COLOURS, RADIUS, SIZE, parse
from diffalign.rewards import RewardModel

MAX_AREA = math.pi * RADIUS[1] ** 2 / SIZE**2


class DemoShapeSize(RewardModel):
    needs_prompts = True
    differentiable = True

    def score(self, images: Tensor, prompts: list[str] | None) -> Tensor:
        colour = torch.tensor([COLOURS[parse(p)[0]] for p in prompts], device=images.device)[:, :, None, None]
        background = torch.tensor(BACKGROUND, device=images.device)[None, :, None, None]
        to_colour = (images - colour).norm(dim=1)
        to_background = (images - background).norm(dim=1)
        area = torch.sigmoid((0.25 - to_colour) / 0.05).mean(dim=(1, 2))
        mess = torch.minimum(to_colour, to_background).mean(dim=(1, 2))
        return area / MAX_AREA - 4 * mess - 8 * torch.relu(area - MAX_AREA) / MAX_AREA
