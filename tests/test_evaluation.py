"""diffalign.evaluation: the numbers every method's report prints."""

from __future__ import annotations

import pytest
import torch

from diffalign.evaluation import ModelEvaluation, compare, diversity, evaluate, wilson_interval


def test_wilson_interval_matches_the_formula_and_its_edges() -> None:
    # 8 of 10 at 95%: the textbook (0.490, 0.943)
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 5)[0] == pytest.approx(0.0, abs=1e-12)
    assert wilson_interval(5, 5)[1] == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="0 <= successes <= n"):
        wilson_interval(3, 0)


def test_diversity_is_the_mean_pairwise_distance_within_each_prompt() -> None:
    images = torch.zeros(5, 3, 2, 2)
    images[1] += 0.5  # prompt a: two images 0.5 apart in each of 12 pixels -> distance sqrt(12 * 0.25)
    prompts = ["a", "a", "b", "b", "b"]  # prompt b: three identical images -> 0
    assert diversity(images, prompts) == pytest.approx((12 * 0.25) ** 0.5 / 2)
    with pytest.raises(ValueError, match="two samples of one prompt"):
        diversity(images[:2], ["a", "b"])


def evaluation(scores: list[float], fidelity: float | None = None) -> ModelEvaluation:
    prompts = ["a", "a", "b", "b"][: len(scores)]
    t = torch.tensor(scores, dtype=torch.float32)
    return ModelEvaluation(prompts, torch.rand(len(scores), 3, 2, 2), t, float(t.mean()), fidelity, 1.0)


def test_compare_counts_ties_half_and_reports_the_drop() -> None:
    base, other = evaluation([1, 2, 3, 4], 0.9), evaluation([2, 2, 1, 5], 0.75)
    out = compare(base, other)
    assert out["win_rate"] == pytest.approx((2 + 0.5) / 4)
    assert out["win_rate_95ci"] == pytest.approx(list(wilson_interval(2.5, 4)))
    assert out["fidelity_drop_points"] == pytest.approx(15.0)
    with pytest.raises(ValueError, match="same prompts"):
        compare(base, evaluation([1, 2]))


def test_the_same_model_and_seed_ties_everywhere(tiny_pipelines) -> None:
    """Same prompts and seed: the same noise, so a model evaluated twice ties every image."""
    from diffalign.diffusion.policy import DiffusionPolicy

    policy = DiffusionPolicy.from_pretrained(tiny_pipelines["sd"])
    prompts = ["a red circle", "a red circle", "a blue square", "a blue square"]
    first = evaluate(policy, prompts, "jpeg_incompressibility", seed=3, steps=2)
    again = evaluate(policy, prompts, "jpeg_incompressibility", seed=3, steps=2)
    assert torch.equal(first.images, again.images) and compare(first, again)["win_rate"] == 0.5
    other_seed = evaluate(policy, prompts, "jpeg_incompressibility", seed=4, steps=2)
    assert not torch.equal(first.images, other_seed.images)
