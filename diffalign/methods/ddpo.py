"""DDPO (Black et al., ICLR 2024): align any SD/SDXL pipeline to any registry reward by online RL.

DDPO_IS, the importance-sampled clipped variant, as the official kvablack/ddpo-pytorch
``scripts/train.py`` runs it (the paper's equation numbers are not checked here). For each loader
batch of prompts (``data.path``: a ``.txt`` file, one prompt per line, or rows with ``prompt``):

1. sample each prompt with DDIM (50 steps, eta 1, guidance 5) and record every step's latents
   and log-prob;
2. score the images with the reward (``method_options.reward``: ``jpeg_compressibility``,
   ``aesthetic``, ``pickscore``, ... any registry name);
3. advantages per prompt by DDPO's stat tracker (buffer 16, min count 16);
4. for each sample, each of its steps in random order, the clipped surrogate (``ppo_clip``: clip
   1e-4, advantages clipped to 5), one backward per step;

with :mod:`diffalign.methods.policy_gradient` doing every step. Defaults: DDPO's ``config/base.py``
(LoRA on the attention projections, lr 3e-4, AdamW weight decay 1e-4, gradient norm clip 1); its
published runs (``config/dgx.py``) are ``configs/ddpo/sd15.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor
from torch.utils.data import Dataset

from diffalign.data.prompts import PromptDataset, collate_prompts, read_prompts
from diffalign.diffusion.policy import UNET_ATTENTION_PROJECTIONS
from diffalign.methods.policy_gradient import PolicyGradientMethod, PolicyGradientOptions

__all__ = ["DDPO", "DDPOOptions"]


@dataclass
class DDPOOptions(PolicyGradientOptions):
    """The RL core's options at DDPO's defaults (``config/base.py``)."""


class DDPO(PolicyGradientMethod):
    defaults: ClassVar[dict[str, Any]] = {
        "objective": {"name": "ppo_clip", "clip_range": 1e-4, "advantage_clip": 5.0},
        "optim": {"lr": 3e-4, "scale_lr": False, "weight_decay": 1e-4, "warmup_steps": 0},
        "data": {"resolution": 512},
        "model": {"lora": {"target_modules": list(UNET_ATTENTION_PROJECTIONS)}},
    }
    options_class = DDPOOptions

    def read_data(self) -> None:
        """The prompts of ``data.path``; ``ValueError`` / ``FileNotFoundError`` naming the file."""
        self.prompts = read_prompts(self.cfg.data.path, self.cfg.data.split)

    def dataset(self) -> tuple[Dataset, Any]:
        return PromptDataset(self.prompts), collate_prompts

    def rollout_inputs(self, batch: dict[str, list[str]]) -> tuple[list[str], Tensor | None, Tensor | None]:
        return batch["prompts"], None, None
