"""Pairwise objectives on the policy/reference log-ratio ``h = rho(y_w) - rho(y_l)``: DPO and its
noise-robust, identity, anchored, hinge, rejection-sampling and f-divergence variants, and
Diffusion-DRO's ranking loss. Notation and the soft-label rule: :mod:`diffalign.objectives.pairwise`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from diffalign.config import NON_NEGATIVE, Range
from diffalign.objectives.base import (
    PAIRWISE_INPUTS,
    Inputs,
    ObjectiveInputError,
    register_objective,
)
from diffalign.objectives.pairwise import (
    LogRatioObjective,
    safe_exp,
    sigmoid_loss,
)


@register_objective("dpo")
@dataclass
class DPO(LogRatioObjective):
    """DPO (Rafailov et al. 2023, Eq. 7): ``-log sigma(beta h)``; beta 0.1.

    With ``l := denoising_logp = -0.5 * per-element MSE`` this is exactly the official
    Diffusion-DPO loss (Wallace et al. 2023, Eq. 14 with the code's ``-0.5 * beta``) at the same
    beta (5000 for SD1.5).
    """

    def pair_losses(self, chosen: Tensor, rejected: Tensor, x: Inputs) -> tuple[Tensor, dict[str, Tensor]]:
        return sigmoid_loss(chosen - rejected), {}


@dataclass
class NoisyLabelObjective(LogRatioObjective):
    """A log-ratio objective that models preference labels flipped with probability ``e``."""

    ranges: ClassVar[dict[str, Range]] = {"label_smoothing": Range(0, 0.5, high_open=True)}

    label_smoothing: float = 0.1


@register_objective("cdpo")
@dataclass
class CDPO(NoisyLabelObjective):
    """Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences"; TRL's
    ``label_smoothing``): ``-(1 - e) log sigma(beta h) - e log sigma(-beta h)``.

    The note gives no default for the flip rate ``e``; 0.1 matches ``robust``'s. The input
    ``label_smoothing_per_pair`` (B,), each in [0, 0.5), replaces ``e`` pair by pair: UPO's
    per-pair smoothing (Wang et al. 2024, the loss ``L_upo``), e.g.
    :func:`diffalign.text.upo.bald_label_smoothing`. UPO's printed ``a_j = 1/(P_j + 1)`` is not
    offered: with ``P_j`` normalised over many pairs it is about 1 and flips every label.

    Raises:
        ObjectiveInputError: a ``label_smoothing_per_pair`` value outside [0, 0.5).
    """

    # only cdpo takes it: an objective that ignored it would train every pair as unsmoothed
    accepted_inputs = (*PAIRWISE_INPUTS, "label_smoothing_per_pair")

    def validate(self, inputs: dict[str, Tensor | None]) -> Inputs:
        x = super().validate(inputs)
        e = x.label_smoothing_per_pair
        if e is not None and not bool(((e >= 0) & (e < 0.5)).all()):
            raise ObjectiveInputError("`label_smoothing_per_pair` must lie in [0, 0.5)")
        return x

    def pair_losses(self, chosen: Tensor, rejected: Tensor, x: Inputs) -> tuple[Tensor, dict[str, Tensor]]:
        e = x.label_smoothing_per_pair
        if e is None:
            return sigmoid_loss(chosen - rejected, self.label_smoothing), {}
        z = chosen - rejected
        return (1 - e) * sigmoid_loss(z) + e * sigmoid_loss(-z), {}


@register_objective("robust")
@dataclass
class RobustDPO(NoisyLabelObjective):
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO", the de-biased loss of §3):
    ``[-(1 - e) log sigma(beta h) + e log sigma(-beta h)] / (1 - 2e)``; e 0.1, beta 0.1.

    Unbiased for the clean-label DPO loss when labels flip with probability ``e``.
    """

    def pair_losses(self, chosen: Tensor, rejected: Tensor, x: Inputs) -> tuple[Tensor, dict[str, Tensor]]:
        z, e = chosen - rejected, self.label_smoothing
        return ((1 - e) * -F.logsigmoid(z) + e * F.logsigmoid(-z)) / (1 - 2 * e), {}


@register_objective("ipo")
@dataclass
class IPO(LogRatioObjective):
    """IPO (Azar et al. 2023, Eq. 17): ``(h - 1/(2 tau))^2`` with ``tau`` passed as ``beta`` (0.1).

    Meaning chosen: the paper's summed log-ratios. ``length_normalized=True`` divides each
    log-ratio by its length first, which is what TRL's ``ipo`` does.
    Computed as ``((r_w - r_l) - 1/2)^2 / beta^2`` with ``r = beta rho``, the same value.
    """

    length_normalized: bool = False

    def required_inputs(self) -> tuple[str, ...]:
        lengths = ("chosen_lengths", "rejected_lengths") if self.length_normalized else ()
        return (*super().required_inputs(), *lengths)

    def logratios(self, x: Inputs) -> tuple[Tensor, Tensor]:
        rho_w, rho_l = super().logratios(x)
        if self.length_normalized:
            return rho_w / x.chosen_lengths, rho_l / x.rejected_lengths
        return rho_w, rho_l

    def pair_losses(self, chosen: Tensor, rejected: Tensor, x: Inputs) -> tuple[Tensor, dict[str, Tensor]]:
        return ((chosen - rejected - 0.5) / self.beta) ** 2, {}


@register_objective("apo")
@dataclass
class APO(DPO):
    """Accelerated Preference Optimization (He, Yuan and Gu 2024): iterative DPO with Nesterov
    extrapolation. Round ``t + 1`` trains against the extrapolated policy
    ``log pi_t = (1 + momentum) log pihat_t - momentum log pihat_{t-1}`` of the last two
    iterates, so the loss is DPO with reference log-likelihoods
    ``(1 + momentum) reference - momentum previous_reference`` (the normaliser of the
    extrapolated policy cancels in ``h``). ``momentum = 0`` or no previous iterate (round 1) is
    DPO. Defaults beta 0.1, momentum 0.3 (our choice; the paper tunes it).

    Meaning chosen: "APO" is the Accelerated method of the paper above. TRL's Anchored
    Preference Optimization (D'Oosterlinck et al. 2024) is ``apo_zero`` / ``apo_down``.
    """

    ranges: ClassVar[dict[str, Range]] = {"momentum": Range(0, 1, high_open=True)}

    momentum: float = 0.3

    def logratios(self, x: Inputs) -> tuple[Tensor, Tensor]:
        rho_w, rho_l = super().logratios(x)
        prev_w, prev_l = x.previous_reference_chosen_logps, x.previous_reference_rejected_logps
        if (prev_w is None) != (prev_l is None):
            raise ObjectiveInputError(
                "objective 'apo' needs both `previous_reference_chosen_logps` and "
                "`previous_reference_rejected_logps`, or neither (first round)"
            )
        if prev_w is None or self.reference_free:
            return rho_w, rho_l
        # rho against the extrapolated reference: l - [(1 + m) l_ref - m l_prev]
        m = self.momentum
        return (
            rho_w - m * (x.reference_chosen_logps - prev_w),
            rho_l - m * (x.reference_rejected_logps - prev_l),
        )


@register_objective("apo_zero")
@dataclass
class APOZero(LogRatioObjective):
    """Anchored Preference Optimization, zero variant (D'Oosterlinck et al. 2024; TRL's
    ``apo_zero``): ``(1 - sigma(r_w)) + sigma(r_l)``, ``r = beta rho``: raises the chosen and
    lowers the rejected likelihood (for chosen outputs better than the model's own); beta 0.1.
    """

    def pair_losses(self, chosen: Tensor, rejected: Tensor, x: Inputs) -> tuple[Tensor, dict[str, Tensor]]:
        return (1 - torch.sigmoid(chosen)) + torch.sigmoid(rejected), {}


@register_objective("apo_down")
@dataclass
class APODown(LogRatioObjective):
    """Anchored Preference Optimization, down variant (D'Oosterlinck et al. 2024; TRL's
    ``apo_down``): ``sigma(r_w) + (1 - sigma(r_w - r_l))``: lowers both likelihoods, the rejected
    more (for chosen outputs worse than the model's own); beta 0.1.
    """

    def pair_losses(self, chosen: Tensor, rejected: Tensor, x: Inputs) -> tuple[Tensor, dict[str, Tensor]]:
        return torch.sigmoid(chosen) + (1 - torch.sigmoid(chosen - rejected)), {}


@register_objective("hinge")
@dataclass
class Hinge(LogRatioObjective):
    """Hinge loss (RSO's "hinge-norm", Liu et al. 2023 §3; TRL ``hinge``): ``max(0, 1 - beta h)``.

    With ``reference_free=True`` it is SLiC's calibration loss (Zhao et al. 2023, Eq. 1)
    ``max(0, delta - l(y_w) + l(y_l))`` with ``delta = 1/beta``, scaled by ``beta``.
    """

    def pair_losses(self, chosen: Tensor, rejected: Tensor, x: Inputs) -> tuple[Tensor, dict[str, Tensor]]:
        return F.relu(1 - (chosen - rejected)), {}


@register_objective("rso")
@dataclass
class RSO(LogRatioObjective):
    """RSO's losses (Liu et al. 2023, "Statistical Rejection Sampling Improves Preference
    Optimization", §3): ``sigmoid_norm`` ``-log sigma(gamma h)`` and ``hinge_norm``
    ``max(0, 1 - gamma h)``, with ``gamma`` passed as ``beta`` (0.05).

    Meaning chosen: RSO's. TRL's ``sigmoid_norm`` is something else (length-normalised DPO);
    here that is ``simpo`` with a reference, or ``ipo`` with ``length_normalized``. RSO's data
    step, rejection sampling from ``pi_sft exp(r / beta_sampling)``, is
    :func:`diffalign.objectives.rso_rejection_sample`.
    """

    beta: float = 0.05
    loss_type: Literal["sigmoid_norm", "hinge_norm"] = "sigmoid_norm"

    def pair_losses(self, chosen: Tensor, rejected: Tensor, x: Inputs) -> tuple[Tensor, dict[str, Tensor]]:
        z = chosen - rejected
        return (sigmoid_loss(z) if self.loss_type == "sigmoid_norm" else F.relu(1 - z)), {}


@register_objective("fdpo")
@dataclass
class FDPO(LogRatioObjective):
    """f-DPO (Wang et al. 2023, "Beyond Reverse KL", §4 and Table 1):
    ``-log sigma(beta f'(u_w) - beta f'(u_l))`` with ``u = pi/pi_ref = exp(rho)`` and

    - ``reverse_kl``: ``f'(u) = log u`` (+1, which cancels): DPO;
    - ``forward_kl``: ``f'(u) = -1/u``;
    - ``js_divergence``: ``f'(u) = log(2u / (1 + u))``;
    - ``alpha_divergence``: ``f'(u) = (1 - u^-alpha) / alpha``, alpha in (0, 1), default 0.5.

    Meaning chosen: the paper's alpha. TRL's ``alpha_divergence`` uses another parameterisation
    (the two agree at 0.5). ``exp(-rho)`` is evaluated with ``-rho`` clamped at 30.
    """

    divergence: Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"] = "reverse_kl"
    ranges: ClassVar[dict[str, Range]] = {"alpha": Range(0, 1, low_open=True, high_open=True)}

    alpha: float = 0.5

    def f_prime(self, rho: Tensor) -> Tensor:
        if self.divergence == "reverse_kl":
            return rho
        if self.divergence == "forward_kl":
            return -safe_exp(-rho)
        if self.divergence == "js_divergence":
            return math.log(2) - F.softplus(-rho)  # log(2u/(1+u)) without forming u
        return (1 - safe_exp(-self.alpha * rho)) / self.alpha

    def implicit_rewards(self, x: Inputs) -> tuple[Tensor, Tensor]:
        rho_w, rho_l = self.logratios(x)
        return self.beta * self.f_prime(rho_w), self.beta * self.f_prime(rho_l)

    def pair_losses(self, chosen: Tensor, rejected: Tensor, x: Inputs) -> tuple[Tensor, dict[str, Tensor]]:
        return sigmoid_loss(chosen - rejected), {}


@register_objective("dro_ranking")
@dataclass
class DROranking(LogRatioObjective):
    """Diffusion-DRO's ranking loss (Wu et al. 2025): ``max(0, margin - beta h)`` over expert
    (chosen) and online policy (rejected) samples; no sigmoid.

    With ``l := denoising_logp = -0.5 MSE`` the defaults (beta 2, margin 0.001) reproduce the
    official ``max(diff + 0.001, 0)``, ``diff = (mse_theta(expert) - mse_ref(expert)) -
    (mse_theta(policy) - mse_ref(policy))`` (the paper's ``max(m, diff)``, m = -0.001, up to
    that constant shift).
    """

    soft_label_mode = None  # expert vs. policy sample: the order is not a judgement that can be soft

    ranges: ClassVar[dict[str, Range]] = {"margin": NON_NEGATIVE}

    beta: float = 2.0
    margin: float = 0.001

    def pair_losses(self, chosen: Tensor, rejected: Tensor, x: Inputs) -> tuple[Tensor, dict[str, Tensor]]:
        losses = F.relu(self.margin - (chosen - rejected))
        return losses, {"dro/active_fraction": (losses > 0).float().mean()}
