"""Intuitive Fine-Tuning (Hua et al. 2024, arXiv 2405.11870; v3 "Towards Simplifying Alignment into
a Single Process", ACL 2025): the tensor pieces of its loss. The two forward passes live in the
recipe, :mod:`diffalign.methods.ift`.

Adapted from the official ``src/trainers.py`` (TsinghuaC3I/Intuitive-Fine-Tuning, 03adb93):
``get_cumsum_weight`` (358-425) and the ``ift`` branch of ``get_batch_metrics`` (570-594). Notation,
per sequence with answer mask m_t and T = sum_t m_t answer tokens:

- ``l_t``: the log-probability of the ground-truth answer token t given the *mixed* prefix;
- temporal residual (line 575): ``e_t = (1 - lambda) E[y*_t] + lambda E[yhat_t]``, E the input
  embedding table as copied at the start of training, yhat the greedy prediction of token t;
- relation propagation, the code's defaults (type ``loss``, side ``left``, norm ``L1``):
  ``c_t = -l_t / T`` (0 off the answer), ``w_t = sum_{j >= t} gamma^(j - t) c_j`` (a discounted
  suffix sum: later tokens' losses weigh on earlier positions), then ``w <- w T / sum_t w_t``;
  the weights are not detached (the author: "the accumulation is part of the objective",
  TsinghuaC3I/Intuitive-Fine-Tuning#2);
- loss (line 594): ``mean_batch (1/T) sum_t -l_t w_t``.

``gamma = 0`` returns weights of 1 (the code's special case at the top of ``get_cumsum_weight``;
the discounted sum at gamma 0 would be ``w_t = l_t T / sum l``, loss-proportional weights), so
that lambda = gamma = 0 is SFT.
The code's ``propagation_side="right"`` (prefix sums with inverted weights) and the ``mask`` /
``logps`` propagation types are not implemented.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["ift_loss", "ift_mix_embeddings", "ift_relation_weights"]

Norm = Literal["L1", "L2", "softmax", "log"]


def _check(token_logps: Tensor, mask: Tensor) -> None:
    if token_logps.dim() != 2 or token_logps.shape != mask.shape:
        raise ValueError(
            f"`token_logps` and `mask` must share one (B, L) shape, got {tuple(token_logps.shape)} "
            f"and {tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool:
        raise ValueError(f"`mask` must be a bool tensor, got {mask.dtype}")
    if not bool(mask.any(-1).all()):
        raise ValueError("`mask`: every sequence needs at least one answer token")
    if not bool(token_logps.isfinite().all()):
        raise ValueError("`token_logps` contains NaN or inf values")


def ift_relation_weights(token_logps: Tensor, mask: Tensor, gamma: float, norm: Norm = "L1") -> Tensor:
    """IFT's relation-propagation weights (official ``get_cumsum_weight``, side ``left``, type
    ``loss``), differentiable in ``token_logps``.

    Args:
        token_logps: (B, L) log-probabilities of the ground-truth tokens (any value off the mask).
        mask: (B, L) bool, True on answer tokens.
        gamma: discount in [0, 1]; 0 gives weights of 1 (the code's special case).
        norm: ``L1`` (the default: w itself), ``L2`` (w^2), ``softmax`` (over all L positions,
            masked ones at 0, as the code) or ``log`` (log(w + 1)), applied before renormalising.

    Returns:
        (B, L) weights, 0 off the mask, summing to T (the answer length) in each row.

    Raises:
        ValueError: shapes differ or are not 2-D, mask not bool, a row without answer tokens,
            non-finite log-probabilities, gamma outside [0, 1] or an unknown norm.
    """
    _check(token_logps, mask)
    if not 0 <= gamma <= 1:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if norm not in ("L1", "L2", "softmax", "log"):
        raise ValueError(f"norm must be L1, L2, softmax or log, got {norm!r}")
    if gamma == 0:
        return mask.to(token_logps.dtype)
    count = mask.sum(-1, keepdim=True).to(token_logps.dtype)
    c = torch.where(mask, -token_logps / count, 0.0)
    # discount[t, j] = gamma^(j - t) for j >= t: w = c discount^T is the suffix sum of every t at once
    steps = torch.arange(c.shape[-1], device=c.device)
    offset = (steps[None, :] - steps[:, None]).to(c.dtype)
    discount = torch.where(offset >= 0, torch.pow(gamma, offset.clamp(min=0)), 0.0)
    w = torch.where(mask, c @ discount.T, 0.0)
    if norm == "L2":
        w = w.pow(2)
    elif norm == "softmax":
        w = torch.softmax(w, dim=-1)
    elif norm == "log":
        w = torch.log(w + 1)
    w = torch.where(mask, w, 0.0)
    # all-zero losses (l_t = 0 everywhere) would divide 0 by 0; their weights do not matter
    return w * count / w.sum(-1, keepdim=True).clamp(min=torch.finfo(w.dtype).tiny)


def ift_loss(token_logps: Tensor, mask: Tensor, weights: Tensor) -> Tensor:
    """Per-sequence IFT loss ``(1/T) sum_t -l_t w_t`` over answer tokens, shape (B,); its mean is
    the official loss (trainers.py:594). With weights of 1 it is SFT's per-token mean NLL.

    Raises ``ValueError`` on mismatched shapes, a non-bool mask, a row without answer tokens or
    non-finite log-probabilities.
    """
    _check(token_logps, mask)
    if weights.shape != mask.shape:
        raise ValueError(f"`weights` must have shape {tuple(mask.shape)}, got {tuple(weights.shape)}")
    terms = torch.where(mask, -token_logps * weights, 0.0)
    return terms.sum(-1) / mask.sum(-1)


def ift_mix_embeddings(truth: Tensor, predicted: Tensor, lam: float) -> Tensor:
    """The temporal residual ``(1 - lam) truth + lam predicted`` (trainers.py:575), for input
    embeddings (..., H) of the ground-truth and of the predicted tokens; ``lam`` in [0, 1].

    Raises ``ValueError`` on mismatched shapes or ``lam`` outside [0, 1].
    """
    if truth.shape != predicted.shape:
        raise ValueError(f"embeddings differ in shape: {tuple(truth.shape)} and {tuple(predicted.shape)}")
    if not 0 <= lam <= 1:
        raise ValueError(f"lambda must be in [0, 1], got {lam}")
    return (1 - lam) * truth + lam * predicted
