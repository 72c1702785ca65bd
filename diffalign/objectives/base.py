"""The objective interface shared by every diffusion and language-model recipe.

An objective is a small frozen-in-spirit dataclass whose fields are its hyper-parameters.
Calling it with keyword tensors returns an :class:`ObjectiveOutput`:

- ``losses``: per-example losses, shape ``(B,)``;
- ``loss``: their mean, or ``sum(w * l) / sum(w)`` when ``weights`` is given;
- ``metrics``: floats named as TRL names them (``rewards/chosen``, ``rewards/rejected``,
  ``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``, ``logps/rejected``) plus
  objective-specific ones under the objective's own prefix.

Objectives never see models, images or tokens: only per-sample log-likelihoods (or their
proxies: diffusion's ``denoising_logp``), optional reference log-likelihoods, reward scores,
soft preference labels, lengths and weights. Known inputs that an objective does not use are
ignored, so a recipe can pass everything it has, with one exception: a soft label
(``preference_probs``, P(chosen preferred) in [0, 1]) other than 1 is never ignored, because
training a tie as a win is a silently wrong result. An objective declares in ``soft_label_mode``
how it uses one (see :class:`Objective`), and one that cannot refuses it. Inputs are checked
before any arithmetic: an unknown or missing input, a shape mismatch, a non-finite value, a
negative weight, a non-positive length or a probability outside [0, 1] raises
:class:`ObjectiveInputError` naming the argument. The check costs one device synchronisation.

Objectives compute in float64 (float32 on MPS, which has no float64): their inputs are (B,)
vectors, so this costs nothing, and it removes the cancellation in ``(l - l_ref)`` that a large
beta would amplify (Diffusion-DPO's beta 5000 turns a float32 rounding of 1e-7 in a log-likelihood
into 5e-4 in the logit). Losses come back in that dtype; gradients flow back in the inputs' dtype.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, ClassVar, Literal, TypeVar

import torch
from torch import Tensor

from diffalign.config import Range, build, check_ranges

__all__ = [
    "LISTWISE_INPUTS",
    "PAIRWISE_INPUTS",
    "POLICY_GRADIENT_INPUTS",
    "Objective",
    "ObjectiveInputError",
    "ObjectiveOutput",
    "check_objective_inputs",
    "check_ties",
    "get_objective",
    "list_objectives",
    "register_objective",
    "soft_preference_probs",
]

PAIRWISE_INPUTS = (
    "policy_chosen_logps",
    "policy_rejected_logps",
    "reference_chosen_logps",
    "reference_rejected_logps",
    "chosen_rewards",
    "rejected_rewards",
    "preference_probs",
    "previous_reference_chosen_logps",
    "previous_reference_rejected_logps",
    "chosen_lengths",
    "rejected_lengths",
    "weights",
)
LISTWISE_INPUTS = ("policy_logps", "reference_logps", "rewards", "lengths", "weights")
POLICY_GRADIENT_INPUTS = ("policy_logps", "old_policy_logps", "advantages", "trust_weights", "weights")

# Inputs that must be strictly positive (lengths), non-negative (weights) or probabilities.
_POSITIVE = ("chosen_lengths", "rejected_lengths", "lengths")
_NON_NEGATIVE = ("weights", "trust_weights")
_PROBABILITY = ("preference_probs",)


class ObjectiveInputError(ValueError):
    """An objective was called with a missing, unknown, mis-shaped or non-finite input."""


@dataclass
class ObjectiveOutput:
    losses: Tensor
    loss: Tensor
    metrics: dict[str, float]


class Inputs(SimpleNamespace):
    """Validated inputs: float tensors, ``None`` for the ones not given."""


@dataclass
class Objective:
    """Base class: subclasses define ``compute`` and declare what they accept and require.

    ``soft_label_mode`` says how a soft preference label ``p = preference_probs`` (a tie kept with
    ``data.ties=half`` is p = 1/2) enters the loss:

    - ``"mixture"``: the loss of a pair is ``p L(w, l) + (1 - p) L(l, w)``, the expected loss when
      the pair's order is drawn from p (the Bradley-Terry cross-entropy for DPO; p = 1 is the
      loss itself);
    - ``"native"``: the objective's own formula takes p (SmPO's smoothed loss, NCA's targets);
    - ``None``: it has no use for a soft label and refuses any p other than 1.

    ``targets_from_rewards``: the objective derives its targets from reward scores when they are
    given (SmPO, NCA, InfoNCA); a soft label other than 1 alongside scores would be a second,
    conflicting target and is refused, and hard labels (p = 1) then give way to the scores.
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    accepted_inputs: ClassVar[tuple[str, ...]] = ()
    soft_label_mode: ClassVar[Literal["mixture", "native"] | None] = None
    targets_from_rewards: ClassVar[bool] = False
    ranges: ClassVar[dict[str, Range]] = {}
    """Valid values of each hyper-parameter (:class:`~diffalign.config.Range`), checked when built."""

    def __post_init__(self) -> None:
        check_ranges(self)

    @property
    def accepts_soft_labels(self) -> bool:
        """Whether a soft preference label other than 1 has a meaning for this objective (recipes
        check this before training on data with ties)."""
        return self.soft_label_mode is not None

    def required_inputs(self) -> tuple[str, ...]:
        """Inputs without which this objective (with these hyper-parameters) cannot run."""
        return ()

    @property
    def uses_reference(self) -> bool:
        """Whether a reference model's log-likelihoods are needed (recipes skip its forward if not)."""
        return any(n.startswith("reference") for n in self.required_inputs())

    @property
    def uses_rewards(self) -> bool:
        """Whether reward scores enter the loss: required (MaPPO, MADPO) or the source of its targets
        (SmPO, NCA, InfoNCA). Recipes pass scores only to these."""
        return self.targets_from_rewards or bool({"rewards", "chosen_rewards"} & set(self.required_inputs()))

    def compute(self, x: Inputs) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def __call__(self, **inputs: Tensor | None) -> ObjectiveOutput:
        x = self.validate(inputs)
        losses, metrics = self.compute(x)
        return ObjectiveOutput(
            losses=losses, loss=weighted_mean(losses, x.weights), metrics=to_floats(metrics)
        )

    # -- input checking -------------------------------------------------------------------

    def validate(self, inputs: dict[str, Tensor | None]) -> Inputs:
        """Check names, presence, dtypes, shapes and values; return float tensors."""
        unknown = [k for k in inputs if k not in self.accepted_inputs]
        if unknown:
            close = difflib.get_close_matches(unknown[0], self.accepted_inputs, n=1)
            hint = f"; did you mean `{close[0]}`?" if close else ""
            raise ObjectiveInputError(
                f"objective '{self.name}' got an unexpected input `{unknown[0]}`{hint} "
                f"(it accepts: {', '.join(self.accepted_inputs)})"
            )
        given = {k: v for k, v in inputs.items() if v is not None}
        for name in self.required_inputs():
            if name not in given:
                raise ObjectiveInputError(f"objective '{self.name}' requires `{name}`{self._why(name)}")
        tensors: dict[str, Tensor] = {}
        for name, value in given.items():
            if not isinstance(value, Tensor):
                raise ObjectiveInputError(f"`{name}` must be a torch.Tensor, got {type(value).__name__}")
            if value.dtype == torch.bool or value.is_complex():
                raise ObjectiveInputError(f"`{name}` must be a real-valued tensor, got {value.dtype}")
            tensors[name] = value.to(torch.float32 if value.device.type == "mps" else torch.float64)
        self.check_shapes(tensors)
        _check_values(tensors)
        self._check_soft_labels(tensors)
        return Inputs(**{n: tensors.get(n) for n in self.accepted_inputs})

    def _check_soft_labels(self, tensors: dict[str, Tensor]) -> None:
        probs = tensors.get("preference_probs")
        if probs is None:
            return
        scored = any(k in tensors for k in ("rewards", "chosen_rewards"))
        if not (self.soft_label_mode is None or (self.targets_from_rewards and scored)):
            return
        if bool((probs == 1).all()):  # hard labels: nothing soft to lose
            return
        if self.soft_label_mode is None:
            raise ObjectiveInputError(
                f"objective '{self.name}' cannot use soft preference labels (`preference_probs` other "
                "than 1, e.g. ties kept with data.ties=half): drop the ties, or use an objective that "
                "takes them (dpo, ipo, cdpo, infonca, ...)"
            )
        raise ObjectiveInputError(
            f"objective '{self.name}' got both reward scores and soft preference labels "
            "(`preference_probs` other than 1): its targets come from one of them; pass one"
        )

    def check_shapes(self, tensors: dict[str, Tensor]) -> None:
        raise NotImplementedError

    def _why(self, name: str) -> str:
        """An explanation appended to a missing-input error; subclasses may say more."""
        if name.startswith("reference"):
            return " (or pass reference_free=True)" if hasattr(self, "reference_free") else ""
        return ""


def soft_preference_probs(labels: Tensor, device: torch.device) -> Tensor | None:
    """A batch's pair labels (B,) as ``preference_probs`` on ``device``, or None when all are 1: hard
    labels need no input, and deciding it here, on the CPU, spares the device a synchronisation."""
    return None if bool((labels == 1).all()) else labels.to(device)


def check_objective_inputs(
    objective: Objective, inputs: dict[str, Tensor | None], recipe: str, hints: Mapping[str, str]
) -> None:
    """Validate, when a recipe is built, the inputs its steps will pass: ``inputs`` are placeholder
    tensors of a batch's shapes (B, or (B, K)), made by the recipe's own step code from what its
    data has, so that a missing column or option is refused before any model loads or step runs.
    Nothing is computed: the objective's ``validate`` has no side effects.

    Raises ``ValueError`` ``"<recipe>: <the objective's message>; <hint>"``, the hint being the first
    of ``hints`` (input name -> what to give or change) whose input the message names.
    """
    try:
        objective.validate(inputs)
    except ObjectiveInputError as err:
        hint = next((h for name, h in hints.items() if f"`{name}`" in str(err)), None)
        raise ValueError(f"{recipe}: {err}" + (f"; {hint}" if hint else "")) from err


def check_ties(objective: Objective, ties: str, scored_data: bool = False) -> None:
    """Raise ``ValueError`` naming the objective when ``data.ties=half`` (ties kept as the soft label
    1/2) meets an objective that cannot use a soft label, or one that takes its targets from the
    reward scores ``scored_data`` has; recipes call this when they are built."""
    if ties != "half":
        return
    if not objective.accepts_soft_labels:
        raise ValueError(
            f"data.ties=half trains each tie towards 1/2, a soft label that objective '{objective.name}' "
            "cannot use; set data.ties=drop or pick an objective that takes soft labels (dpo, ipo, "
            "cdpo, infonca, ...)"
        )
    if objective.targets_from_rewards and scored_data:
        raise ValueError(
            f"data.ties=half: objective '{objective.name}' takes its targets from the reward scores in "
            "the data, and a tie's label 1/2 would be a second, conflicting target; set data.ties=drop"
        )


def same_shape(
    tensors: dict[str, Tensor], names: tuple[str, ...], ndim: int | tuple[int, ...]
) -> tuple[int, ...]:
    """Check that the given ``names`` present in ``tensors`` share one shape of ``ndim`` dims."""
    ndims = (ndim,) if isinstance(ndim, int) else ndim
    shape: tuple[int, ...] | None = None
    first = ""
    for name in names:
        t = tensors.get(name)
        if t is None:
            continue
        if t.dim() not in ndims or t.numel() == 0:
            want = " or ".join(f"{d}-D" for d in ndims)
            raise ObjectiveInputError(
                f"`{name}` must be a non-empty {want} tensor, got shape {tuple(t.shape)}"
            )
        if shape is None:
            shape, first = tuple(t.shape), name
        elif tuple(t.shape) != shape:
            raise ObjectiveInputError(
                f"shape mismatch: `{name}` has shape {tuple(t.shape)} but `{first}` has shape {shape}"
            )
    return shape or ()


def _check_values(tensors: dict[str, Tensor]) -> None:
    checks = []
    for name, t in tensors.items():
        checks.append(t.isfinite().all())
        if name in _POSITIVE:
            checks.append((t > 0).all())
        if name in _NON_NEGATIVE:
            checks.append((t >= 0).all() & (t.sum() > 0))
        if name in _PROBABILITY:
            checks.append(((t >= 0) & (t <= 1)).all())
    device = checks[0].device
    if bool(torch.stack([c.to(device) for c in checks]).all()):  # one synchronisation
        return
    for name, t in tensors.items():  # slow path: find the culprit for the message
        if not bool(t.isfinite().all()):
            bad = "NaN" if bool(t.isnan().any()) else "inf"
            raise ObjectiveInputError(f"`{name}` contains {bad} values")
        if name in _POSITIVE and not bool((t > 0).all()):
            raise ObjectiveInputError(f"`{name}` must be positive (an empty completion has no log-prob)")
        if name in _NON_NEGATIVE and not bool((t >= 0).all() & (t.sum() > 0)):
            raise ObjectiveInputError(f"`{name}` must be non-negative with a positive sum")
        if name in _PROBABILITY and not bool(((t >= 0) & (t <= 1)).all()):
            raise ObjectiveInputError(f"`{name}` must lie in [0, 1]")


def weighted_mean(losses: Tensor, weights: Tensor | None) -> Tensor:
    if weights is None:
        return losses.mean()
    return (losses * weights).sum() / weights.sum()


def to_floats(metrics: dict[str, Tensor]) -> dict[str, float]:
    """Detach and move all metrics to Python floats in one device synchronisation."""
    if not metrics:
        return {}
    first = next(iter(metrics.values()))
    dtype = torch.float32 if first.device.type == "mps" else torch.float64  # MPS has no float64
    values = torch.stack([v.detach().reshape(()).to(dtype) for v in metrics.values()]).tolist()
    return dict(zip(metrics, values, strict=True))


# -- registry -----------------------------------------------------------------------------

_REGISTRY: dict[str, type[Objective]] = {}
ObjectiveT = TypeVar("ObjectiveT", bound=type[Objective])


def register_objective(name: str) -> Callable[[ObjectiveT], ObjectiveT]:
    """Class decorator: register an objective under ``name`` (names are unique)."""

    def deco(cls: ObjectiveT) -> ObjectiveT:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(
                f"objective name '{name}' is already registered by {_REGISTRY[name].__module__}."
                f"{_REGISTRY[name].__qualname__}; cannot register {cls.__module__}.{cls.__qualname__}"
            )
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def list_objectives() -> list[str]:
    """Names of all registered objectives, sorted."""
    return sorted(_REGISTRY)


def objective_class(name: str) -> type[Objective]:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise KeyError(f"unknown objective '{name}'{hint} (known: {', '.join(list_objectives())})")
    return _REGISTRY[name]


def get_objective(name: str, **hparams: Any) -> Objective:
    """Build a registered objective; hyper-parameters are type-checked like config values."""
    return build(objective_class(name), hparams, source=f"objective '{name}'")


def objective_spec(name: str, carried: Mapping[str, Any] | None = None, **hparams: Any) -> dict[str, Any]:
    """Every hyper-parameter of objective ``name``, as a config's ``objective`` mapping: ``hparams``,
    else those of ``carried`` (another objective's mapping) that ``name`` takes, else its defaults.

    ``carried`` keeps a scale across objectives: Diffusion-DPO's beta 5000 suits the denoising
    likelihood whichever objective weighs it, where an objective's own default (0.1) suits tokens.

    Raises:
        KeyError: ``name`` is not registered (naming close matches).
        ConfigError: a hyper-parameter is unknown or of the wrong type (naming it).
    """
    takes = {f.name for f in dataclasses.fields(objective_class(name)) if f.init}
    kept = {k: v for k, v in (carried or {}).items() if k in takes}
    objective = get_objective(name, **{**kept, **hparams})
    return {"name": name, **{k: getattr(objective, k) for k in sorted(takes)}}
