"""Pairwise objectives that use reward scores: MaPPO and MADPO weigh each pair by its reward gap;
smoothed DPO (SmPO) turns the scores into a soft preference. Notation:
:mod:`diffalign.objectives.pairwise`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from diffalign.config import NON_NEGATIVE, POSITIVE, Range
from diffalign.objectives.base import (
    Inputs,
    ObjectiveInputError,
    get_objective,
    register_objective,
)
from diffalign.objectives.pairwise import (
    LogRatioObjective,
    PairwiseObjective,
    sigmoid_loss,
)


def reward_gap(x: Inputs, low: float, high: float) -> Tensor:
    """``(r_w - r_l) / (high - low)`` from the reward inputs."""
    return (x.chosen_rewards - x.rejected_rewards) / (high - low)


_REWARD_INPUTS = ("chosen_rewards", "rejected_rewards")


@register_objective("mappo")
@dataclass
class MaPPO(PairwiseObjective):
    """MaPPO (Lan et al. 2025, arXiv 2507.21183, Sec. 3.1): the base objective with its rejected
    term scaled by the prior reward gap ``Delta_r = r_w - r_l`` in [0, 1]; for DPO
    ``-log sigma(beta rho_w - Delta_r beta rho_l)``.

    Plug-in variants (``base``): ``dpo``, ``ipo`` (``(rho_w - Delta_r rho_l - 1/(2 beta))^2``),
    ``simpo`` (``-log sigma(beta lbar_w - Delta_r beta lbar_l - gamma)``), ``cpo``.
    ``Delta_r = 1`` gives the base objective back.

    Raw reward-model scores ``s`` become priors in [0, 1] by ``reward_mapping``:

    - ``"logistic"`` (default, the paper's: App. D.2.4 applies "a standard logistic function on
      the absolute rewards"): ``Delta_r = sigma(s_w) - sigma(s_l)``. The scores' scale matters:
      large-magnitude scores saturate sigma, and ``Delta_r`` tends to 0 or 1;
    - ``"min_max"``: ``(s - reward_min) / (reward_max - reward_min)`` with known bounds (both
      required, and refused with ``logistic``), so ``Delta_r = (s_w - s_l) / (reward_max - reward_min)``.

    The gap is clipped to [0, 1]: a pair the prior reward ranks the other way contributes only
    its chosen term. ``beta`` (None: the base's default) and ``base_options`` configure the base
    objective.
    """

    soft_label_mode = None  # its prior weighting comes from the reward gap: a tie label contradicts it

    ranges: ClassVar[dict[str, Range]] = {"beta": POSITIVE, "reward_min": Range(), "reward_max": Range()}

    base: Literal["dpo", "ipo", "simpo", "cpo"] = "dpo"
    beta: float | None = None
    reward_mapping: Literal["logistic", "min_max"] = "logistic"
    reward_min: float | None = None
    reward_max: float | None = None
    base_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_mapping()
        options = dict(self.base_options)
        if self.beta is not None:
            if options.get("beta", self.beta) != self.beta:
                raise ValueError(
                    f"beta ({self.beta}) and base_options.beta ({options['beta']}) disagree: set beta only"
                )
            options["beta"] = self.beta
        self._base: PairwiseObjective = get_objective(self.base, **options)  # type: ignore[assignment]

    def _check_mapping(self) -> None:
        bounds = (self.reward_min, self.reward_max)
        if self.reward_mapping == "logistic":
            if bounds != (None, None):
                raise ValueError(
                    "mappo: reward_min / reward_max are the bounds of reward_mapping: min_max; the "
                    "default logistic mapping takes none (set reward_mapping: min_max, or drop them)"
                )
        elif None in bounds:
            raise ValueError("mappo: reward_mapping min_max needs both reward_min and reward_max")
        elif not self.reward_max > self.reward_min:
            raise ValueError(f"reward_max ({self.reward_max}) must exceed reward_min ({self.reward_min})")

    def prior_gap(self, x: Inputs) -> Tensor:
        """``Delta_r`` (B,) in [0, 1] from the reward inputs, by ``reward_mapping``."""
        if self.reward_mapping == "logistic":
            gap = torch.sigmoid(x.chosen_rewards) - torch.sigmoid(x.rejected_rewards)
        else:
            gap = reward_gap(x, self.reward_min, self.reward_max)
        return gap.clamp(0, 1)

    def required_inputs(self) -> tuple[str, ...]:
        return (*self._base.required_inputs(), *_REWARD_INPUTS)

    def _why(self, name: str) -> str:
        if name in _REWARD_INPUTS:
            return " (MaPPO's prior reward gap needs reward scores for both candidates)"
        return self._base._why(name)

    def implicit_rewards(self, x: Inputs) -> tuple[Tensor, Tensor]:
        return self._base.implicit_rewards(x)

    def pair_losses(self, chosen: Tensor, rejected: Tensor, x: Inputs) -> tuple[Tensor, dict[str, Tensor]]:
        gap = self.prior_gap(x)
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

    ranges: ClassVar[dict[str, Range]] = {
        "c_max": Range(1, low_open=True),
        "c_min": Range(0, 1, low_open=True, high_open=True),
        "lam": POSITIVE,
        "tau": NON_NEGATIVE,
    }

    c_max: float = 2.0
    c_min: float = 0.5
    lam: float = 1.0
    tau: float = math.log(999)

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

    ranges: ClassVar[dict[str, Range]] = {"gamma": POSITIVE, "reward_min": Range(), "reward_max": Range()}

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
