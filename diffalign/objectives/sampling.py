"""RSO's statistical rejection sampling (Liu et al. 2023, Algorithm 1).

Given K candidates drawn from the SFT policy with reward scores ``r``, accept candidates so
that the accepted ones follow ``pi_r(y) ~ pi_sft(y) exp(r(y) / beta)``: scan the remaining
candidates in order and accept each with probability ``exp((r - r_max) / beta)``, ``r_max``
the highest remaining reward (so each pass accepts at least the best one), until
``num_samples`` are accepted. Small ``beta`` approaches best-of-K; large ``beta`` approaches
uniform sampling from the SFT policy. The paper's default is beta 0.5.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["rso_rejection_sample"]


def rso_rejection_sample(
    rewards: Tensor, num_samples: int, beta: float = 0.5, generator: torch.Generator | None = None
) -> Tensor:
    """Indices of accepted candidates, in order of acceptance, without repeats.

    ``rewards`` is (K,) or (B, K); the result is (num_samples,) or (B, num_samples).
    """
    if rewards.dim() not in (1, 2) or rewards.shape[-1] == 0:
        raise ValueError(f"`rewards` must be (K,) or (B, K) with K >= 1, got shape {tuple(rewards.shape)}")
    if not bool(rewards.isfinite().all()):
        raise ValueError("`rewards` contains NaN or inf values")
    k = rewards.shape[-1]
    if not 1 <= num_samples <= k:
        raise ValueError(f"num_samples must be in [1, {k}] (the number of candidates), got {num_samples}")
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta}")
    rows = rewards.detach().double().cpu().reshape(-1, k)
    out = torch.empty(rows.shape[0], num_samples, dtype=torch.long)
    for b, row in enumerate(rows):
        remaining = list(range(k))
        accepted: list[int] = []
        while len(accepted) < num_samples:
            r_max = max(float(row[i]) for i in remaining)
            u = torch.rand(len(remaining), generator=generator, dtype=torch.float64)
            for i, ui in zip(list(remaining), u.tolist(), strict=True):
                if ui < float(torch.exp((row[i] - r_max) / beta)):
                    accepted.append(i)
                    remaining.remove(i)
                    if len(accepted) == num_samples:
                        break
        out[b] = torch.tensor(accepted)
    return out.reshape(*rewards.shape[:-1], num_samples).to(rewards.device)
