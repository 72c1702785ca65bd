"""The losses a TRL 1.16 ``DPOTrainer`` user selects with ``loss_type`` that the other families do not
already hold: ``exo_pair``, ``bco_pair``, ``sppo_hard``, ``aot``, ``aot_unpaired``, ``discopop``,
``sigmoid_norm`` (here ``dpo_norm``: ``rso`` is RSO's own losses), ``sft``, and a list of them
with ``loss_weights`` (here ``combined``). Each docstring quotes the branch of
``trl/trainer/dpo_trainer.py``, ``DPOTrainer._compute_loss`` it reproduces; the tests write each
formula out again and compare at 1e-6. Notation: :mod:`diffalign.objectives.pairwise` (TRL's
``chosen_logratios`` is ``rho_w``, ``delta_score`` is ``h``, ``self.beta * delta_score`` is
``r_w - r_l`` with ``r = beta rho``).

TRL's other loss types are here already: ``sigmoid`` = ``dpo``, ``hinge`` = ``hinge``, ``ipo`` =
``ipo`` with ``length_normalized``, ``robust`` = ``robust``, ``nca_pair`` = ``nca`` on pairs,
``apo_zero`` / ``apo_down`` = ``apo_zero`` / ``apo_down``, ``f_divergence_type`` with ``sigmoid`` =
``fdpo`` (its ``alpha`` is 1 - TRL's ``f_alpha_divergence_coef``), cDPO (``label_smoothing`` with
``sigmoid`` before TRL 1.0; 1.16's ``sigmoid`` ignores it) = ``cdpo``. RPO (TRL before 1.0:
``rpo_alpha``; 1.16: ``loss_type=["sigmoid", "sft"]``, ``loss_weights=[1, alpha]``) is
``combined`` of ``dpo`` and ``sft``. TRL's ``f_divergence_type`` with the other loss types is not
offered.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from diffalign.config import NON_NEGATIVE, POSITIVE, Range
from diffalign.objectives.base import (
    Inputs,
    get_objective,
    register_objective,
    weighted_mean,
)
from diffalign.objectives.pairwise import (
    LogRatioObjective,
    PairwiseObjective,
    per_unit,
    safe_exp,
    sigmoid_loss,
)
from diffalign.objectives.reference_free import chosen_nll

__all__ = ["AOT", "SFT", "AOTUnpaired", "BCOPair", "Combined", "DPONorm", "DiscoPOP", "EXOPair", "SPPOHard"]


@register_objective("exo_pair")
@dataclass
class EXOPair(LogRatioObjective):
    """EXO-pref (Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment",
    arXiv 2402.00856, Eq. 16; TRL ``loss_type="exo_pair"``): ``KL(q || p)`` over the pair's two
    orders, with ``q = (sigma(z), sigma(-z))``, ``z = beta h``, and the smoothed target
    ``p = (1 - eps, eps)``:
    ``sigma(z) (log sigma(z) - log(1 - eps)) + sigma(-z) (log sigma(-z) - log eps)``.

    Defaults beta 0.1 (TRL's) and eps 1e-3 (``label_smoothing``): TRL's default 0 is refused by
    TRL itself ("The EXO paper recommends a value of 1e-3"), and so is it here (``log eps``).
    """

    ranges: ClassVar[dict[str, Range]] = {"label_smoothing": Range(0, 1, low_open=True, high_open=True)}

    label_smoothing: float = 1e-3

    def pair_losses(self, chosen: Tensor, rejected: Tensor, x: Inputs) -> tuple[Tensor, dict[str, Tensor]]:
        z, eps = chosen - rejected, torch.tensor(self.label_smoothing, dtype=chosen.dtype)
        log_qw, log_ql = F.logsigmoid(z), F.logsigmoid(-z)
        losses = log_qw.exp() * (log_qw - torch.log1p(-eps)) + log_ql.exp() * (log_ql - eps.log())
        return losses, {}


@register_objective("bco_pair")
@dataclass
class BCOPair(LogRatioObjective):
    """Paired BCO (Jung et al. 2024, "Binary Classifier Optimization"; TRL ``loss_type="bco_pair"``):
    ``-log sigma(r_w - delta) - log sigma(-(r_l - delta))``, ``r = beta rho``; beta 0.1.

    ``running_delta=False`` (default, TRL 1.16's form): ``delta = 0``. ``running_delta=True`` (the
    paper's reward shift, and TRL before 1.0: ``self.running.update(rewards); delta =
    self.running.mean``): ``delta`` is the running average of each batch's mean implicit reward
    ``mean(r_w, r_l)``, updated with this batch before use, without gradient. That average is
    state: it lives on this instance, goes into checkpoints through ``state_dict`` (as ``kldo``'s)
    and is each rank's own (TRL's averaged the ranks' batch means first).
    """

    running_delta: bool = False
    _delta_sum: float = field(default=0.0, init=False, repr=False)
    _steps: int = field(default=0, init=False, repr=False)

    def state_dict(self) -> dict[str, Tensor]:
        """The running reward average, for checkpoints (a resumed run continues it)."""
        return {
            "delta_sum": torch.tensor(self._delta_sum, dtype=torch.float64),
            "steps": torch.tensor(self._steps),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self._delta_sum, self._steps = float(state["delta_sum"]), int(state["steps"])

    def compute(self, x: Inputs) -> tuple[Tensor, dict[str, Tensor]]:
        # updated once per call, before the soft-label mixture evaluates pair_losses twice
        if self.running_delta:
            chosen, rejected = self.implicit_rewards(x)
            w = torch.ones_like(chosen) if x.weights is None else x.weights
            self._delta_sum += float((w * (chosen + rejected)).sum().detach() / (2 * w.sum()))
            self._steps += 1
        losses, metrics = super().compute(x)
        if self.running_delta:
            metrics["bco/delta"] = torch.tensor(self.delta(), device=losses.device)
        return losses, metrics

    def delta(self) -> float:
        return self._delta_sum / self._steps if self.running_delta and self._steps else 0.0

    def pair_losses(self, chosen: Tensor, rejected: Tensor, x: Inputs) -> tuple[Tensor, dict[str, Tensor]]:
        delta = self.delta()
        return -F.logsigmoid(chosen - delta) - F.logsigmoid(-(rejected - delta)), {}


@register_objective("sppo_hard")
@dataclass
class SPPOHard(LogRatioObjective):
    """SPPO with hard probabilities (Wu et al. 2024, "Self-Play Preference Optimization", arXiv
    2405.00675, Eq. 4.7 with P = 1 for the winner and 0 for the loser; TRL
    ``loss_type="sppo_hard"``):
    ``(rho_w - 1/(2 beta))^2 + (rho_l + 1/(2 beta))^2``; beta 0.1. Computed as
    ``((r_w - 1/2)^2 + (r_l + 1/2)^2) / beta^2``, the same value.

    A soft label p mixes the two orders; that equals the paper's soft form with
    ``P = p`` up to a constant (the same gradient).
    """

    def pair_losses(self, chosen: Tensor, rejected: Tensor, x: Inputs) -> tuple[Tensor, dict[str, Tensor]]:
        return ((chosen - 0.5) ** 2 + (rejected + 0.5) ** 2) / self.beta**2, {}


@register_objective("discopop")
@dataclass
class DiscoPOP(LogRatioObjective):
    """DiscoPOP's log-ratio modulated loss (Chris Lu et al. 2024, "Discovering Preference
    Optimization Algorithms with and for LLMs", arXiv 2406.08414, Eq. 5; TRL
    ``loss_type="discopop"``): with ``z = beta h`` and ``m = sigma(z / tau)``,
    ``(1 - m) (-log sigma(z)) + m exp(-z)``; beta 0.1, tau 0.05 (TRL's ``discopop_tau``).

    ``exp(-z)`` is clamped at ``e^30``: there ``m < sigma(-600)`` and the term is below 1e-240, so
    the value is unchanged, but ``inf * 0`` no longer makes a NaN.

    Pitfall (of the formula, measured here): the loss is not monotone in ``z``. With tau 0.05 it
    has a local maximum near ``z = +0.07`` and a local minimum near ``z = -0.12`` (0.787, below
    (log 2 + 1) / 2 = 0.847 at ``z = 0``), so gradient descent from ``policy = reference`` moves
    towards preferring the rejected candidate. On the tiny synthetic task 40 steps from the
    reference drop held-out preference accuracy from 0.44 to 0.03 (3 seeds).
    """

    ranges: ClassVar[dict[str, Range]] = {"tau": POSITIVE}

    tau: float = 0.05

    def pair_losses(self, chosen: Tensor, rejected: Tensor, x: Inputs) -> tuple[Tensor, dict[str, Tensor]]:
        z = chosen - rejected
        m = torch.sigmoid(z / self.tau)
        return (1 - m) * -F.logsigmoid(z) + m * safe_exp(-z), {}


@register_objective("dpo_norm")
@dataclass
class DPONorm(LogRatioObjective):
    """Length-normalised DPO, TRL's ``loss_type="sigmoid_norm"``:
    ``-log sigma(beta (rho_w / |y_w| - rho_l / |y_l|))``; beta 0.1. Needs ``chosen_lengths`` and
    ``rejected_lengths`` (token counts); diffusion has none.

    Named ``dpo_norm`` because ``rso`` holds RSO's own ``sigmoid_norm`` (Liu et al. 2023), which is
    not length-normalised.
    """

    def required_inputs(self) -> tuple[str, ...]:
        return (*super().required_inputs(), "chosen_lengths", "rejected_lengths")

    def logratios(self, x: Inputs) -> tuple[Tensor, Tensor]:
        rho_w, rho_l = super().logratios(x)
        return rho_w / x.chosen_lengths, rho_l / x.rejected_lengths

    def pair_losses(self, chosen: Tensor, rejected: Tensor, x: Inputs) -> tuple[Tensor, dict[str, Tensor]]:
        return sigmoid_loss(chosen - rejected), {}


def quantile_matched(
    u: Tensor, v: Tensor, weights: Tensor | None, penalty: Callable[[Tensor], Tensor]
) -> Tensor:
    """Per-example losses whose weighted mean is ``int_0^1 penalty(F_u^-1(t) - F_v^-1(t)) dt``, the
    1-D optimal-transport cost of AOT between the (weighted) empirical laws of ``u`` and ``v`` (B,).

    Unweighted this is ``penalty(sort(u) - sort(v))`` (TRL's form), each value given to the
    example whose ``u`` has that rank. With weights, example i's loss is ``penalty`` averaged over
    the quantile range its ``u`` occupies (the monotone coupling of the weighted laws), so that the
    ``sum(w l) / sum(w)`` the objective reports is that OT cost; an example of weight 0 gets 0.
    """
    iu, iv = u.argsort(), v.argsort()
    if weights is None:
        losses = torch.empty_like(u)
        losses[iu] = penalty(u[iu] - v[iv])
        return losses
    p = weights / weights.sum()
    cu, cv = p[iu].cumsum(0), p[iv].cumsum(0)
    ends = torch.cat([cu, cv]).sort().values
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    mid = (ends + starts) / 2
    last = len(u) - 1
    ju = torch.searchsorted(cu.detach(), mid.detach()).clamp(max=last)
    jv = torch.searchsorted(cv.detach(), mid.detach()).clamp(max=last)
    pieces = penalty(u[iu][ju] - v[iv][jv]) * (ends - starts)
    per_rank = torch.zeros_like(u).index_add(0, ju, pieces)
    losses = torch.empty_like(u)
    losses[iu] = per_rank
    return torch.where(p > 0, losses / p.clamp(min=torch.finfo(p.dtype).tiny), torch.zeros_like(losses))


@dataclass
class _AOTBase(LogRatioObjective):
    """AOT (Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal Transport"):
    a smoothed logistic penalty ``-(1 - e) log sigma(beta d) - e log sigma(-beta d)`` on the
    differences ``d`` of two sorted batches; beta 0.1, ``label_smoothing`` e 0 (TRL's).

    Sorting couples the batch: a pair has no loss of its own, so soft labels are refused, and the
    text recipe refuses WPO weighting with it, as TRL does. ``weights`` weigh the two empirical
    laws (:func:`quantile_matched`); unweighted, the value is TRL's.
    """

    soft_label_mode = None  # the sort couples the batch: there is no per-pair order to mix
    ranges: ClassVar[dict[str, Range]] = {"label_smoothing": Range(0, 0.5, high_open=True)}
    sorts_batch: ClassVar[bool] = True

    label_smoothing: float = 0.0

    def compared(self, x: Inputs) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def pair_losses(self, chosen: Tensor, rejected: Tensor, x: Inputs) -> tuple[Tensor, dict[str, Tensor]]:
        u, v = self.compared(x)
        penalty = lambda d: sigmoid_loss(self.beta * d, self.label_smoothing)  # noqa: E731
        return quantile_matched(u, v, x.weights, penalty), {}


@register_objective("aot")
@dataclass
class AOT(_AOTBase):
    """Paired AOT (TRL ``loss_type="aot"``): sorts the policy's margins ``l_w - l_l`` and the
    reference's ``l_ref,w - l_ref,l`` separately and penalises ``d = sorted policy - sorted
    reference`` (the policy's margins should dominate the reference's in distribution)."""

    def compared(self, x: Inputs) -> tuple[Tensor, Tensor]:
        margins = x.policy_chosen_logps - x.policy_rejected_logps
        if self.reference_free:
            return margins, torch.zeros_like(margins)
        return margins, x.reference_chosen_logps - x.reference_rejected_logps


@register_objective("aot_unpaired")
@dataclass
class AOTUnpaired(_AOTBase):
    """Unpaired AOT (TRL ``loss_type="aot_unpaired"``): sorts ``rho_w`` and ``rho_l`` separately and
    penalises ``d = sorted rho_w - sorted rho_l`` (chosen log-ratios should dominate rejected ones
    in distribution, whichever pairs they came from)."""

    def compared(self, x: Inputs) -> tuple[Tensor, Tensor]:
        return self.logratios(x)


@register_objective("sft")
@dataclass
class SFT(PairwiseObjective):
    """TRL's ``loss_type="sft"``: the negative log-likelihood of the chosen candidates, averaged over
    all their tokens in the batch, ``-sum_i l(y_w,i) / sum_i |y_w,i|`` (with ``weights``:
    ``-sum w_i l_i / sum w_i |y_w,i|``). Without lengths ``l`` is taken to be a per-unit mean
    already and the mean of ``-l(y_w)`` is used. Each example's loss is that batch value, as TRL
    expands it (so WPO's per-pair weights multiply it as in TRL).

    Used inside ``combined`` (RPO: ``dpo`` + alpha ``sft``; MPO). ``rewards/*`` report the per-unit
    log-likelihoods. Soft labels are refused: a batch token mean is not a per-pair loss whose
    order could be mixed.
    """

    soft_label_mode = None  # a batch mean: no per-pair loss to take the expectation of

    def implicit_rewards(self, x: Inputs) -> tuple[Tensor, Tensor]:
        return per_unit(x.policy_chosen_logps, x.chosen_lengths), per_unit(
            x.policy_rejected_logps, x.rejected_lengths
        )

    def pair_losses(self, chosen: Tensor, rejected: Tensor, x: Inputs) -> tuple[Tensor, dict[str, Tensor]]:
        w = torch.ones_like(chosen) if x.weights is None else x.weights
        if x.chosen_lengths is None:
            value = (w * chosen_nll(x)).sum() / w.sum()
        else:
            value = -(w * x.policy_chosen_logps).sum() / (w * x.chosen_lengths).sum()
        # `0 * rejected`: the rejected log-likelihoods get their zero gradient, not None, so that a
        # caller differentiating both candidates (autograd.grad over both) does not fail
        return value.expand(len(chosen)) + 0 * rejected, {}


@register_objective("combined")
@dataclass
class Combined(PairwiseObjective):
    """A weighted sum of pairwise objectives, TRL's ``loss_type`` list with ``loss_weights``
    (``DPOTrainer._compute_loss``: ``loss += per_sequence_loss.mean() * loss_weight``):
    ``sum_k weight_k L_k``. MPO: ``objectives=[{name: dpo}, {name: bco_pair}, {name: sft}]``,
    ``loss_weights=[0.8, 0.2, 1.0]``; RPO: ``[{name: dpo}, {name: sft}]``, ``[1, alpha]``.

    ``objectives`` are objective configs (``{"name": ..., **hparams}``), built with
    :func:`get_objective`; ``loss_weights`` default to 1 each (TRL's). ``beta``, when set, is the
    beta of every part that takes one and sets none (TRL shares one beta; a recipe's default beta
    arrives here too, as for any objective).
    Required inputs are the union of the parts'; each part gets the inputs it accepts and checks
    them itself. A soft label is used when every part uses one (each its own way). Metrics: the
    first part's TRL metrics, each part's own, and ``combined/<k>_<name>`` its loss.
    """

    ranges: ClassVar[dict[str, Range]] = {"beta": POSITIVE, "loss_weights": NON_NEGATIVE}

    objectives: list[dict[str, Any]] = field(default_factory=lambda: [{"name": "dpo"}])
    loss_weights: tuple[float, ...] | None = None
    beta: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.objectives:
            raise ValueError("combined: `objectives` is empty; give at least one objective config")
        weights = [1.0] * len(self.objectives) if self.loss_weights is None else self.loss_weights
        if len(weights) != len(self.objectives):
            raise ValueError(f"combined: {len(weights)} loss_weights for {len(self.objectives)} objectives")
        self._weights = weights
        self._parts = [self._build(i, spec) for i, spec in enumerate(self.objectives)]
        modes = {part.soft_label_mode for part in self._parts}
        self.soft_label_mode = None if None in modes else "mixture" if modes == {"mixture"} else "native"
        self.targets_from_rewards = any(part.targets_from_rewards for part in self._parts)
        self.sorts_batch = any(getattr(part, "sorts_batch", False) for part in self._parts)

    def _build(self, i: int, spec: dict[str, Any]) -> PairwiseObjective:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise ValueError(
                f"combined: objectives[{i}] must be a mapping with a `name` string, got {spec!r}"
            )
        options = {k: v for k, v in spec.items() if k != "name"}
        part = get_objective(spec["name"], **options)
        if self.beta is not None and hasattr(part, "beta") and "beta" not in options:
            part = get_objective(spec["name"], **options, beta=self.beta)
        if not {"policy_chosen_logps", "policy_rejected_logps"} <= set(part.accepted_inputs):
            raise ValueError(
                f"combined: objectives[{i}] '{part.name}' is a {part.kind} objective; combined takes "
                "objectives of a chosen and a rejected candidate"
            )
        return part  # type: ignore[return-value]

    def required_inputs(self) -> tuple[str, ...]:
        names = [n for part in self._parts for n in part.required_inputs()]
        return tuple(dict.fromkeys(names))

    def _why(self, name: str) -> str:
        part = next(p for p in self._parts if name in p.required_inputs())
        return f" (part '{part.name}'{part._why(name)})"

    def validate(self, inputs: dict[str, Tensor | None]) -> Inputs:
        x = super().validate(inputs)
        for part in self._parts:
            part.validate({k: v for k, v in inputs.items() if k in part.accepted_inputs})
        return x

    def compute(self, x: Inputs) -> tuple[Tensor, dict[str, Tensor]]:
        total, metrics = None, {}
        for k, (part, weight) in enumerate(zip(self._parts, self._weights, strict=True)):
            view = Inputs(**{n: getattr(x, n, None) for n in part.accepted_inputs})
            losses, part_metrics = part.compute(view)
            metrics = {**part_metrics, **metrics}  # the first part's TRL metrics win
            metrics[f"combined/{k}_{part.name}"] = weighted_mean(losses, x.weights)
            total = weight * losses if total is None else total + weight * losses
        return total, metrics

    def state_dict(self) -> dict[str, Any]:
        """The stateful parts' states (``kldo``'s running denominator), by position."""
        return {str(k): p.state_dict() for k, p in enumerate(self._parts) if hasattr(p, "state_dict")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, part_state in state.items():
            self._parts[int(k)].load_state_dict(part_state)
