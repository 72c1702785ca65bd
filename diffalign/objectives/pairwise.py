"""Pairwise preference objectives: one chosen and one rejected candidate per example.

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

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from diffalign.objectives.base import (
    PAIRWISE_INPUTS,
    Inputs,
    Objective,
    ObjectiveInputError,
    get_objective,
    register_objective,
    same_shape,
    weighted_mean,
)

__all__ = [
    "APO",
    "CDPO",
    "CPO",
    "DPO",
    "FDPO",
    "IPO",
    "KLDO",
    "MADPO",
    "ORPO",
    "RSO",
    "APODown",
    "APOZero",
    "DROranking",
    "Hinge",
    "MaPPO",
    "PairwiseObjective",
    "RobustDPO",
    "SimPO",
    "SmoothedDPO",
    "safe_exp",
    "sigmoid_loss",
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
        same_shape(tensors, PAIRWISE_INPUTS, ndim=1)

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

    beta: float = 0.1
    reference_free: bool = False

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ValueError(f"beta must be positive, got {self.beta}")

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

    label_smoothing: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")


@register_objective("cdpo")
@dataclass
class CDPO(NoisyLabelObjective):
    """Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences"; TRL's
    ``label_smoothing``): ``-(1 - e) log sigma(beta h) - e log sigma(-beta h)``.

    The note gives no default for the flip rate ``e``; 0.1 matches ``robust``'s.
    """

    def pair_losses(self, chosen: Tensor, rejected: Tensor, x: Inputs) -> tuple[Tensor, dict[str, Tensor]]:
        return sigmoid_loss(chosen - rejected, self.label_smoothing), {}


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
    alpha: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")

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


@register_objective("simpo")
@dataclass
class SimPO(PairwiseObjective):
    """SimPO (Meng et al. 2024, Eq. 6): ``-log sigma(beta lbar(y_w) - beta lbar(y_l) - gamma)``,
    reference-free; beta 2.0 and ``gamma = gamma_beta_ratio * beta`` with ratio 0.25, as the
    official recipes set them.
    """

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


def reward_gap(x: Inputs, low: float, high: float) -> Tensor:
    """``(r_w - r_l) / (high - low)`` from the reward inputs."""
    return (x.chosen_rewards - x.rejected_rewards) / (high - low)


_REWARD_INPUTS = ("chosen_rewards", "rejected_rewards")


@register_objective("mappo")
@dataclass
class MaPPO(PairwiseObjective):
    """MaPPO (Lan et al. 2025): the base objective with its rejected term scaled by the prior
    reward gap ``Delta_r = r_w - r_l`` in [0, 1]; for DPO ``-log sigma(beta rho_w - Delta_r beta rho_l)``.

    Plug-in variants (``base``): ``dpo``, ``ipo`` (``(rho_w - Delta_r rho_l - 1/(2 beta))^2``),
    ``simpo`` (``-log sigma(beta lbar_w - Delta_r beta lbar_l - gamma)``), ``cpo``.
    ``Delta_r = 1`` gives the base objective back.

    Rewards are mapped to [0, 1] by ``(r - reward_min) / (reward_max - reward_min)`` (the paper
    assumes normalised rewards and does not say how; min-max with known bounds is our choice),
    and the gap is clipped to [0, 1]: a pair the prior reward ranks the other way contributes
    only its chosen term. ``beta`` (None: the base's default) and ``base_options`` configure
    the base objective.
    """

    soft_label_mode = None  # its prior weighting comes from the reward gap: a tie label contradicts it

    base: Literal["dpo", "ipo", "simpo", "cpo"] = "dpo"
    beta: float | None = None
    reward_min: float = 0.0
    reward_max: float = 1.0
    base_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.reward_max > self.reward_min:
            raise ValueError(f"reward_max ({self.reward_max}) must exceed reward_min ({self.reward_min})")
        options = dict(self.base_options)
        if self.beta is not None:
            options["beta"] = self.beta
        self._base: PairwiseObjective = get_objective(self.base, **options)  # type: ignore[assignment]

    def required_inputs(self) -> tuple[str, ...]:
        return (*self._base.required_inputs(), *_REWARD_INPUTS)

    def _why(self, name: str) -> str:
        if name in _REWARD_INPUTS:
            return " (MaPPO's prior reward gap needs reward scores for both candidates)"
        return self._base._why(name)

    def implicit_rewards(self, x: Inputs) -> tuple[Tensor, Tensor]:
        return self._base.implicit_rewards(x)

    def pair_losses(self, chosen: Tensor, rejected: Tensor, x: Inputs) -> tuple[Tensor, dict[str, Tensor]]:
        gap = reward_gap(x, self.reward_min, self.reward_max).clamp(0, 1)
        losses, extra = self._base.pair_losses(chosen, gap * rejected, x)
        return losses, {**extra, "mappo/reward_gap": gap.mean()}


@register_objective("madpo")
@dataclass
class MADPO(LogRatioObjective):
    """MADPO (Margin-Adaptive DPO): ``w(m) * -log sigma(beta h)`` with the reward-model margin
    ``m = r_w - r_l``, ``c(|m|) = c_min + (c_max - c_min) / (1 + k exp(lambda (|m| - tau)))``,
    ``k = (c_max - 1) / (1 - c_min)``, and ``w = sigma(c m) / sigma(m)`` for ``m > -tau``, else 1.
    Defaults beta 0.1, c_max 2, c_min 0.5, lambda 1, tau ln 999.

    ``c(tau) = 1``: pairs whose margin is about ``tau`` keep weight 1; hard pairs (small ``|m|``)
    are amplified towards ``c_max``, easy ones damped towards ``c_min``. The weight is data, not
    a function of the policy: no gradient flows through it.
    """

    soft_label_mode = None  # its weights come from the reward margin: a tie label contradicts it

    c_max: float = 2.0
    c_min: float = 0.5
    lam: float = 1.0
    tau: float = math.log(999)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (0 < self.c_min < 1 < self.c_max):
            raise ValueError(f"need 0 < c_min < 1 < c_max, got c_min={self.c_min}, c_max={self.c_max}")

    def required_inputs(self) -> tuple[str, ...]:
        return (*super().required_inputs(), *_REWARD_INPUTS)

    def _why(self, name: str) -> str:
        if name in _REWARD_INPUTS:
            return " (MADPO's instance weights come from the reward-model margin r_w - r_l)"
        return super()._why(name)

    def instance_weights(self, margin: Tensor) -> Tensor:
        k = (self.c_max - 1) / (1 - self.c_min)
        c = self.c_min + (self.c_max - self.c_min) * torch.sigmoid(
            -(self.lam * (margin.abs() - self.tau) + math.log(k))
        )  # = (c_max - c_min) / (1 + k exp(lam (|m| - tau))), without overflow
        ratio = torch.exp(F.logsigmoid(c * margin) - F.logsigmoid(margin))
        return torch.where(margin > -self.tau, ratio, torch.ones_like(margin))

    def pair_losses(self, chosen: Tensor, rejected: Tensor, x: Inputs) -> tuple[Tensor, dict[str, Tensor]]:
        w = self.instance_weights(x.chosen_rewards - x.rejected_rewards).detach()
        return w * sigmoid_loss(chosen - rejected), {"madpo/weight": w.mean()}


@register_objective("smoothed_dpo")
@dataclass
class SmoothedDPO(LogRatioObjective):
    """SmPO's smoothed DPO (Lu et al. 2025, Eq. 9): ``-log sigma((2 alpha - gamma) beta h)`` with
    ``alpha = p gamma``, i.e. ``-log sigma(gamma (2p - 1) beta h)``, ``p`` the soft label
    ``P(y_w > y_l)``.

    ``p`` is ``exp(r'_w) / (exp(r'_w) + exp(r'_l))`` with
    ``r' = (r - reward_min) / (reward_max - reward_min)`` when reward scores are given (the official
    code's PickScore cosine bounds 0.1154 / 0.2820 are the defaults; hard labels alongside scores
    give way to them, soft ones are refused), else ``preference_probs``. As the two scores
    converge, ``p -> 1/2`` and the argument fades to 0: the loss tends to the constant ``log 2``
    and its gradient to zero.
    ``gamma = 1`` with ``p = 1`` is DPO. Defaults beta 2000 (SD1.5 in the paper; 5000 for
    SDXL), gamma 10 (official code).
    """

    soft_label_mode = "native"
    targets_from_rewards = True

    beta: float = 2000.0
    gamma: float = 10.0
    reward_min: float = 0.11543526500463486
    reward_max: float = 0.28201571106910706

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.reward_max > self.reward_min:
            raise ValueError(f"reward_max ({self.reward_max}) must exceed reward_min ({self.reward_min})")

    def validate(self, inputs: dict[str, Tensor | None]) -> Inputs:
        x = super().validate(inputs)
        if x.preference_probs is None and (x.chosen_rewards is None or x.rejected_rewards is None):
            raise ObjectiveInputError(
                "objective 'smoothed_dpo' requires `preference_probs` or both `chosen_rewards` and "
                "`rejected_rewards` (SmPO's soft labels come from reward scores)"
            )
        return x

    def soft_labels(self, x: Inputs) -> Tensor:
        if x.chosen_rewards is not None and x.rejected_rewards is not None:
            return torch.sigmoid(reward_gap(x, self.reward_min, self.reward_max))
        return x.preference_probs

    def pair_losses(self, chosen: Tensor, rejected: Tensor, x: Inputs) -> tuple[Tensor, dict[str, Tensor]]:
        p = self.soft_labels(x)
        return sigmoid_loss(self.gamma * (2 * p - 1) * (chosen - rejected)), {"smpo/soft_label": p.mean()}


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

    beta: float = 2.0
    margin: float = 0.001

    def pair_losses(self, chosen: Tensor, rejected: Tensor, x: Inputs) -> tuple[Tensor, dict[str, Tensor]]:
        losses = F.relu(self.margin - (chosen - rejected))
        return losses, {"dro/active_fraction": (losses > 0).float().mean()}


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

    running_rate: float | None = 0.1
    _log_running: float | None = field(default=None, init=False, repr=False)
    _steps: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.running_rate is not None and not 0 < self.running_rate <= 1:
            raise ValueError(f"running_rate must be in (0, 1] or None, got {self.running_rate}")

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
