"""diffalign.evaluation: the numbers every method's report prints."""

from __future__ import annotations

import pytest
import torch

from diffalign.evaluation import (
    ModelEvaluation,
    compare,
    diversity,
    evaluate,
    ranking_agreement,
    wilson_interval,
)


def test_wilson_interval_matches_the_formula_and_its_edges() -> None:
    # 8 of 10 at 95%: the textbook (0.490, 0.943)
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    # the formula's rounding gave -2.8e-17 at 0 of 10: a proportion's bounds stay in [0, 1]
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    assert all(0.0 <= b <= 1.0 for k in range(31) for b in wilson_interval(k / 2, 15))
    # ... and hold the proportion itself: at 6 of 6 the upper end came out 1 - 1e-16 (below p = 1)
    for n in range(1, 200):
        for k in (0, n):
            low, high = wilson_interval(k, n)
            assert low <= k / n <= high, (k, n)
    for successes, n in [(3, 0), (1, 2.5), (3, float("inf")), (1, True), (-0.5, 4), (5, 4)]:
        with pytest.raises(ValueError, match="0 <= successes <= n"):
            wilson_interval(successes, n)
    import numpy as np

    assert wilson_interval(8, np.int64(10)) == wilson_interval(8, 10)
    assert isinstance(wilson_interval(torch.tensor(8.0), 10)[0], float)
    for z in (-1.96, float("nan"), 0.0):
        with pytest.raises(ValueError, match="z must be a positive number"):
            wilson_interval(8, 10, z)


def test_diversity_is_the_mean_pairwise_distance_within_each_prompt() -> None:
    images = torch.zeros(5, 3, 2, 2)
    images[1] += 0.5  # prompt a: two images 0.5 apart in each of 12 pixels -> distance sqrt(12 * 0.25)
    prompts = ["a", "a", "b", "b", "b"]  # prompt b: three identical images -> 0
    assert diversity(images, prompts) == pytest.approx((12 * 0.25) ** 0.5 / 2)
    with pytest.raises(ValueError, match="two samples of one prompt"):
        diversity(images[:2], ["a", "b"])


def evaluation(scores: list[float], fidelity: float | None = None, seed: int = 0) -> ModelEvaluation:
    prompts = ["a", "a", "b", "b"][: len(scores)]
    t = torch.tensor(scores, dtype=torch.float32)
    return ModelEvaluation(prompts, seed, torch.rand(len(scores), 3, 2, 2), t, float(t.mean()), fidelity, 1.0)


def test_ranking_agreement_counts_within_group_pairs_past_the_margin() -> None:
    truth = torch.tensor([0.0, 1.0, 0.5, 2.0, 2.05, 9.0])
    learned = torch.tensor([0.0, 3.0, 4.0, 1.0, 0.0, 7.0])
    groups = ["a", "a", "a", "b", "b", "c"]
    # group a: (0,1) agree, (0,2) agree, (1,2) disagree; group b: gap 0.05 under the margin;
    # c: alone; pairs across groups never count
    assert ranking_agreement(learned, truth, groups, margin=0.1) == (2 / 3, 3)
    assert ranking_agreement(learned, truth, groups) == (2 / 4, 4)  # b's pair counts and disagrees
    tied = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    assert ranking_agreement(tied, truth, groups, margin=0.1) == (0.5, 3)  # a learned tie: half
    value, n = ranking_agreement(learned, truth, list("abcdef"))
    assert n == 0 and value != value  # NaN: nothing to compare
    with pytest.raises(ValueError, match="6 scores, 5 true scores and 6 groups"):
        ranking_agreement(learned, truth[:5], groups)


def test_compare_counts_ties_half_and_reports_the_drop() -> None:
    base, other = evaluation([1, 2, 3, 4], 0.9), evaluation([2, 2, 1, 5], 0.75)
    out = compare(base, other)
    assert out["win_rate"] == pytest.approx((2 + 0.5) / 4)
    assert out["win_rate_95ci"] == pytest.approx(list(wilson_interval(2.5, 4)))
    assert out["fidelity_drop_points"] == pytest.approx(15.0)
    with pytest.raises(ValueError, match="same prompts"):
        compare(base, evaluation([1, 2]))
    with pytest.raises(ValueError, match=r"same prompts and seed \(seeds 0 and 5\)"):
        compare(base, evaluation([2, 2, 1, 5], 0.75, seed=5))
    with pytest.raises(ValueError, match="a score is NaN"):
        compare(base, evaluation([2, float("nan"), 1, 5]))
    flat = evaluation([1, 2, 3, 4])
    flat.diversity = 0.0  # identical images: no ratio to take
    assert compare(flat, other)["diversity_ratio"] is None


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


def test_each_image_has_its_own_noise_whatever_the_batch(tiny_pipelines) -> None:
    """Image i starts from (seed, i) alone: a prefix of the prompts, or another batch size, gives
    the same images (to the rounding of batched kernels); prompts sampled once each have no
    diversity (and no error after sampling)."""
    from diffalign.diffusion.policy import DiffusionPolicy
    from diffalign.evaluation import sample_images

    policy = DiffusionPolicy.from_pretrained(tiny_pipelines["sd"])
    prompts = ["a red circle", "a blue square", "a red circle", "a green cross", "a blue square"]
    whole = sample_images(policy, prompts, seed=1, steps=2, batch_size=5)
    # the same noise; batched kernels may round differently (about 1e-7), a different noise by 1e-1
    torch.testing.assert_close(
        sample_images(policy, prompts, seed=1, steps=2, batch_size=2), whole, atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        sample_images(policy, prompts[:2], seed=1, steps=2), whole[:2], atol=1e-5, rtol=0
    )
    assert not torch.equal(whole[0], whole[2])  # one prompt, two samples: two noises
    once = evaluate(policy, ["a", "b"], "jpeg_compressibility", seed=0, steps=2)
    assert once.diversity is None and once.seed == 0
    assert compare(once, once)["diversity_ratio"] is None
