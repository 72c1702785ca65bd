"""The clipped policy-gradient surrogate used by DDPO and PrefPaint.

PPO's clipped objective (Schulman et al. 2017, Eq. 7) on per-step log-probabilities of sampler
transitions (DDPO, Black et al. 2023, §4.3; PrefPaint, Liu et al. 2024, RL stage):

    ratio = exp(logp_theta - logp_old)
    A     = clamp(advantages, -advantage_clip, advantage_clip)
    loss  = trust_weight * max(-A ratio, -A clamp(ratio, 1 - eps, 1 + eps))

``policy_logps`` and ``old_policy_logps`` are (B,) for one step per sample or (B, T) for T
steps of each trajectory (the per-sample loss is then the mean over steps); ``advantages`` is
(B,) or the same shape as the log-probs. ``trust_weights`` (B,) are PrefPaint's reward-trust
weights: they scale each sample's loss inside ``losses`` (PrefPaint sums weighted losses, so
their absolute size matters), unlike ``weights``, which only re-weight the mean.
Defaults: eps 1e-4 and advantage clip 5 (DDPO's; PrefPaint clips advantages at 10).
The log-ratio is clamped at 30 before ``exp`` so that no ratio overflows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from diffalign.config import POSITIVE, Range
from diffalign.objectives.base import (
    POLICY_GRADIENT_INPUTS,
    Inputs,
    Objective,
    ObjectiveInputError,
    register_objective,
    same_shape,
)
from diffalign.objectives.pairwise import LOG_RATIO_LIMIT

__all__ = ["PPOClip"]


@register_objective("ppo_clip")
@dataclass
class PPOClip(Objective):
    kind = "policy_gradient"
    accepted_inputs = POLICY_GRADIENT_INPUTS

    ranges: ClassVar[dict[str, Range]] = {"clip_range": POSITIVE, "advantage_clip": POSITIVE}

    clip_range: float = 1e-4
    advantage_clip: float | None = 5.0

    def required_inputs(self) -> tuple[str, ...]:
        return ("policy_logps", "old_policy_logps", "advantages")

    def check_shapes(self, tensors: dict[str, Tensor]) -> None:
        shape = same_shape(tensors, ("policy_logps", "old_policy_logps"), ndim=(1, 2))
        batch = (shape[0],)
        adv = tuple(tensors["advantages"].shape)
        if adv not in (batch, shape):
            raise ObjectiveInputError(
                f"shape mismatch: `advantages` has shape {adv}, expected {batch} or {shape} "
                f"(as `policy_logps`)"
            )
        for name in ("trust_weights", "weights"):
            if name in tensors and tuple(tensors[name].shape) != batch:
                raise ObjectiveInputError(
                    f"shape mismatch: `{name}` has shape {tuple(tensors[name].shape)}, expected {batch}"
                )

    def compute(self, x: Inputs) -> tuple[Tensor, dict[str, Tensor]]:
        log_ratio = x.policy_logps - x.old_policy_logps
        ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
        adv = x.advantages
        if self.advantage_clip is not None:
            adv = adv.clamp(-self.advantage_clip, self.advantage_clip)
        if adv.dim() < ratio.dim():
            adv = adv[:, None]
        clipped = ratio.clamp(1 - self.clip_range, 1 + self.clip_range)
        per_step = torch.maximum(-adv * ratio, -adv * clipped)
        losses = per_step.mean(-1) if per_step.dim() == 2 else per_step
        if x.trust_weights is not None:
            losses = losses * x.trust_weights
        metrics = {
            "policy/approx_kl": 0.5 * (log_ratio.detach() ** 2).mean(),
            "policy/clipfrac": ((ratio.detach() - 1).abs() > self.clip_range).float().mean(),
            "policy/ratio": ratio.detach().mean(),
            "policy/advantages": adv.mean(),
        }
        return losses, metrics
