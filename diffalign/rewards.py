"""The reward-model registry and the contract every reward follows.

A reward is a :class:`RewardModel`: ``reward(images, prompts=None, **context) -> Tensor (N,)``
with images float NCHW in [0, 1] on any device, prompts a list of N strings, and ``context``
for extra inputs (``masks`` and ``masked_images`` for inpainting rewards, metadata). Each
reward declares what it needs (``needs_prompts``, ``needs_masks``) and whether it can be
differentiated (``differentiable``); inputs are checked before scoring, and scoring runs under
no-grad unless ``differentiable=True`` is asked for (and supported).

Rewards are registered by name through the entry-point group ``diffalign.rewards``; diffalign's
built-ins (the ``diffalign_rewards`` package) are registered exactly that way in its
``pyproject.toml``. Entry points are read once and imported only when loaded.
``@register_reward("name")`` registers a class at import time (for code that is not an
installed distribution), and ``load_reward("package.module:Class")`` loads any class by path.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.metadata
import inspect
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "RewardInputError",
    "RewardModel",
    "list_rewards",
    "load_reward",
    "register_reward",
]

ENTRY_POINT_GROUP = "diffalign.rewards"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class RewardInputError(ValueError):
    """A reward was called with images, prompts or context it cannot use."""


class RewardModel(torch.nn.Module):
    """Base class of every reward: subclasses implement :meth:`score` on validated inputs."""

    name: ClassVar[str] = ""
    needs_prompts: ClassVar[bool] = False
    needs_masks: ClassVar[bool] = False
    differentiable: ClassVar[bool] = False
    context_keys: ClassVar[tuple[str, ...]] = ()  # extra context it understands besides masks
    # what an inpainting reward's masked input holds in the hole (0: black, masked_for_reward;
    # 0.5: grey, masked_for_inpainting): `masked_images` given are checked against it
    masked_fill: ClassVar[float | None] = None

    def score(self, images: Tensor, prompts: list[str] | None, **context: Tensor) -> Tensor:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        first = next(iter(self.parameters()), None)
        return first.device if first is not None else torch.device("cpu")

    def forward(
        self,
        images: Tensor,
        prompts: list[str] | None = None,
        *,
        differentiable: bool = False,
        **context: Any,
    ) -> Tensor:
        images, prompts, context = self.validate(images, prompts, context)
        if differentiable and not self.differentiable:
            raise RewardInputError(f"reward '{self.name}' is not differentiable")
        with torch.set_grad_enabled(differentiable):
            scores = self.score(images, prompts, **context)
        if scores.shape != (images.shape[0],):
            raise RuntimeError(
                f"reward '{self.name}' returned shape {tuple(scores.shape)}, expected ({images.shape[0]},)"
            )
        return scores

    def validate(
        self, images: Tensor, prompts: list[str] | None, context: dict[str, Any]
    ) -> tuple[Tensor, list[str] | None, dict[str, Any]]:
        if not isinstance(images, Tensor):
            raise RewardInputError(
                f"images must be a float tensor (N, 3, H, W) in [0, 1], got {type(images).__name__}"
            )
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[0] == 0:
            raise RewardInputError(f"images must be (N, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise RewardInputError(
                f"images must be float in [0, 1], got {images.dtype} (divide uint8 images by 255)"
            )
        if images.device.type == "meta":
            raise RewardInputError("images are on the 'meta' device: they hold no values to score")
        finite = torch.isfinite(images.detach()).flatten(1).all(1)
        if not bool(finite.all()):
            bad = (~finite).nonzero().flatten().tolist()
            raise RewardInputError(f"images contain NaN or inf (image {bad[0]}; {len(bad)} of {len(finite)})")
        low, high = (float(v) for v in images.detach().aminmax())
        if low < -1e-3 or high > 1 + 1e-3:
            hint = " (they look like [0, 255]: divide by 255)" if high > 2 else ""
            raise RewardInputError(
                f"images must lie in [0, 1], found values in [{low:.6g}, {high:.6g}]{hint}"
            )
        n = images.shape[0]
        if prompts is not None:
            if isinstance(prompts, str) or len(prompts) != n:
                got = "a string" if isinstance(prompts, str) else f"{len(prompts)} prompts"
                raise RewardInputError(f"prompts must be a list of {n} strings (one per image), got {got}")
            odd = [p for p in prompts if not isinstance(p, str)]
            if odd:
                raise RewardInputError(f"prompts must be strings, got a {type(odd[0]).__name__}: {odd[0]!r}")
        elif self.needs_prompts:
            raise RewardInputError(f"reward '{self.name}' needs prompts (one per image)")
        allowed = (("masks", "masked_images") if self.needs_masks else ()) + self.context_keys
        unknown = [k for k in context if k not in allowed]
        if unknown:
            raise RewardInputError(
                f"reward '{self.name}' cannot use `{unknown[0]}`"
                + (f" (it takes: {', '.join(allowed)})" if allowed else "")
            )
        if self.needs_masks:
            self._validate_masks(images, context.get("masks"), context.get("masked_images"))
        device = self.device
        context = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in context.items()}
        return images.to(device), prompts, context

    def _validate_masks(self, images: Tensor, masks: Any, masked: Any) -> None:
        n = images.shape[0]
        if masks is None:
            raise RewardInputError(
                f"reward '{self.name}' is an inpainting reward: it needs `masks` (N, 1, H, W)"
            )
        if not isinstance(masks, Tensor) or masks.shape != (n, 1, *images.shape[-2:]):
            got = tuple(masks.shape) if isinstance(masks, Tensor) else type(masks).__name__
            raise RewardInputError(f"`masks` must be (N, 1, H, W) = {(n, 1, *images.shape[-2:])}, got {got}")
        _require_unit_range(masks.float(), "masks")
        if masked is None:
            return
        if not isinstance(masked, Tensor) or masked.shape != images.shape or not masked.is_floating_point():
            got = (
                f"{tuple(masked.shape)} {masked.dtype}"
                if isinstance(masked, Tensor)
                else type(masked).__name__
            )
            raise RewardInputError(
                f"`masked_images` must be float and shaped like the images {tuple(images.shape)}, got {got}"
            )
        _require_unit_range(masked, "masked_images")
        hole = (masks >= 0.5).expand_as(masked)
        if self.masked_fill is not None and bool(hole.any()):
            off = float((masked.detach()[hole].float() - self.masked_fill).abs().max())
            if off > 1 / 255 + 1e-6:  # float32's 1/255 lies a hair above the double's
                raise RewardInputError(
                    f"reward '{self.name}' was trained on masked inputs holding {self.masked_fill} in the "
                    "hole (diffalign.images.masked_for_reward makes them); `masked_images` differ there by "
                    f"up to {off:.3g} (grey 0.5 is masked_for_inpainting's fill: the UNet's)"
                )


def _require_unit_range(values: Tensor, name: str) -> None:
    """Raise ``RewardInputError`` unless every value of ``values`` is finite and in [0, 1]."""
    v = values.detach()
    if not bool(v.isfinite().all()):
        raise RewardInputError(f"`{name}` contain NaN or inf")
    low, high = (float(x) for x in v.float().aminmax())
    if low < -1e-3 or high > 1 + 1e-3:
        hint = " (they look like [0, 255]: divide by 255)" if high > 2 else ""
        raise RewardInputError(f"`{name}` must lie in [0, 1], found values in [{low:.6g}, {high:.6g}]{hint}")


# -- registry -----------------------------------------------------------------------------

_DECORATED: dict[str, type[RewardModel]] = {}
R = TypeVar("R", bound=type[RewardModel])


def register_reward(name: str) -> Callable[[R], R]:
    """Class decorator: register a reward under ``name`` for code that has no entry point."""

    def deco(cls: R) -> R:
        known = _entry_points()
        if name in known or (name in _DECORATED and _DECORATED[name] is not cls):
            other = (
                known[name].value
                if name in known
                else f"{_DECORATED[name].__module__}.{_DECORATED[name].__qualname__}"
            )
            raise ValueError(
                f"reward name '{name}' is already registered by {other}; "
                f"cannot register {cls.__module__}.{cls.__qualname__}"
            )
        cls.name = name
        _DECORATED[name] = cls
        return cls

    return deco


@functools.cache
def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    found: dict[str, importlib.metadata.EntryPoint] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in found and found[ep.name].value != ep.value:
            raise ValueError(
                f"two reward plug-ins are both named '{ep.name}': {found[ep.name].value} and {ep.value} "
                f"(entry-point group '{ENTRY_POINT_GROUP}'); uninstall one or rename it"
            )
        found[ep.name] = ep
    return found


def list_rewards() -> list[str]:
    """Names of every registered reward (entry points and decorated classes), sorted."""
    return sorted({*_entry_points(), *_DECORATED})


def reward_class(name_or_path: str) -> type[RewardModel]:
    """The class behind a registered name, or behind a ``module:attr`` path."""
    if name_or_path in _DECORATED:
        return _DECORATED[name_or_path]
    eps = _entry_points()
    if name_or_path in eps:
        cls = eps[name_or_path].load()
        cls.name = name_or_path
        return cls
    if ":" in name_or_path:
        module, _, attr = name_or_path.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise KeyError(f"cannot load reward class '{name_or_path}': {err}") from err
        if not (isinstance(cls, type) and issubclass(cls, RewardModel)):
            raise TypeError(f"'{name_or_path}' is not a RewardModel subclass")
        return cls
    close = difflib.get_close_matches(name_or_path, list_rewards(), n=3)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise KeyError(f"unknown reward '{name_or_path}'{hint} (known: {', '.join(list_rewards())})")


def load_reward(name_or_path: str, **kwargs: Any) -> RewardModel:
    """Build a reward by registered name or ``module:Class`` path; ``kwargs`` go to its constructor
    (weights paths or hub ids, device, options)."""
    cls = reward_class(name_or_path)
    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        known = [k for k in params if k != "self"]
        for key in kwargs:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                if key == "differentiable":
                    hint = "; differentiable is given when scoring: reward(images, differentiable=True)"
                raise TypeError(
                    f"reward '{name_or_path}' has no option '{key}'{hint} (options: {', '.join(known)})"
                )
    return cls(**kwargs)
