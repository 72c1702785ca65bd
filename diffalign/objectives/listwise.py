"""Listwise objectives: K candidates per prompt with scalar rewards (NCA and InfoNCA).

Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit Rewards":
implicit rewards ``rhat_i = beta rho(y_i)`` and soft labels ``p = softmax(s / alpha)`` from the
candidates' reward scores ``s``.

- InfoNCA: ``-sum_i p_i log softmax(rhat)_i``; with K = 2 and a hard label it is DPO.
- NCA: ``-sum_i p_i log sigma(rhat_i) - (1/K) sum_i log sigma(-rhat_i)``.

Defaults beta 0.01 and reward temperature alpha 0.01 (``reward_temperature``; the official
trainer calls the same divisor ``temperature_alpha``). Listwise inputs are ``policy_logps``,
``reference_logps`` and ``rewards`` of shape (B, K). Pairwise inputs work too: they are
stacked as K = 2 with the chosen candidate first; without reward scores the targets are the
soft label ``(p, 1 - p)`` from ``preference_probs`` (a tie is (1/2, 1/2)), or all mass on the
chosen candidate when no label is given. Scores and a soft label other than 1 together are
an error: the two would define different targets.

Metrics compare the best candidate (highest reward; the chosen one for pairwise input) with
the others: ``rewards/rejected`` is the mean over the others, ``rewards/accuracies`` the
fraction of the others whose implicit reward is below the best one's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from diffalign.config import POSITIVE, Range
from diffalign.objectives.base import (
    LISTWISE_INPUTS,
    PAIRWISE_INPUTS,
    Inputs,
    Objective,
    ObjectiveInputError,
    register_objective,
    same_shape,
)

__all__ = ["NCA", "InfoNCA", "ListwiseObjective", "stack_pairwise"]

_STACKED = {
    "policy_logps": ("policy_chosen_logps", "policy_rejected_logps"),
    "reference_logps": ("reference_chosen_logps", "reference_rejected_logps"),
    "rewards": ("chosen_rewards", "rejected_rewards"),
}


def stack_pairwise(
    objective: str, given: dict[str, Tensor], stacked: Mapping[str, tuple[str, str]]
) -> dict[str, Tensor]:
    """Pairwise inputs as listwise ones with K = 2, the chosen candidate first: each (chosen,
    rejected) of ``stacked`` becomes its listwise name; the other pairwise inputs but
    ``preference_probs`` and ``weights`` (lengths, previous references) are known and dropped.

    Raises:
        ObjectiveInputError: listwise and pairwise inputs together, or half of a pair.
    """
    listwise = [k for k in given if k in LISTWISE_INPUTS and k != "weights"]
    pairwise = [k for k in given if k in PAIRWISE_INPUTS and k != "weights"]
    if listwise:
        raise ObjectiveInputError(
            f"objective '{objective}' got both listwise (`{listwise[0]}`) and pairwise "
            f"(`{pairwise[0]}`) inputs; pass one form"
        )
    out = {k: v for k, v in given.items() if k not in PAIRWISE_INPUTS or k in ("weights", "preference_probs")}
    for name, (chosen, rejected) in stacked.items():
        if (chosen in given) != (rejected in given):
            missing = rejected if chosen in given else chosen
            raise ObjectiveInputError(f"objective '{objective}' requires `{missing}` with its pair")
        if chosen in given:
            same_shape(given, (chosen, rejected), ndim=1)
            out[name] = torch.stack([given[chosen], given[rejected]], dim=1)
    return out


@dataclass
class ListwiseObjective(Objective):
    kind = "listwise"
    accepted_inputs = (*LISTWISE_INPUTS, *(n for n in PAIRWISE_INPUTS if n != "weights"))
    soft_label_mode = "native"  # the targets p of the candidates
    targets_from_rewards = True

    ranges: ClassVar[dict[str, Range]] = {"beta": POSITIVE, "reward_temperature": POSITIVE}

    beta: float = 0.01
    reward_temperature: float = 0.01
    reference_free: bool = False

    def required_inputs(self) -> tuple[str, ...]:
        return ("policy_logps",) if self.reference_free else ("policy_logps", "reference_logps")

    def validate(self, inputs: dict[str, Tensor | None]) -> Inputs:
        given = {k: v for k, v in inputs.items() if v is not None}
        if any(k in PAIRWISE_INPUTS and k != "weights" for k in given):
            given = stack_pairwise(self.name, given, _STACKED)
            if "policy_logps" not in given:
                raise ObjectiveInputError(f"objective '{self.name}' requires `policy_chosen_logps`")
        elif "rewards" not in given:
            raise ObjectiveInputError(f"objective '{self.name}' requires `rewards` of shape (B, K)")
        x = super().validate(given)  # refuses scores together with soft labels
        x.targets = None
        if x.rewards is None:  # pairwise input without scores: (p, 1 - p), p = 1 by default
            p = torch.ones_like(x.policy_logps[:, 0]) if x.preference_probs is None else x.preference_probs
            x.targets = torch.stack([p, 1 - p], dim=1)
        return x

    def check_shapes(self, tensors: dict[str, Tensor]) -> None:
        shape = same_shape(tensors, ("policy_logps", "reference_logps", "rewards"), ndim=2)
        if shape[1] < 2:
            raise ObjectiveInputError(f"listwise inputs need K >= 2 candidates, got shape {shape}")
        for name in ("weights", "preference_probs"):
            same_shape(tensors, (name,), ndim=1)
            value = tensors.get(name)
            if value is not None and value.shape[0] != shape[0]:
                raise ObjectiveInputError(
                    f"shape mismatch: `{name}` has shape {tuple(value.shape)}, expected ({shape[0]},)"
                )

    def candidate_losses(self, rhat: Tensor, p: Tensor) -> Tensor:
        raise NotImplementedError

    def compute(self, x: Inputs) -> tuple[Tensor, dict[str, Tensor]]:
        rho = x.policy_logps if self.reference_free else x.policy_logps - x.reference_logps
        rhat = self.beta * rho
        p = x.targets if x.targets is not None else torch.softmax(x.rewards / self.reward_temperature, -1)
        losses = self.candidate_losses(rhat, p)
        best = p.argmax(-1, keepdim=True)
        others = torch.ones_like(rhat, dtype=torch.bool).scatter(-1, best, False)
        k = rhat.shape[1]
        best_r, best_logp = rhat.gather(-1, best).squeeze(-1), x.policy_logps.gather(-1, best).squeeze(-1)
        other_r = (rhat * others).sum(-1) / (k - 1)
        metrics = {
            "rewards/chosen": best_r.mean(),
            "rewards/rejected": other_r.mean(),
            "rewards/margins": (best_r - other_r).mean(),
            "rewards/accuracies": ((rhat < best_r[:, None]) & others).float().sum(-1).div(k - 1).mean(),
            "logps/chosen": best_logp.mean(),
            "logps/rejected": ((x.policy_logps * others).sum(-1) / (k - 1)).mean(),
        }
        return losses, metrics


@register_objective("infonca")
@dataclass
class InfoNCA(ListwiseObjective):
    """InfoNCA (Chen et al. 2024): ``-sum_i p_i log softmax(beta rho)_i``; DPO for K = 2, hard label."""

    def candidate_losses(self, rhat: Tensor, p: Tensor) -> Tensor:
        return -(p * F.log_softmax(rhat, -1)).sum(-1)


@register_objective("nca")
@dataclass
class NCA(ListwiseObjective):
    """NCA (Chen et al. 2024): ``-sum_i p_i log sigma(rhat_i) - (1/K) sum_i log sigma(-rhat_i)``.

    Unlike InfoNCA it moves each candidate's absolute likelihood, not only the relative one.
    """

    def candidate_losses(self, rhat: Tensor, p: Tensor) -> Tensor:
        return -(p * F.logsigmoid(rhat)).sum(-1) - F.logsigmoid(-rhat).mean(-1)
