"""Advantages for policy-gradient training: rewards centred and scaled over the gathered batch,
per prompt (DDPO's stat tracker), or per group of samples of one input (GRPO-style).

Every mode divides by the population standard deviation plus ``eps`` (1e-6, as DDPO's
``ddpo_pytorch/stat_tracking.py``, numpy's ``std``); PrefPaint's official script divides by
torch's unbiased std plus 1e-7, a factor sqrt((n - 1)/n) (0.97 for its batch of 16) that the
advantage clip and Adam's scale invariance leave without visible effect. Non-finite rewards
(a reward model's NaN) are left out of every mean, std and tracker buffer, and get advantage NaN:
the recipe decides what to do with those samples.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch
from torch import Tensor

__all__ = ["PerPromptStatTracker", "batch_advantages", "group_advantages"]

EPS = 1e-6


def _standardise(rewards: Tensor, over: Tensor) -> Tensor:
    """``(rewards - mean(over)) / (std(over) + EPS)`` over the finite values of ``over``; 0 for
    every reward when ``over`` has none."""
    finite = over[over.isfinite()].double()
    if finite.numel() == 0:
        return torch.zeros_like(rewards)
    mean, std = finite.mean(), finite.std(correction=0)
    return ((rewards.double() - mean) / (std + EPS)).to(rewards.dtype)


def _with_nan(advantages: Tensor, rewards: Tensor) -> Tensor:
    return torch.where(rewards.isfinite(), advantages, torch.full_like(advantages, float("nan")))


def batch_advantages(rewards: Tensor) -> Tensor:
    """(N,) rewards standardised over the batch (PrefPaint's ``train_inpainting_model.py`` over the
    gathered batch; DDPO without per-prompt tracking). NaN where a reward is not finite."""
    return _with_nan(_standardise(rewards, rewards), rewards)


def group_advantages(rewards: Tensor, groups: Tensor) -> Tensor:
    """(N,) rewards standardised within their group (``groups`` (N,) integer ids: the samples of one
    prompt or one masked input), GRPO-style; a group of one sample gets 0. NaN where a reward is not
    finite.

    Raises:
        ValueError: ``groups`` is not (N,).
    """
    if groups.shape != rewards.shape:
        raise ValueError(
            f"groups must have the rewards' shape {tuple(rewards.shape)}, got {tuple(groups.shape)}"
        )
    out = torch.zeros_like(rewards)
    for g in groups.unique():
        rows = groups == g
        out[rows] = _standardise(rewards[rows], rewards[rows])
    return _with_nan(out, rewards)


class PerPromptStatTracker:
    """DDPO's per-prompt reward statistics (kvablack/ddpo-pytorch ``stat_tracking.py``): each prompt
    keeps its last ``buffer_size`` rewards; a reward is standardised by its prompt's buffer once the
    buffer holds ``min_count``, by the whole batch's rewards before. Checkpointable, so that a
    resumed run standardises as the interrupted one would have.
    """

    def __init__(self, buffer_size: int = 16, min_count: int = 16) -> None:
        if buffer_size < 1 or not 1 <= min_count <= buffer_size:
            raise ValueError(
                f"need buffer_size >= 1 and 1 <= min_count <= buffer_size, got {buffer_size}, {min_count}"
            )
        self.buffer_size, self.min_count = buffer_size, min_count
        self.stats: dict[str, deque[float]] = {}

    def update(self, prompts: list[str], rewards: Tensor) -> Tensor:
        """Push the batch's finite rewards (N,) into their prompts' buffers, then return the
        advantages (N,) (NaN where a reward is not finite).

        Raises:
            ValueError: ``prompts`` and ``rewards`` differ in length.
        """
        if len(prompts) != len(rewards):
            raise ValueError(f"{len(prompts)} prompts for {len(rewards)} rewards")
        values = rewards.detach().cpu()
        out = torch.zeros_like(values)
        for prompt in dict.fromkeys(prompts):
            rows = torch.tensor([p == prompt for p in prompts])
            buffer = self.stats.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(v for v in values[rows].tolist() if torch.isfinite(torch.tensor(v)))
            over = torch.tensor(list(buffer)) if len(buffer) >= self.min_count else values
            out[rows] = _standardise(values[rows], over)
        return _with_nan(out, values).to(rewards.device)

    def state_dict(self) -> dict[str, Any]:
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "stats": {k: list(v) for k, v in self.stats.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Raises ``ValueError`` when the checkpoint's tracker kept other buffer sizes."""
        saved = (state["buffer_size"], state["min_count"])
        if saved != (self.buffer_size, self.min_count):
            raise ValueError(
                f"the checkpoint's per-prompt stat tracker has buffer_size, min_count = {saved}, this run "
                f"{(self.buffer_size, self.min_count)}: resume with the same"
            )
        self.stats = {k: deque(v, maxlen=self.buffer_size) for k, v in state["stats"].items()}
