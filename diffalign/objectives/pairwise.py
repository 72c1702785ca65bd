"""Pairwise preference objectives: one chosen and one rejected candidate per example.

This module holds what they share; the objectives live by family in ``log_ratio`` (DPO and its
variants, Diffusion-DRO's ranking), ``reference_free`` (SimPO, CPO, ORPO), ``reward_weighted``
(MaPPO, MADPO, smoothed DPO) and ``kldo``.

Notation (as in ``../shared/METHODS.md``): ``l(y)`` the policy's log-likelihood of ``y``
(summed token log-probs for text, ``denoising_logp`` for diffusion), ``lbar(y) = l(y)/|y|``,
``rho(y) = l(y) - l_ref(y)``, ``h = rho(y_w) - rho(y_l)``, ``sigma`` the logistic function.

Every pairwise objective is split in two, which is what lets MaPPO wrap any of them:
``implicit_rewards`` gives the two quantities the loss compares (``r_w``, ``r_l``; reported as
``rewards/chosen`` and ``rewards/rejected``), and ``pair_losses`` turns them into per-example
losses. For the reference-based family ``r = beta * rho``; for SimPO ``beta * lbar``; for CPO
``beta * l``; for ORPO the log-odds.

Lengths: where an objective normalises by length (SimPO, ORPO, CPO's NLL term, IPO with
``length_normalized``), it divides by ``chosen_lengths``/``rejected_lengths`` when they are
given, and otherwise takes the log-likelihoods to be per-unit averages already (diffusion's
``denoising_logp`` is a per-element mean, TRL's ``average_log_prob`` a per-token mean).

Soft labels: a pair with ``preference_probs`` p trains towards p. Every objective here takes the
expected loss over the pair's order, ``p L(w, l) + (1 - p) L(l, w)`` (for DPO the Bradley-Terry
cross-entropy ``-p log sigma(beta h) - (1 - p) log sigma(-beta h)``, whose gradient in h vanishes
at h = 0 for a tie), except ``smoothed_dpo``, whose formula takes p itself, and ``dro_ranking``,
``kldo``, ``mappo`` and ``madpo``, which refuse a p other than 1 (the last two weigh each pair by
its reward gap, which a tie's label contradicts: mixing the orders would still favour the
better-scored side).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from diffalign.config import POSITIVE, Range
from diffalign.objectives.base import (
    PAIRWISE_INPUTS,
    Inputs,
    Objective,
    same_shape,
)

__all__ = [
    "LogRatioObjective",
    "PairwiseObjective",
    "per_unit",
    "safe_exp",
    "sigmoid_loss",
    "swap_candidates",
]

# exp() of a log-ratio beyond this is clamped: e^30 ~ 1e13 keeps every product finite in
# float32/bfloat16. Only a policy that has already diverged reaches it (the gradient is then 0).
LOG_RATIO_LIMIT = 30.0


def safe_exp(x: Tensor) -> Tensor:
    return torch.exp(x.clamp(max=LOG_RATIO_LIMIT))


def sigmoid_loss(z: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """``-(1 - e) log sigma(z) - e log sigma(-z)``: the Bradley-Terry loss with label noise ``e``."""
    loss = -F.logsigmoid(z)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-z)
    return loss


def per_unit(logps: Tensor, lengths: Tensor | None) -> Tensor:
    return logps if lengths is None else logps / lengths


@dataclass
class PairwiseObjective(Objective):
    kind = "pairwise"
    accepted_inputs = PAIRWISE_INPUTS
    soft_label_mode = "mixture"

    def required_inputs(self) -> tuple[str, ...]:
        return ("policy_chosen_logps", "policy_rejected_logps")

    def check_shapes(self, tensors: dict[str, Tensor]) -> None:
        same_shape(tensors, self.accepted_inputs, ndim=1)

    def implicit_rewards(self, x: Inputs) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def pair_losses(self, chosen: Tensor, rejected: Tensor, x: Inputs) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def compute(self, x: Inputs) -> tuple[Tensor, dict[str, Tensor]]:
        chosen, rejected = self.implicit_rewards(x)
        losses, extra = self.pair_losses(chosen, rejected, x)
        if self.soft_label_mode == "mixture" and x.preference_probs is not None:
            # p L(w, l) + (1 - p) L(l, w); exact for p = 1 (the second term is 0 * finite)
            p = x.preference_probs
            flipped, _ = self.pair_losses(rejected, chosen, swap_candidates(x))
            losses = p * losses + (1 - p) * flipped
        metrics = {
            "rewards/chosen": chosen.mean(),
            "rewards/rejected": rejected.mean(),
            "rewards/margins": (chosen - rejected).mean(),
            "rewards/accuracies": (chosen > rejected).float().mean(),
            "logps/chosen": x.policy_chosen_logps.mean(),
            "logps/rejected": x.policy_rejected_logps.mean(),
        }
        return losses, {**metrics, **extra}


def swap_candidates(x: Inputs) -> Inputs:
    """The same inputs with the roles of the two candidates exchanged."""
    swapped = Inputs(**vars(x))
    for name in PAIRWISE_INPUTS:
        if "chosen" in name:
            other = name.replace("chosen", "rejected")
            setattr(swapped, name, getattr(x, other))
            setattr(swapped, other, getattr(x, name))
    return swapped


@dataclass
class LogRatioObjective(PairwiseObjective):
    """Objectives on ``rho = l - l_ref``; ``reference_free=True`` sets ``l_ref = 0``."""

    ranges: ClassVar[dict[str, Range]] = {"beta": POSITIVE}

    beta: float = 0.1
    reference_free: bool = False

    def required_inputs(self) -> tuple[str, ...]:
        refs = () if self.reference_free else ("reference_chosen_logps", "reference_rejected_logps")
        return (*super().required_inputs(), *refs)

    def logratios(self, x: Inputs) -> tuple[Tensor, Tensor]:
        if self.reference_free:
            return x.policy_chosen_logps, x.policy_rejected_logps
        return (
            x.policy_chosen_logps - x.reference_chosen_logps,
            x.policy_rejected_logps - x.reference_rejected_logps,
        )

    def implicit_rewards(self, x: Inputs) -> tuple[Tensor, Tensor]:
        rho_w, rho_l = self.logratios(x)
        return self.beta * rho_w, self.beta * rho_l
