"""Uncertainty of a preference model over pairs, for choosing which pairs to label or trust.

One quantity serves two methods: UPO (Wang et al. 2024, MC-dropout passes of a preference
estimator) and BAL-PM (Melo et al. 2024, an ensemble of Bradley-Terry heads) both rank pairs
by BALD, the mutual information between a pair's label and the model's parameters.
BAL-PM adds a k-nearest-neighbour estimate of the entropy of the labelled prompts' distribution
(:func:`knn_prompt_entropy`) and picks a batch greedily (:func:`balpm_select`);
``scripts/select_pairs.py`` applies it to a pool of unlabelled pairs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "balpm_select",
    "binary_bald",
    "binary_entropy",
    "count_within",
    "knn_prompt_entropy",
    "knn_radius",
    "standardize_features",
]


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


# BAL-PM defaults: the paper's main Reddit run (scripts/slurm/run_active_learning_adapters.sh:53-58,
# state_ent_k 13, state_ent_beta 1e-2, normalize_state_features True, normalize_entropy False),
# not the parser's defaults (parsing/active_learning_parser.py:38-44: k 30, beta 5e-4,
# normalize_entropy True). The official k counts the point itself among its neighbours
# (utils.py:100-114 runs top-k over the pool including the query, distance 0), so its k = 13 is
# the 12th other neighbour: K_NEIGHBOURS = 12 here, where the query is excluded.
K_NEIGHBOURS, BETA, D_ENT = 12, 0.01, 1.0
_CHUNK = 1024  # rows of the distance matrix held at once: memory O(chunk x N), not O(N^2)


def _cdist(a: Tensor, b: Tensor) -> Tensor:
    # the direct formula, as the official code: the matmul shortcut rounds a pair's distance
    # differently in differently sized blocks, and a neighbour exactly at the radius must count
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def _check_features(features: Tensor, labelled_mask: Tensor, k: int) -> Tensor:
    if features.dim() != 2 or not bool(torch.isfinite(features).all()):
        raise ValueError(f"features must be finite (N, D), got shape {tuple(features.shape)}")
    if labelled_mask.shape != features.shape[:1] or labelled_mask.dtype != torch.bool:
        raise ValueError(
            f"labelled_mask must be bool ({features.shape[0]},), got {labelled_mask.dtype} "
            f"{tuple(labelled_mask.shape)}"
        )
    if not 1 <= k < features.shape[0]:
        raise ValueError(f"k must be in [1, {features.shape[0] - 1}] for {features.shape[0]} points, got {k}")
    return features.double()


def standardize_features(features: Tensor) -> Tensor:
    """``(x - mean) / std`` per feature over the N rows of ``features`` (N, D); a constant
    feature is only centred. The official code meant this (``normalize_state_features``) but
    writes ``fts - mean / std`` (active_learning.py:542, 564): a shift, applied to the pool and
    not to the labelled points, so its distances between the two are off by that shift."""
    std = features.std(0, unbiased=False)
    return (features - features.mean(0)) / torch.where(std > 0, std, torch.ones_like(std))


def knn_radius(features: Tensor, k: int) -> Tensor:
    """(N,) distance of each row of ``features`` (N, D) to its k-th nearest *other* row
    (official ``utils.find_kth_nearest_dists``, less the self-match; a duplicate row counts
    as a neighbour at distance 0)."""
    radius = torch.empty(len(features), dtype=features.dtype)
    for start in range(0, len(features), _CHUNK):
        dist = _cdist(features[start : start + _CHUNK], features)
        rows = torch.arange(dist.shape[0])
        dist[rows, rows + start] = math.inf  # the query is not its own neighbour
        radius[start : start + _CHUNK] = dist.topk(k, largest=False).values[:, -1]
    return radius


def count_within(features: Tensor, centres: Tensor, radius: Tensor) -> Tensor:
    """(N,) number of rows of ``centres`` (L, D) within ``radius`` (N,) of each row of
    ``features`` (N, D), boundary included (official ``utils.compute_nbatch``)."""
    counts = torch.zeros(len(features), dtype=features.dtype)
    if len(centres) == 0:
        return counts
    for start in range(0, len(features), _CHUNK):
        dist = _cdist(features[start : start + _CHUNK], centres)
        counts[start : start + _CHUNK] = (dist <= radius[start : start + _CHUNK, None]).sum(1)
    return counts


def _entropy(radius: Tensor, counts: Tensor, d_ent: float) -> Tensor:
    # BAL-PM active_learning.py:422-424: the KSG-type estimate; log(2 d_k + 1e-4) keeps it
    # finite where a point has a duplicate (d_k = 0).
    return torch.log(2.0 * radius + 1e-4) - torch.digamma(counts + 1.0) / d_ent


def knn_prompt_entropy(
    features: Tensor,
    labelled_mask: Tensor,
    k: int = K_NEIGHBOURS,
    d_ent: float = D_ENT,
    standardize: bool = True,
) -> Tensor:
    """BAL-PM's prompt-entropy term ``H(s) = log(2 d_k(s) + 1e-4) - digamma(n(s) + 1) / d_ent``.

    ``d_k(s)``: distance to the k-th nearest other point among *all* N points (labelled and
    not: the whole pool describes the prompt distribution); ``n(s)``: labelled points within
    ``d_k(s)``. High where the labelled set is sparse relative to the pool. Source: Melo et al.
    2024, official active_learning.py:412-475, 530-550 and utils.py:100-139 (read at f4af76a).
    Differences: the query is not its own neighbour (see ``K_NEIGHBOURS``); ``standardize``
    z-scores all points alike (:func:`standardize_features`); and ``d_k`` is taken over labelled
    and unlabelled points, where the official code takes it over the pool still unlabelled at
    that round (so its radii grow as the pool is used up). ``d_ent`` = 1 as the code (the
    paper's d is the feature dimension; with 1 the digamma term dominates the distance term).

    Args:
        features: (N, D) prompt features of every pool point.
        labelled_mask: (N,) bool, True for points already labelled.
        k: neighbour rank, 1 <= k < N.
        d_ent: divisor of the digamma term, > 0.
        standardize: z-score each feature over the N points first.

    Returns:
        (N,) float64 entropy estimates (nats, any sign).

    Raises:
        ValueError: non-finite or non-2-D ``features``, a mask of the wrong shape or dtype,
            ``k`` out of range, ``d_ent`` <= 0.
    """
    x = _prepared(features, labelled_mask, k, d_ent, standardize)
    radius = knn_radius(x, k)
    return _entropy(radius, count_within(x, x[labelled_mask], radius), d_ent)


def _prepared(features: Tensor, labelled_mask: Tensor, k: int, d_ent: float, standardize: bool) -> Tensor:
    x = _check_features(features, labelled_mask, k)
    if not d_ent > 0:
        raise ValueError(f"d_ent must be > 0, got {d_ent}")
    return standardize_features(x) if standardize else x


def balpm_select(
    bald: Tensor,
    features: Tensor,
    labelled_mask: Tensor,
    batch: int,
    k: int = K_NEIGHBOURS,
    beta: float = BETA,
    d_ent: float = D_ENT,
    standardize: bool = True,
    normalize_entropy: bool = False,
) -> Tensor:
    """BAL-PM's greedy batch: ``batch`` unlabelled points, each the argmax of
    ``bald + beta * H(s)`` (:func:`knn_prompt_entropy`), after which it counts as labelled,
    so the neighbours' ``n(s)`` grows and their entropy falls (official
    active_learning.py:412-466, "batch-state-entropy"; ``d_k`` computed once).

    Args:
        bald: (N,) epistemic uncertainty of every point (:func:`binary_bald`); labelled
            points' values are ignored.
        features, labelled_mask, k, d_ent, standardize: as :func:`knn_prompt_entropy`.
        batch: points to pick, 1 <= batch <= unlabelled points.
        beta: weight of the entropy term (0: BALD alone); its scale depends on
            ``normalize_entropy`` (main run 0.01 without, parser default 5e-4 with).
        normalize_entropy: z-score H over the remaining candidates before each pick
            (official ``normalize_entropy``).

    Returns:
        (batch,) long indices into the N points, in pick order.

    Raises:
        ValueError: as :func:`knn_prompt_entropy`; ``bald`` not finite (N,); ``batch`` out of
            range; ``beta`` not finite.
    """
    x = _prepared(features, labelled_mask, k, d_ent, standardize)
    if bald.shape != labelled_mask.shape or not bool(torch.isfinite(bald).all()):
        raise ValueError(f"bald must be finite ({len(x)},), got shape {tuple(bald.shape)}")
    if not 1 <= batch <= int((~labelled_mask).sum()):
        raise ValueError(
            f"batch must be in [1, {int((~labelled_mask).sum())}] (unlabelled points), got {batch}"
        )
    if not math.isfinite(beta):
        raise ValueError(f"beta must be finite, got {beta}")
    radius = knn_radius(x, k)
    labelled = labelled_mask.clone()
    counts = count_within(x, x[labelled], radius)
    picks = []
    for _ in range(batch):
        entropy = _entropy(radius, counts, d_ent)
        if normalize_entropy:
            free = entropy[~labelled]
            std = free.std(unbiased=True) if len(free) > 1 else free.new_tensor(0.0)
            entropy = (entropy - free.mean()) / std if std > 0 else torch.zeros_like(entropy)
        score = (bald.double() + beta * entropy).masked_fill(labelled, -math.inf)
        pick = int(score.argmax())
        picks.append(pick)
        labelled[pick] = True
        counts += count_within(x, x[pick : pick + 1], radius)
    return torch.tensor(picks, dtype=torch.long)
