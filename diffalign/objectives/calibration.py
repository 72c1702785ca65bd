"""Pearson calibration (Wu, Lei & Monz 2025, "Calibrating Translation Decoding with Quality
Estimation on LLMs", arXiv 2504.19044): make a candidate's log-likelihood correlate with its
quality score within each group of K candidates for one prompt.

Adapted from the official ``src/llama_recipes/utils/train_utils.py:92-160`` (moore3930/
calibrating-llm-mt, 99db305). Notation, per group g (a row of the (B, K) inputs):

- ``L_k``: the candidate's summed log-likelihood (``policy_logps``), or its per-token mean with
  ``length_normalized`` (the code's ``normalize_prob``, default False);
- ``z(v)_k = (v_k - mean(v)) / (std(v) + eps)``, unbiased std, eps 1e-6 (as the code);
- calibration term ``-mean_k z(L)_k z(q)_k`` (train_utils.py:143), which is ``-(K-1)/K`` times
  the Pearson correlation; ``exact_pearson`` uses ``-r`` itself;
- NLL term: minus the per-token log-likelihood of the best-scored candidate (needs ``lengths``);
- CPO term: ``-log sigma(0.1 (L_best - L_worst))`` on summed log-likelihoods, the 0.1 fixed as in
  the code (train_utils.py:157);
- per-group loss ``alpha NLL + beta calibration + gama CPO`` (train_utils.py:492; the code's
  spelling ``gama``); defaults alpha 1, beta 1, gama 0 (experiments/run.sh).

Groups whose K scores are all equal carry no ranking: the official loader drops them
(calibration_dataset.py:46). Here they stay in the batch with a calibration and CPO term of 0 (their
NLL term still trains the first candidate), and ``calibration/constant_groups`` reports their
share; drop them from the data to match the official run exactly.

Inputs: listwise ``policy_logps``, ``rewards`` (the quality scores) and ``lengths`` (B, K), or
pairwise ones stacked as K = 2 (chosen first). With K = 2 the correlation is +-1 whatever the
margin, so the calibration term trains next to nothing (its gradient is of order eps / std^2; 0
with ``exact_pearson``): only the NLL and CPO terms then train. A
reference model is never used. Metrics: ``calibration/pearson`` (the mean correlation over groups
with distinct scores), ``calibration/loss``, ``nll_loss``, ``logps/chosen`` (best candidate),
``logps/rejected`` (mean of the others).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from diffalign.config import NON_NEGATIVE, POSITIVE, ConfigError, Range
from diffalign.objectives.base import (
    LISTWISE_INPUTS,
    PAIRWISE_INPUTS,
    Inputs,
    Objective,
    ObjectiveInputError,
    register_objective,
    same_shape,
)
from diffalign.objectives.listwise import stack_pairwise

__all__ = ["PearsonCalibration", "pearson", "zscore"]

CPO_BETA = 0.1  # fixed in the official code (train_utils.py:157), not a hyper-parameter there

# listwise input -> the pairwise inputs stacked into it as K = 2
_PAIRS = {
    "policy_logps": ("policy_chosen_logps", "policy_rejected_logps"),
    "rewards": ("chosen_rewards", "rejected_rewards"),
    "lengths": ("chosen_lengths", "rejected_lengths"),
}


def zscore(values: Tensor, eps: float = 1e-6) -> Tensor:
    """``(v - mean) / (std + eps)`` along the last dim, unbiased std, as the official code.

    A constant row gives 0 with a finite gradient (``torch.std`` would give NaN there).
    """
    centred = values - values.mean(-1, keepdim=True)
    var = centred.pow(2).sum(-1, keepdim=True) / (values.shape[-1] - 1)
    std = torch.where(var > 0, var.clamp(min=torch.finfo(var.dtype).tiny).sqrt(), 0.0)
    return centred / (std + eps)


def pearson(x: Tensor, y: Tensor) -> Tensor:
    """Pearson correlation of ``x`` and ``y`` along the last dim, shape ``x.shape[:-1]``, in
    [-1, 1]; 0 where either is constant (its gradient there is 0, not NaN)."""
    dx, dy = x - x.mean(-1, keepdim=True), y - y.mean(-1, keepdim=True)
    norms = dx.pow(2).sum(-1) * dy.pow(2).sum(-1)
    defined = norms > 0
    return torch.where(defined, (dx * dy).sum(-1) / torch.where(defined, norms, 1.0).sqrt(), 0.0)


@register_objective("pearson_calibration")
@dataclass
class PearsonCalibration(Objective):
    """``alpha NLL(best) - beta mean_k z(L)_k z(q)_k + gama CPO(best, worst)`` per group of K
    candidates (Wu et al. 2025, official train_utils.py:92-160); see the module docstring.

    Raises ``ConfigError`` when alpha, beta and gama are all 0 (no loss) and
    ``ObjectiveInputError`` for missing, mis-shaped or non-finite inputs, K < 2 or lengths <= 0.
    """

    kind = "listwise"
    accepted_inputs = (*LISTWISE_INPUTS, *(n for n in PAIRWISE_INPUTS if n != "weights"))
    ranges: ClassVar[dict[str, Range]] = {
        "alpha": NON_NEGATIVE,
        "beta": NON_NEGATIVE,
        "gama": NON_NEGATIVE,
        "eps": POSITIVE,
    }

    alpha: float = 1.0  # weight of the best candidate's per-token NLL
    beta: float = 1.0  # weight of the calibration (correlation) term
    gama: float = 0.0  # weight of the CPO term (the official spelling)
    length_normalized: bool = False  # correlate per-token means (the code's normalize_prob)
    exact_pearson: bool = False  # -r instead of the code's -(K-1)/K r with eps-stabilised stds
    eps: float = 1e-6

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.alpha == self.beta == self.gama == 0:
            raise ConfigError(f"objective '{self.name}': alpha, beta and gama are all 0: nothing to train")

    def required_inputs(self) -> tuple[str, ...]:
        needs_lengths = self.alpha > 0 or self.length_normalized
        return ("policy_logps", "lengths", "rewards") if needs_lengths else ("policy_logps", "rewards")

    def validate(self, inputs: dict[str, Tensor | None]) -> Inputs:
        """Stack pairwise inputs as K = 2 (chosen first), then the usual checks."""
        given = {k: v for k, v in inputs.items() if v is not None}
        if any(k in PAIRWISE_INPUTS and k != "weights" for k in given):
            missing = [n for stacked in self.required_inputs() for n in _PAIRS[stacked] if n not in given]
            given = stack_pairwise(self.name, given, _PAIRS)  # first: it refuses mixed forms
            if missing:
                raise ObjectiveInputError(f"objective '{self.name}' requires `{missing[0]}`")
        return super().validate(given)

    def check_shapes(self, tensors: dict[str, Tensor]) -> None:
        shape = same_shape(tensors, ("policy_logps", "reference_logps", "rewards", "lengths"), ndim=2)
        if shape[1] < 2:
            raise ObjectiveInputError(f"listwise inputs need K >= 2 candidates, got shape {shape}")
        for name in ("weights", "preference_probs"):
            value = tensors.get(name)
            if value is not None and tuple(value.shape) != shape[:1]:
                raise ObjectiveInputError(
                    f"shape mismatch: `{name}` has shape {tuple(value.shape)}, expected ({shape[0]},)"
                )

    def compute(self, x: Inputs) -> tuple[Tensor, dict[str, Tensor]]:
        logps, scores = x.policy_logps, x.rewards
        per_token = None if x.lengths is None else logps / x.lengths
        calibrated = per_token if self.length_normalized else logps
        ranked = (scores != scores[:, :1]).any(-1)  # groups with distinct scores
        if self.exact_pearson:
            calibration = -pearson(calibrated, scores)
        else:
            calibration = -(zscore(calibrated, self.eps) * zscore(scores, self.eps)).mean(-1)
        calibration = torch.where(ranked, calibration, 0.0)
        best, worst = scores.argmax(-1, keepdim=True), scores.argmin(-1, keepdim=True)
        best_logp = logps.gather(-1, best).squeeze(-1)
        margin = best_logp - logps.gather(-1, worst).squeeze(-1)
        cpo = torch.where(ranked, -F.logsigmoid(CPO_BETA * margin), 0.0)
        losses = self.beta * calibration + self.gama * cpo
        metrics = {"calibration/loss": calibration.mean()}
        if per_token is not None:
            nll = -per_token.gather(-1, best).squeeze(-1)
            losses = losses + self.alpha * nll
            metrics["nll_loss"] = nll.mean()
        r = pearson(calibrated.detach(), scores)
        others = torch.ones_like(logps, dtype=torch.bool).scatter(-1, best, False)
        metrics |= {
            "calibration/pearson": (r * ranked).sum() / ranked.sum().clamp(min=1),
            "calibration/constant_groups": (~ranked).float().mean(),
            "logps/chosen": best_logp.mean(),
            "logps/rejected": ((logps * others).sum(-1) / (logps.shape[1] - 1)).mean(),
        }
        return losses, metrics
