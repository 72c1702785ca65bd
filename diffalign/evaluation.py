"""Evaluating aligned models as the papers report them: seeded samples of each model on one prompt
list (the same seeds for every model), their scores under any registry reward, the win-rate of
one model over another with its Wilson interval, prompt fidelity through any classifier or
reward, and diversity.

>>> base_eval = evaluate(base, prompts, reward="pickscore", seed=0)  # doctest: +SKIP
>>> aligned_eval = evaluate(aligned, prompts, reward="pickscore", seed=0)  # doctest: +SKIP
>>> compare(base_eval, aligned_eval)["win_rate"]  # doctest: +SKIP
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

__all__ = ["ModelEvaluation", "compare", "diversity", "evaluate", "sample_images", "wilson_interval"]

Fidelity = Callable[[Tensor, list[str]], float]


def sample_images(
    policy: Any,
    prompts: list[str],
    seed: int,
    steps: int = 20,
    guidance_scale: float = 2.0,
    batch_size: int = 128,
    desc: str = "sampling",
) -> Tensor:
    """DDIM (eta 0) samples (N, 3, H, W) in [0, 1], one per prompt. The initial noise of image
    ``i`` comes from ``(seed, i)`` alone, whatever the batch size or the prompts after it, so two
    models given the same prompts and seed start from the same noise: their samples are comparable
    image by image."""
    from diffalign.diffusion.sampling import sample_with_trajectory

    if not prompts:
        raise ValueError("sample_images needs at least one prompt")
    side = policy.unet.config.sample_size
    out = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch"):
        batch = prompts[start : start + batch_size]
        noise = [
            torch.randn(
                policy.latent_channels,
                side,
                side,
                generator=torch.Generator().manual_seed(seed * 100_003 + i),
            )
            for i in range(start, start + len(batch))
        ]
        trajectory = sample_with_trajectory(
            policy,
            batch,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            eta=0.0,
            latents=torch.stack(noise),
        )
        out.append(trajectory.images)
    return torch.cat(out)


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``successes / n`` (95% for z = 1.96), within [0, 1].

    ``successes`` may be fractional (a tie counting half).

    Raises:
        ValueError: ``n`` is not a positive integer, ``successes`` is outside [0, n], or ``z`` is
            not a positive number.
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1 or not 0 <= successes <= n:
        raise ValueError(
            f"a proportion needs 0 <= successes <= n, n a positive integer; got {successes} of {n}"
        )
    if not (math.isfinite(z) and z > 0):
        raise ValueError(f"z must be a positive number of standard deviations, got {z}")
    p, n = float(successes) / int(n), int(n)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def diversity(images: Tensor, prompts: list[str]) -> float:
    """Mean pairwise L2 distance (in [0, 1] pixel units, whole image) between the samples of one
    prompt, averaged over prompts; prompts with a single sample are skipped.

    Raises:
        ValueError: no prompt has two samples.
    """
    values = []
    for prompt in dict.fromkeys(prompts):
        group = images[[i for i, q in enumerate(prompts) if q == prompt]].flatten(1).float()
        if len(group) > 1:
            values.append(float(torch.cdist(group, group).sum() / (len(group) * (len(group) - 1))))
    if not values:
        raise ValueError("diversity needs at least two samples of one prompt")
    return sum(values) / len(values)


@dataclass
class ModelEvaluation:
    """One model's samples on a prompt list and what was measured on them."""

    prompts: list[str]
    seed: int  # of the initial noise (see `sample_images`)
    images: Tensor  # (N, 3, H, W) in [0, 1]
    scores: Tensor  # (N,) under ``reward``
    reward: float  # mean score
    fidelity: float | None
    diversity: float | None  # None: no prompt was sampled twice

    def summary(self) -> dict[str, float | None]:
        return {"reward": self.reward, "fidelity": self.fidelity, "diversity": self.diversity}


def evaluate(
    policy: Any,
    prompts: list[str],
    reward: Any,
    seed: int,
    fidelity: Fidelity | None = None,
    steps: int = 20,
    guidance_scale: float = 2.0,
    desc: str = "sampling",
) -> ModelEvaluation:
    """Sample ``policy`` on ``prompts`` (repeat a prompt for several samples: diversity needs two)
    and measure.

    ``reward``: a :class:`~diffalign.rewards.RewardModel` or a registry name (loaded once);
    ``fidelity``: ``(images, prompts) -> float``, e.g. a classifier's accuracy on the prompt's
    content, or None.
    """
    from diffalign.rewards import load_reward

    scorer = load_reward(reward) if isinstance(reward, str) else reward
    images = sample_images(policy, prompts, seed, steps, guidance_scale, desc=desc)
    scores = scorer(images, prompts if scorer.needs_prompts else None).float().cpu()
    several = len(set(prompts)) < len(prompts)
    return ModelEvaluation(
        prompts=prompts,
        seed=seed,
        images=images,
        scores=scores,
        reward=float(scores.mean()),
        fidelity=None if fidelity is None else fidelity(images, prompts),
        diversity=diversity(images, prompts) if several else None,
    )


def compare(base: ModelEvaluation, other: ModelEvaluation) -> dict[str, Any]:
    """``other`` against ``base`` on the same prompts and seeds: win-rate (a tie counts half) with
    its 95% Wilson interval, fidelity drop in percentage points, diversity ratio.

    Raises:
        ValueError: the two evaluations are not on the same prompts and seed, hold no prompt, or
            have a score that is not finite.
    """
    if base.prompts != other.prompts or base.seed != other.seed:
        raise ValueError(
            f"compare needs two evaluations of the same prompts and seed (seeds {base.seed} and {other.seed})"
        )
    if not base.prompts:
        raise ValueError("compare needs evaluations of at least one prompt")
    if not bool(base.scores.isfinite().all() and other.scores.isfinite().all()):
        raise ValueError("compare: a score is NaN or infinite (a win cannot be decided)")
    wins = float((other.scores > base.scores).sum() + 0.5 * (other.scores == base.scores).sum())
    n = len(base.prompts)
    drop = None
    if base.fidelity is not None and other.fidelity is not None:
        drop = 100 * (base.fidelity - other.fidelity)
    return {
        "win_rate": wins / n,
        "win_rate_95ci": list(wilson_interval(wins, n)),
        "fidelity_drop_points": drop,
        # None where undefined: a prompt sampled once, or a base without any diversity
        "diversity_ratio": other.diversity / base.diversity
        if base.diversity and other.diversity is not None
        else None,
    }
