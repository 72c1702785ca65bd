"""RSO's statistical rejection sampling (Algorithm 1 of Liu et al. 2023)."""

from __future__ import annotations

import math

import pytest
import torch

from diffalign.objectives import rso_rejection_sample


def test_two_candidates_accept_the_worse_with_probability_exp_gap() -> None:
    """Candidate 0 (reward 0) comes first and is accepted w.p. exp((0 - 1)/beta); otherwise the
    best candidate, which every pass accepts."""
    g = torch.Generator().manual_seed(0)
    rewards = torch.tensor([[0.0, 1.0]] * 20000)
    picks = rso_rejection_sample(rewards, num_samples=1, beta=0.5, generator=g)
    frac = float((picks[:, 0] == 0).double().mean())
    expected = math.exp(-1 / 0.5)
    assert frac == pytest.approx(expected, abs=4 * math.sqrt(expected * (1 - expected) / 20000))


def test_small_beta_is_best_of_k_and_large_beta_is_uniform() -> None:
    g = torch.Generator().manual_seed(1)
    rewards = torch.randn(500, 6, generator=g)
    greedy = rso_rejection_sample(rewards, 1, beta=1e-4, generator=g)[:, 0]
    assert torch.equal(greedy, rewards.argmax(-1))
    loose = rso_rejection_sample(rewards, 1, beta=1e4, generator=g)[:, 0]
    assert float((loose == 0).double().mean()) > 0.99  # everything accepted: the first in order


def test_accepts_distinct_candidates_and_shapes() -> None:
    g = torch.Generator().manual_seed(2)
    out = rso_rejection_sample(torch.randn(3, 8, generator=g), num_samples=8, beta=0.5, generator=g)
    assert out.shape == (3, 8)
    assert all(sorted(row.tolist()) == list(range(8)) for row in out)
    single = rso_rejection_sample(torch.tensor([0.3, 0.1, 0.9]), num_samples=2, generator=g)
    assert single.shape == (2,) and single.dtype == torch.long


def test_is_deterministic_under_a_seed() -> None:
    r = torch.randn(10, 5)
    a = rso_rejection_sample(r, 3, generator=torch.Generator().manual_seed(7))
    b = rso_rejection_sample(r, 3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("rewards", "num", "beta", "match"),
    [
        (torch.zeros(2, 3), 4, 0.5, r"num_samples must be in \[1, 3\]"),
        (torch.zeros(2, 3), 1, 0.0, "beta must be positive"),
        (torch.tensor([0.0, float("nan")]), 1, 0.5, "NaN"),
        (torch.zeros(2, 3, 4), 1, 0.5, r"\(K,\) or \(B, K\)"),
    ],
)
def test_bad_input(rewards: torch.Tensor, num: int, beta: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        rso_rejection_sample(rewards, num, beta=beta)
