"""The misspecification report: an annotator-conditioned reward wins held-out likelihood only
where the annotators really disagree (Dumoulin et al. 2024, a mixture of annotators is not one
Bradley-Terry model)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffalign_rewards.bradley_terry import (
    ModelSpec,
    PairSplit,
    TrainRewardConfig,
    fit_heads,
    misspecification_report,
)

ITEMS, DIM, ANNOTATORS, PAIRS_EACH = 400, 6, 6, 150


def synthetic_split(disagree: bool, seed: int) -> tuple[torch.Tensor, PairSplit]:
    """Items (ITEMS, DIM); each annotator's reward ``w.x + sign_a * v.x``, with ``sign_a`` = +1 for
    half of them and -1 for the others when they disagree, 0 when they agree; 30 % held out."""
    g = torch.Generator().manual_seed(seed)
    items = torch.randn(ITEMS, DIM, generator=g)
    w, v = 2 * torch.randn(DIM, generator=g), 2 * torch.randn(DIM, generator=g)
    pairs, labels, annotators = [], [], []
    for a in range(ANNOTATORS):
        sign = (1.0 if a % 2 else -1.0) if disagree else 0.0
        reward = items @ (w + sign * v)
        ij = torch.randint(ITEMS, (PAIRS_EACH, 2), generator=g)
        p = torch.sigmoid(reward[ij[:, 0]] - reward[ij[:, 1]])
        first_wins = torch.rand(PAIRS_EACH, generator=g) < p
        pairs.append(torch.where(first_wins[:, None], ij, ij.flip(1)))
        labels.append(torch.ones(PAIRS_EACH))
        annotators += [f"user{a}"] * PAIRS_EACH
    order = torch.randperm(ANNOTATORS * PAIRS_EACH, generator=g)
    n_val = int(0.3 * len(order))
    split = PairSplit(torch.cat(pairs), torch.cat(labels), order[n_val:], order[:n_val], 0, annotators)
    return items, split


def report(disagree: bool, seed: int = 0) -> dict[str, float]:
    items, split = synthetic_split(disagree, seed)
    spec = ModelSpec(hidden_dim=16)
    cfg = TrainRewardConfig(
        data=Path("synthetic"), output_dir=Path("unused"), epochs=40, batch_size=128, lr=1e-2, seed=seed
    )
    single = fit_heads(items, split.pairs, split.labels, split.train, spec, cfg)
    return misspecification_report(items, split, single, spec, cfg)


def test_disagreeing_annotators_are_detected() -> None:
    out = report(disagree=True)
    assert out["annotators"] == ANNOTATORS and out["annotators_modelled"] == ANNOTATORS
    assert out["validation_loglik_gain"] > 4 * out["validation_loglik_gain_stderr"], out
    assert out["validation_loglik_gain"] == pytest.approx(
        out["validation_loglik_annotator"] - out["validation_loglik_single"], abs=1e-6
    )


def test_agreeing_annotators_show_no_gain() -> None:
    out = report(disagree=False)
    assert out["validation_loglik_gain"] < 2 * out["validation_loglik_gain_stderr"], out


def test_rare_annotators_share_the_single_model_and_bad_input() -> None:
    items, split = synthetic_split(disagree=True, seed=1)
    spec = ModelSpec(hidden_dim=8)
    cfg = TrainRewardConfig(
        data=Path("synthetic"), output_dir=Path("unused"), epochs=1, annotator_min_pairs=10_000
    )
    single = fit_heads(items, split.pairs, split.labels, split.train, spec, cfg)
    assert misspecification_report(items, split, single, spec, cfg)["annotators_modelled"] == 0
    split.annotators = split.annotators[:-1]
    with pytest.raises(ValueError, match=r"split\.annotators"):
        misspecification_report(items, split, single, spec, cfg)
