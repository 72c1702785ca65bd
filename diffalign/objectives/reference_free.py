"""Reference-free pairwise objectives: SimPO (length-normalised margin), CPO (with an NLL term on
the chosen candidate) and ORPO (odds ratio). Notation: :mod:`diffalign.objectives.pairwise`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from diffalign.config import NON_NEGATIVE, POSITIVE, Range
from diffalign.objectives.base import (
    Inputs,
    register_objective,
)
from diffalign.objectives.pairwise import (
    PairwiseObjective,
    per_unit,
    sigmoid_loss,
)


@register_objective("simpo")
@dataclass
class SimPO(PairwiseObjective):
    """SimPO (Meng et al. 2024, Eq. 6): ``-log sigma(beta lbar(y_w) - beta lbar(y_l) - gamma)``,
    reference-free; beta 2.0 and ``gamma = gamma_beta_ratio * beta`` with ratio 0.25, as the
    official recipes set them.
    """

    ranges: ClassVar[dict[str, Range]] = {"beta": POSITIVE, "gamma_beta_ratio": NON_NEGATIVE}

    beta: float = 2.0
    gamma_beta_ratio: float = 0.25

    def implicit_rewards(self, x: Inputs) -> tuple[Tensor, Tensor]:
        return (
            self.beta * per_unit(x.policy_chosen_logps, x.chosen_lengths),
            self.beta * per_unit(x.policy_rejected_logps, x.rejected_lengths),
        )

    def pair_losses(self, chosen: Tensor, rejected: Tensor, x: Inputs) -> tuple[Tensor, dict[str, Tensor]]:
        return sigmoid_loss(chosen - rejected - self.gamma_beta_ratio * self.beta), {}


def chosen_nll(x: Inputs) -> Tensor:
    """Per-unit negative log-likelihood of the chosen candidate (the SFT term of CPO and ORPO)."""
    return -per_unit(x.policy_chosen_logps, x.chosen_lengths)


@register_objective("cpo")
@dataclass
class CPO(PairwiseObjective):
    """CPO (Xu et al. 2024, Eq. 3 plus the NLL regulariser of §3):
    ``-log sigma(beta l(y_w) - beta l(y_l)) + lambda NLL(y_w)``; beta 0.1, lambda 1.

    The preference term uses summed log-likelihoods, the NLL term the per-unit mean (as the
    official code and TRL's CPOTrainer).
    """

    ranges: ClassVar[dict[str, Range]] = {"beta": POSITIVE, "nll_weight": NON_NEGATIVE}

    beta: float = 0.1
    nll_weight: float = 1.0

    def implicit_rewards(self, x: Inputs) -> tuple[Tensor, Tensor]:
        return self.beta * x.policy_chosen_logps, self.beta * x.policy_rejected_logps

    def pair_losses(self, chosen: Tensor, rejected: Tensor, x: Inputs) -> tuple[Tensor, dict[str, Tensor]]:
        nll = chosen_nll(x)
        return sigmoid_loss(chosen - rejected) + self.nll_weight * nll, {"nll_loss": nll.mean()}


def log_odds(avg_logps: Tensor) -> Tensor:
    """``log(P / (1 - P))`` for ``P = exp(avg_logps)``, stable for ``avg_logps`` near 0."""
    x = avg_logps.clamp(max=-torch.finfo(avg_logps.dtype).eps)
    log1mexp = torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
    return x - log1mexp


@register_objective("orpo")
@dataclass
class ORPO(PairwiseObjective):
    """ORPO (Hong et al. 2024, Eqs. 6-7): ``NLL(y_w) - lambda log sigma(log odds(y_w) - log odds(y_l))``
    with ``odds(y) = P / (1 - P)``, ``P = exp(lbar(y))``; lambda 0.1 (``odds_ratio_weight``).

    ``rewards/*`` report the log-odds, the quantities the loss compares.
    """

    ranges: ClassVar[dict[str, Range]] = {"odds_ratio_weight": POSITIVE}

    odds_ratio_weight: float = 0.1

    def implicit_rewards(self, x: Inputs) -> tuple[Tensor, Tensor]:
        return (
            log_odds(per_unit(x.policy_chosen_logps, x.chosen_lengths)),
            log_odds(per_unit(x.policy_rejected_logps, x.rejected_lengths)),
        )

    def pair_losses(self, chosen: Tensor, rejected: Tensor, x: Inputs) -> tuple[Tensor, dict[str, Tensor]]:
        odds_ratio_loss = sigmoid_loss(chosen - rejected)
        nll = chosen_nll(x)
        metrics = {"nll_loss": nll.mean(), "log_odds_ratio": (chosen - rejected).mean()}
        return nll + self.odds_ratio_weight * odds_ratio_loss, metrics
