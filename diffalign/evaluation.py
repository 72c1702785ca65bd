"""Evaluating aligned models as the papers report them: seeded samples of each model on one prompt
list (the same seeds for every model), their scores under any registry reward, the win-rate of
one model over another with its Wilson interval, prompt fidelity through any classifier or
reward, and diversity. Inpainting models are evaluated the same way on given images and masks
(``images=``, ``masks=``): the same seeded noise per example for every model. ``evaluate`` is
``sample_images`` then ``measure``; call the two apart to measure one set of samples several ways
(e.g. inpaintings as drawn and with the input pasted back).

>>> base_eval = evaluate(base, prompts, reward="pickscore", seed=0)  # doctest: +SKIP
>>> aligned_eval = evaluate(aligned, prompts, reward="pickscore", seed=0)  # doctest: +SKIP
>>> compare(base_eval, aligned_eval)["win_rate"]  # doctest: +SKIP
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

__all__ = [
    "ModelEvaluation",
    "compare",
    "diversity",
    "evaluate",
    "image_seed",
    "input_groups",
    "measure",
    "ranking_agreement",
    "sample_images",
    "wilson_interval",
    "win_rate",
]

Fidelity = Callable[[Tensor, list[str]], float]


def image_seed(seed: int, index: int) -> int:
    """The seed of the noise of image ``index`` of an evaluation run seeded ``seed``."""
    return seed * 100_003 + index


def sample_images(
    policy: Any,
    prompts: list[str],
    seed: int,
    steps: int = 20,
    guidance_scale: float = 2.0,
    batch_size: int = 128,
    desc: str = "sampling",
    images: Tensor | None = None,
    masks: Tensor | None = None,
    first: int = 0,
    keep_unmasked: bool = False,
) -> Tensor:
    """DDIM (eta 0) samples (N, 3, H, W) in [0, 1], one per prompt; with ``images`` (N, 3, H, W) in
    [0, 1] and ``masks`` (N, 1, H, W) (1 = repaint), an inpainting policy's inpaintings of them.

    The randomness of image ``i`` (its initial noise, then, for a latent inpainting model, the VAE
    posterior sample of its masked image) comes from a generator seeded by ``(seed, first + i)``
    alone, whatever the batch size or the prompts after it, so two models given the same inputs and
    seed start from the same noise: their samples are comparable image by image. ``first``: the
    place of ``prompts[0]`` in a longer list sampled in parts (a resumed labelling run draws what
    one uninterrupted run would). ``keep_unmasked``: inpaintings with the input pasted back outside
    the mask (:func:`~diffalign.images.paste_unmasked`), as ``InpaintingAligner.inpaint`` returns
    them by default; else the model's raw output.

    Raises:
        ValueError: no prompt; only one of ``images`` and ``masks``, or not one per prompt;
            ``keep_unmasked`` without them; inputs the policy cannot take
            (``sample_with_trajectory``'s errors).
    """
    from diffalign.diffusion.sampling import sample_with_trajectory
    from diffalign.images import paste_unmasked

    if not prompts:
        raise ValueError("sample_images needs at least one prompt")
    if keep_unmasked and images is None:
        raise ValueError("keep_unmasked pastes inpainting inputs back: it needs `images` and `masks`")
    if (images is None) != (masks is None):
        raise ValueError("inpainting needs both `images` and `masks`")
    if images is not None and not len(images) == len(masks) == len(prompts):
        raise ValueError(
            f"one image and mask per prompt: {len(prompts)} prompts, {len(images)} images, {len(masks)} masks"
        )
    side = policy.unet.config.sample_size
    out = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch"):
        rows = slice(start, min(start + batch_size, len(prompts)))
        generators = [
            torch.Generator().manual_seed(image_seed(seed, first + i)) for i in range(rows.start, rows.stop)
        ]
        noise = [torch.randn(policy.latent_channels, side, side, generator=g) for g in generators]
        trajectory = sample_with_trajectory(
            policy,
            prompts[rows],
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            eta=0.0,
            latents=torch.stack(noise),
            image=None if images is None else images[rows],
            mask=None if masks is None else masks[rows],
            # one generator per row, a list as diffusers' pipelines take it: a latent inpainting
            # model draws row i's VAE posterior sample from generator i (after its noise)
            generator=generators,
        )
        out.append(
            paste_unmasked(trajectory.images, images[rows], masks[rows])
            if keep_unmasked
            else trajectory.images
        )
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
    # the interval holds p exactly: at p = 0 or 1 its end can miss p by a rounding error
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


def win_rate(scores: Tensor, reference: Tensor) -> dict[str, Any]:
    """How often ``scores`` (N,) beat ``reference`` (N,) image by image (a tie counts half), with its
    95% Wilson interval: ``{"win_rate": float in [0, 1], "win_rate_95ci": [low, high]}``.

    Raises:
        ValueError: not two (N,) vectors with N >= 1, or a score that is not finite.
    """
    if scores.shape != reference.shape or scores.dim() != 1 or len(scores) == 0:
        raise ValueError(
            f"win_rate needs two (N,) score vectors, N >= 1; got {tuple(scores.shape)} and "
            f"{tuple(reference.shape)}"
        )
    if not bool(scores.isfinite().all() and reference.isfinite().all()):
        raise ValueError("win_rate: a score is NaN or infinite (a win cannot be decided)")
    wins = float((scores > reference).sum() + 0.5 * (scores == reference).sum())
    return {"win_rate": wins / len(scores), "win_rate_95ci": list(wilson_interval(wins, len(scores)))}


def diversity(images: Tensor, groups: Sequence[Hashable]) -> float:
    """Mean pairwise L2 distance (in [0, 1] pixel units, whole image) between the samples of one
    group, averaged over groups; groups with a single sample are skipped. A group is what the
    samples were conditioned on: the prompt for text-to-image, the prompt and the masked input
    for inpainting (:func:`input_groups`).

    Raises:
        ValueError: no group has two samples.
    """
    values = []
    for key in dict.fromkeys(groups):
        group = images[[i for i, q in enumerate(groups) if q == key]].flatten(1).float()
        if len(group) > 1:
            values.append(float(torch.cdist(group, group).sum() / (len(group) * (len(group) - 1))))
    if not values:
        raise ValueError("diversity needs at least two samples of one prompt (or masked input)")
    return sum(values) / len(values)


def input_groups(prompts: list[str], images: Tensor, masks: Tensor) -> list[tuple[str, int]]:
    """Inpainting inputs as diversity groups: ``(prompt, k)`` with ``k`` the same for examples whose
    masked input (:func:`~diffalign.images.masked_for_inpainting`, what the model sees) and
    binarised mask are equal, e.g. one example repeated with different seeds. ``images``
    (N, 3, H, W) in [0, 1], ``masks`` (N, 1, H, W)."""
    from diffalign.images import masked_for_inpainting

    hole = (masks >= 0.5).to(images.dtype)
    seen = torch.cat([masked_for_inpainting(images, hole).flatten(1), hole.flatten(1)], 1)
    index = torch.unique(seen, dim=0, return_inverse=True)[1]
    return list(zip(prompts, index.tolist(), strict=True))


def ranking_agreement(
    scores: Tensor, truth: Tensor, groups: Sequence[Hashable], margin: float = 0.0
) -> tuple[float, int]:
    """How often a learned reward orders two samples of one group (prompt, or masked input) as the
    true preference does: the fraction of within-group pairs whose true gap is at least
    ``margin`` on which ``scores`` (N,) and ``truth`` (N,) agree in sign (a tie in ``scores``
    counts half), and the number of such pairs. NaN with no such pair.

    Raises:
        ValueError: ``scores``, ``truth`` and ``groups`` differ in length.
    """
    if not len(scores) == len(truth) == len(groups):
        raise ValueError(f"{len(scores)} scores, {len(truth)} true scores and {len(groups)} groups")
    ids = {g: i for i, g in enumerate(dict.fromkeys(groups))}
    index = torch.tensor([ids[g] for g in groups])
    same = (index[:, None] == index[None]).triu(diagonal=1)
    true_gap = truth[:, None] - truth[None]
    pairs = same & (true_gap.abs() >= margin) & (true_gap != 0)
    agree = (torch.sign(scores[:, None] - scores[None]) * torch.sign(true_gap))[pairs]
    n = int(pairs.sum())
    return ((float(agree.sum()) + n) / (2 * n) if n else math.nan), n


@dataclass
class ModelEvaluation:
    """One model's samples on a prompt list and what was measured on them."""

    prompts: list[str]
    seed: int  # of the initial noise (see `sample_images`)
    images: Tensor  # (N, 3, H, W) in [0, 1]: the samples (inpaintings of inpainting inputs)
    scores: Tensor  # (N,) under ``reward``
    reward: float  # mean score
    fidelity: float | None
    diversity: float | None  # None: no prompt (inpainting: masked input) was sampled twice

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
    images: Tensor | None = None,
    masks: Tensor | None = None,
    keep_unmasked: bool = False,
) -> ModelEvaluation:
    """Sample ``policy`` on ``prompts`` (:func:`sample_images`, whose errors it raises) and
    :func:`measure` the samples; with ``images`` and ``masks``, an inpainting policy inpaints them,
    with the inputs pasted back outside the masks if ``keep_unmasked``."""
    samples = sample_images(
        policy,
        prompts,
        seed,
        steps,
        guidance_scale,
        desc=desc,
        images=images,
        masks=masks,
        keep_unmasked=keep_unmasked,
    )
    return measure(samples, prompts, reward, seed, fidelity, images, masks)


def measure(
    samples: Tensor,
    prompts: list[str],
    reward: Any,
    seed: int,
    fidelity: Fidelity | None = None,
    images: Tensor | None = None,
    masks: Tensor | None = None,
) -> ModelEvaluation:
    """Reward, fidelity and diversity of ``samples`` (N, 3, H, W) in [0, 1], one per prompt, drawn
    with noise ``seed`` (repeat a prompt for several samples: diversity needs two); with the
    inpainting inputs ``images`` (N, 3, H, W) and ``masks`` (N, 1, H, W) they were drawn from,
    diversity is measured among the samples of one masked input.

    ``reward``: a :class:`~diffalign.rewards.RewardModel` or a registry name (loaded once); an
    inpainting reward (``needs_masks``) also gets the masks and the masked inputs
    (:func:`~diffalign.images.masked_for_reward` of ``images``); ``fidelity``:
    ``(samples, prompts) -> float``, e.g. a classifier's accuracy on the prompt's content, or None.

    Raises:
        ValueError: not one sample per prompt, or only one of ``images`` and ``masks``.
    """
    from diffalign.images import masked_for_reward
    from diffalign.rewards import load_reward

    if len(samples) != len(prompts):
        raise ValueError(
            f"measure needs one sample per prompt: {len(samples)} samples, {len(prompts)} prompts"
        )
    if (images is None) != (masks is None):
        raise ValueError("inpainting samples are measured with both their `images` and `masks`")
    scorer = load_reward(reward) if isinstance(reward, str) else reward
    context = {}
    if images is not None and scorer.needs_masks:
        context = {"masks": masks, "masked_images": masked_for_reward(images, masks)}
    scores = scorer(samples, prompts if scorer.needs_prompts else None, **context).float().cpu()
    groups = prompts if images is None else input_groups(prompts, images, masks)
    several = len(set(groups)) < len(groups)
    return ModelEvaluation(
        prompts=prompts,
        seed=seed,
        images=samples,
        scores=scores,
        reward=float(scores.mean()),
        fidelity=None if fidelity is None else fidelity(samples, prompts),
        diversity=diversity(samples, groups) if several else None,
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
    wins = win_rate(other.scores, base.scores)
    drop = None
    if base.fidelity is not None and other.fidelity is not None:
        drop = 100 * (base.fidelity - other.fidelity)
    return {
        **wins,
        "fidelity_drop_points": drop,
        # None where undefined: a prompt sampled once, or a base without any diversity
        "diversity_ratio": other.diversity / base.diversity
        if base.diversity and other.diversity is not None
        else None,
    }
