"""PrefPaint (Liu et al., NeurIPS 2024): align an inpainting model with human preference by RL,
each sample weighted by how far its reward can be trusted.

As the official Kenkenzaii/PrefPaint ``train_inpainting_model.py`` runs it (the paper's equation
numbers are not checked here), for each loader batch of masked images (``data.path``: rows of
``image``, ``mask``, optional ``prompt``; see :mod:`diffalign.data.inpainting`):

1. the old policy (synced after every 15th optimiser step) inpaints each image with DDIM (50
   steps, eta 1, guidance 7, the empty prompt unless rows carry one), recording each step;
2. the ``prefpaint`` reward scores each result beside its masked input (black in the hole) and
   returns its 256-d features f;
3. trust weights ``w = clamp(exp(-alpha ||f V^-1|| + beta), 1, w_max)`` (alpha 0.05, beta 0.7,
   w_max 2.21; :func:`trust_weights`), V^-1 the reward model's regularised inverse feature
   second moment saved beside its weights (``scripts/train_reward.py``, or the release's
   ``V_inverse.pt``): a sample whose features lie where the reward model saw much data counts
   up to ~2x, a novel one 1x;
4. advantages standardised over the batch gathered from every process, clipped to 10;
5. five random steps of each trajectory, each one backward of ``w x`` the clipped surrogate
   (``ppo_clip``, clip 1e-4).

with :mod:`diffalign.methods.policy_gradient` doing steps 1, 4 and 5. Deliberate differences from
the release: the reward scores each inpainting with the input pasted back outside the mask
(``keep_unmasked``, as ``InpaintingAligner.inpaint`` returns it; the release scores the UNet's raw
output, whose changes outside the hole no user keeps but a learned reward may pay for, and defines
a ``refine_inpaint`` that pastes back but never calls it); the reward model scores in eval mode
(the release leaves its dropout on); the loss is the batch mean, not the sum (AdamW is invariant
to that scale but for its epsilon); its L1 term to the old means (config weight 0.01, computed,
never added) is ``l1_weight``, 0 by default, and enters the loss when set; each sample draws its
own five steps (the release draws five for the whole batch); the optimiser steps after every
``gradient_accumulation_steps`` micro-batches (the release steps at every micro-batch of every
third iteration).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset

from diffalign.config import AT_LEAST_ONE, NON_NEGATIVE, Range
from diffalign.data.inpainting import InpaintingDataset, collate_inpainting, read_inpainting_examples
from diffalign.diffusion.policy import UNET_ATTENTION_PROJECTIONS
from diffalign.images import paste_unmasked
from diffalign.methods.policy_gradient import PolicyGradientMethod, PolicyGradientOptions
from diffalign.training.config import TrainConfig
from diffalign_rewards.prefpaint import trust_bounds

__all__ = ["PrefPaint", "PrefPaintOptions", "trust_weights"]


def trust_weights(
    features: Tensor, v_inverse: Tensor, alpha: float = 0.05, beta: float = 0.7, w_max: float = 2.21
) -> Tensor:
    """PrefPaint's per-sample weights (N,) in [1, w_max]: ``clamp(exp(-alpha b + beta), 1, w_max)``
    with the trust bound ``b = ||f V^-1||_2`` (:func:`~diffalign_rewards.prefpaint.trust_bounds`)
    of the reward features ``f`` (N, D) and ``v_inverse`` (D, D) (official
    ``train_inpainting_model.py``).

    Raises:
        ValueError: shapes that do not fit, or ``w_max`` < 1.
    """
    if features.dim() != 2 or v_inverse.shape != (features.shape[1], features.shape[1]):
        raise ValueError(
            f"trust weights need features (N, D) and V^-1 (D, D), got {tuple(features.shape)} and "
            f"{tuple(v_inverse.shape)}"
        )
    if not w_max >= 1:
        raise ValueError(f"w_max must be >= 1 (weights are clamped to [1, w_max]), got {w_max}")
    bound = trust_bounds(features, v_inverse.to(features.device))
    return torch.exp(-alpha * bound + beta).clamp(1.0, w_max)


@dataclass
class PrefPaintOptions(PolicyGradientOptions):
    """The RL core's options at the official config's values, and the trust weights'."""

    reward: str = field(default="prefpaint", metadata={"help": "registry reward (prefpaint: trust weights)"})
    advantages: Literal["batch", "per_prompt", "group"] = field(
        default="batch", metadata={"help": "standardise rewards over the batch, per prompt or per group"}
    )
    train_timesteps: int | None = field(default=5, metadata={"help": "sampler steps trained per trajectory"})
    sync_every: int = field(default=15, metadata={"help": "optimiser steps between old-policy syncs"})
    rollout_guidance: float = field(default=7.0, metadata={"help": "guidance scale of rollouts"})
    validation_guidance: float = field(default=7.0, metadata={"help": "guidance scale of validation grids"})
    keep_unmasked: bool = field(
        default=True, metadata={"help": "score inpaintings with the input pasted back outside the mask"}
    )
    trust_weights: bool = field(default=True, metadata={"help": "weight samples by the reward's trust"})
    trust_alpha: float = field(default=0.05, metadata={"help": "trust weight: scale of the bound"})
    trust_beta: float = field(default=0.7, metadata={"help": "trust weight: offset"})
    trust_max: float = field(default=2.21, metadata={"help": "trust weight: upper clamp (lower: 1)"})

    # weights are clamped to [1, trust_max]; a negative alpha would trust the least certain most
    ranges: ClassVar[dict[str, Range]] = {
        "trust_alpha": NON_NEGATIVE,
        "trust_beta": Range(),
        "trust_max": AT_LEAST_ONE,
    }


class PrefPaint(PolicyGradientMethod):
    inpainting = True
    # the official config's: lr 2e-6 constant (1 warmup step), AdamW weight decay 1e-2, full
    # fine-tuning of the UNet at 512 px
    defaults: ClassVar[dict[str, Any]] = {
        "objective": {"name": "ppo_clip", "clip_range": 1e-4, "advantage_clip": 10.0},
        "optim": {"lr": 2e-6, "scale_lr": False, "weight_decay": 1e-2, "warmup_steps": 0},
        "data": {"resolution": 512},
        "model": {"lora": {"target_modules": list(UNET_ATTENTION_PROJECTIONS)}},
    }
    options_class = PrefPaintOptions
    options: PrefPaintOptions

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        if self.options.trust_weights:
            self._check_trust()
        self._dataset: InpaintingDataset | None = None

    def _check_trust(self) -> None:
        o = self.options
        if not hasattr(self.reward, "score_with_features"):
            raise ValueError(
                f"method_options.trust_weights: reward '{o.reward}' gives no features to weigh trust by "
                "(use the prefpaint reward, or set trust_weights=false)"
            )
        if getattr(self.reward, "v_inverse", None) is None:
            raise ValueError(
                f"method_options.trust_weights: reward '{o.reward}' was loaded without V^-1: place "
                "v_inverse.safetensors (scripts/train_reward.py) or the release's V_inverse.pt beside its "
                "weights, pass reward_kwargs.v_inverse, or set trust_weights=false"
            )

    def read_data(self) -> None:
        """The masked images of ``data.path``; errors name the file and row."""
        self.records = read_inpainting_examples(self.cfg.data.path, self.cfg.data.on_bad_sample)

    def dataset(self) -> tuple[Dataset, Any]:
        d = self.cfg.data
        self._dataset = InpaintingDataset(self.records, d.resolution, d.on_bad_sample)
        return self._dataset, collate_inpainting

    def dropped_samples(self) -> int:
        return super().dropped_samples() + (self._dataset.skipped if self._dataset is not None else 0)

    def rollout_inputs(self, batch: dict[str, Any]) -> tuple[list[str], Tensor | None, Tensor | None]:
        return batch["prompts"], batch["images"], batch["masks"]

    def score_rollout(
        self, images: Tensor, prompts: list[str], originals: Tensor | None, masks: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """Steps 2-3: scores and, with ``trust_weights``, the trust weights of the reward's features."""
        o = self.options
        if o.keep_unmasked:
            images = paste_unmasked(images, originals, masks)
        if not o.trust_weights:
            return super().score_rollout(images, prompts, originals, masks)
        context = self.reward_context(originals, masks)
        scores, features = self.reward.score_with_features(images, **context)
        weights = trust_weights(features, self.reward.v_inverse, o.trust_alpha, o.trust_beta, o.trust_max)
        return scores.float(), weights

    def sample_grid(self, prompts: list[str], seed: int, steps: int) -> Tensor | None:
        """Inpaintings of the first training examples (as many as ``validation_prompts``), each
        beside its masked input."""
        from diffalign.diffusion.sampling import sample_with_trajectory
        from diffalign.images import masked_for_inpainting

        if self._dataset is None or not prompts:
            return None
        items = collate_inpainting([self._dataset[i] for i in range(min(len(prompts), len(self._dataset)))])
        generator = torch.Generator(self.policy.device).manual_seed(seed)
        with torch.no_grad():
            trajectory = sample_with_trajectory(
                self.policy, items["prompts"], num_inference_steps=steps,
                guidance_scale=self.options.validation_guidance, eta=0.0, generator=generator,
                image=items["images"], mask=items["masks"], height=items["images"].shape[-2],
                width=items["images"].shape[-1],
            )  # fmt: skip
        masked = masked_for_inpainting(items["images"], items["masks"]).to(trajectory.images.device)
        return torch.cat([masked, trajectory.images])
