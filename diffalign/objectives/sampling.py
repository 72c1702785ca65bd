"""RSO's statistical rejection sampling (Liu et al. 2023, Algorithm 1).

Given K candidates drawn from the SFT policy with reward scores ``r``, accept candidates so
that the accepted ones follow ``pi_r(y) ~ pi_sft(y) exp(r(y) / beta)``: scan the remaining
candidates in order and accept each with probability ``exp((r - r_max) / beta)``, ``r_max``
the highest remaining reward (so each pass accepts at least the best one), until
``num_samples`` are accepted. Small ``beta`` approaches best-of-K; large ``beta`` approaches
uniform sampling from the SFT policy. The paper's default is beta 0.5.

:func:`pairs_from_scores` turns one prompt's scored candidates into preference pairs by one of
three rules: best against worst, every pair apart by a margin, or RSO's accepted candidates taken
two by two (the paper pairs the accepted samples in order).
"""

from __future__ import annotations

from itertools import combinations
from typing import Literal

import torch
from torch import Tensor

__all__ = ["PairRule", "pairs_from_scores", "rso_rejection_sample"]

PairRule = Literal["best_worst", "margin", "rso"]


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


def pairs_from_scores(
    scores: Tensor,
    rule: PairRule,
    margin: float = 0.0,
    num_accepted: int = 2,
    beta: float = 0.5,
    generator: torch.Generator | None = None,
) -> list[tuple[int, int]]:
    """Preference pairs ``(chosen, rejected)`` (indices into ``scores`` (K,)) of one prompt's
    candidates: ``"best_worst"`` the highest against the lowest score; ``"margin"`` every two
    candidates, in index order; ``"rso"`` the ``num_accepted`` candidates
    :func:`rso_rejection_sample` accepts (at ``beta``), taken two by two in order of acceptance.
    Under every rule a pair whose scores differ by less than ``margin``, or not at all, is left
    out (a tie carries no preference), and the higher score is chosen.

    Raises:
        ValueError: ``scores`` is not (K,) with K >= 2 or holds NaN/inf, an unknown ``rule``, a
            negative ``margin``, or (``"rso"``) ``num_accepted`` odd or outside [2, K].
    """
    if scores.dim() != 1 or len(scores) < 2:
        raise ValueError(f"scores must be (K,) with K >= 2 candidates, got shape {tuple(scores.shape)}")
    if not bool(scores.isfinite().all()):
        raise ValueError("scores contain NaN or inf: a pair cannot be ordered")
    if not margin >= 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    values = scores.detach().double().cpu().tolist()
    if rule == "best_worst":
        candidates = [
            (max(range(len(values)), key=values.__getitem__), min(range(len(values)), key=values.__getitem__))
        ]
    elif rule == "margin":
        candidates = list(combinations(range(len(values)), 2))
    elif rule == "rso":
        if num_accepted < 2 or num_accepted % 2 or num_accepted > len(values):
            raise ValueError(
                f"num_accepted must be even, >= 2 and <= the {len(values)} candidates, got {num_accepted}"
            )
        accepted = rso_rejection_sample(scores, num_accepted, beta, generator).tolist()
        candidates = list(zip(accepted[0::2], accepted[1::2], strict=True))
    else:
        raise ValueError(f"unknown pairing rule {rule!r} (best_worst, margin, rso)")
    pairs = []
    for a, b in candidates:
        gap = values[a] - values[b]
        if gap != 0 and abs(gap) >= margin:
            pairs.append((a, b) if gap > 0 else (b, a))
    return pairs
