"""KLDO: the batch-coupled Donsker-Varadhan objective with its running denominator (the one
objective that keeps state across steps). Notation: :mod:`diffalign.objectives.pairwise`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from diffalign.config import Range
from diffalign.objectives.base import (
    Inputs,
    register_objective,
    weighted_mean,
)
from diffalign.objectives.pairwise import (
    LogRatioObjective,
)


@register_objective("kldo")
@dataclass
class KLDO(LogRatioObjective):
    """KLDO: the Donsker-Varadhan estimate of KL(preferred || dispreferred) on implicit rewards
    ``r = beta rho``: ``-E_w[r_w] + log E_l[exp(r_l)]``; beta 0.1.

    The second term couples the batch, so the per-example losses are
    ``-r_w,i + exp(r_l,i) / Z - mean_j(exp(r_l,j) / Z) + log mean_j exp(r_l,j)`` (the last two
    terms constant): their mean is the DV value on the batch and their gradient the DV gradient
    with denominator ``Z``. ``Z`` is the batch mean of ``exp(r_l)`` (``running_rate=None``) or,
    as in the official code, a bias-corrected running average of it (``running_rate=0.1``),
    which lowers the gradient's variance. That running average is the one piece of state an
    objective keeps; it lives on this instance. ``kldo/kl_estimate`` reports the DV bound.
    """

    soft_label_mode = None  # the DV bound couples the batch: a pair has no loss of its own to mix

    ranges: ClassVar[dict[str, Range]] = {"running_rate": Range(0, 1, low_open=True)}

    running_rate: float | None = 0.1
    _log_running: float | None = field(default=None, init=False, repr=False)
    _steps: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()

    def state_dict(self) -> dict[str, Tensor]:
        """The running denominator, for checkpoints (a resumed run continues the same average)."""
        log_running = math.nan if self._log_running is None else self._log_running
        return {
            "log_running": torch.tensor(log_running, dtype=torch.float64),
            "steps": torch.tensor(self._steps),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        log_running = float(state["log_running"])
        self._log_running = None if math.isnan(log_running) else log_running
        self._steps = int(state["steps"])

    def _log_denominator(self, log_batch_mean: Tensor) -> Tensor:
        if self.running_rate is None:
            return log_batch_mean
        rate = self.running_rate
        current = float(log_batch_mean)
        if self._log_running is None:
            self._log_running = math.log(rate) + current
        else:
            self._log_running = float(
                torch.logaddexp(
                    torch.tensor(math.log(1 - rate) + self._log_running),
                    torch.tensor(math.log(rate) + current),
                )
            )
        self._steps += 1
        # update-then-use keeps exp(r_l - log Z) <= B / rate: no overflow when rewards jump.
        return torch.tensor(
            self._log_running - math.log(1 - (1 - rate) ** self._steps), dtype=log_batch_mean.dtype
        )

    def pair_losses(self, chosen: Tensor, rejected: Tensor, x: Inputs) -> tuple[Tensor, dict[str, Tensor]]:
        # With `weights`, both expectations are weighted, so that the weighted mean of these
        # per-example losses is still the DV value and its gradient the DV gradient.
        w = torch.ones_like(rejected) if x.weights is None else x.weights
        log_batch_mean = (torch.logsumexp(rejected + w.log(), 0) - w.sum().log()).detach()
        log_z = self._log_denominator(log_batch_mean).to(rejected.device)
        scaled = torch.exp(rejected - log_z)
        losses = -chosen + scaled - (w * scaled).sum().detach() / w.sum() + log_batch_mean
        return losses, {"kldo/kl_estimate": -weighted_mean(losses, x.weights)}
