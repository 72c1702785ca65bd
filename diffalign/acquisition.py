"""Uncertainty of a preference model over pairs, for choosing which pairs to label or trust.

One quantity serves two methods: UPO (Wang et al. 2024, MC-dropout passes of a preference
estimator) and BAL-PM (Melo et al. 2024, an ensemble of Bradley-Terry heads) both rank pairs
by BALD, the mutual information between a pair's label and the model's parameters.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["binary_bald", "binary_entropy"]


def binary_entropy(p: Tensor) -> Tensor:
    """Entropy in nats of a Bernoulli(p), elementwise; 0 at p = 0 and p = 1."""
    return -(torch.xlogy(p, p) + torch.xlogy(1 - p, 1 - p))


def binary_bald(probs: Tensor) -> Tensor:
    """BALD of binary preferences: ``H[mean_m p_m] - mean_m H[p_m]`` (nats, in [0, log 2]).

    Args:
        probs: (M, N) probabilities P(first candidate preferred) from M ensemble members or
            MC-dropout passes for N pairs (UPO Eq. for ``B_j``; BAL-PM ``metrics/metrics.py``).

    Returns:
        (N,) information gain; 0 when the M members agree, high when they disagree confidently.

    Raises:
        ValueError: ``probs`` is not 2-D with M >= 1, or has values outside [0, 1] or NaN.
    """
    if probs.dim() != 2 or probs.shape[0] < 1:
        raise ValueError(f"probs must be (members, pairs), got shape {tuple(probs.shape)}")
    if not bool(((probs >= 0) & (probs <= 1)).all()):
        raise ValueError("probs must lie in [0, 1] (NaN is not a probability)")
    probs = probs.double()
    bald = binary_entropy(probs.mean(0)) - binary_entropy(probs).mean(0)
    return bald.clamp_min(0.0)  # rounding can leave -1e-17 where members agree
