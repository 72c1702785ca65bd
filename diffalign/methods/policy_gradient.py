"""The online RL core that PrefPaint and DDPO share: rollouts, rewards, advantages, and a clipped
policy gradient over the per-step log-probs of the sampler's transitions.

For each loader batch (prompts, or masked images with their prompts), on every process:

1. rollout: each input is repeated ``samples_per_prompt`` times and sampled with DDIM (``eta`` > 0,
   ``rollout_steps``, guidance ``rollout_guidance``) by the old policy (the live one when
   ``sync_every`` is 1, as DDPO; else a copy synced after every ``sync_every``-th optimiser step, as
   PrefPaint's every 15), recording latents and per-step log-probs (:func:`sample_with_trajectory`);
2. rewards from any registry reward (``reward``, ``reward_kwargs``); a recipe may add per-sample
   weights (PrefPaint's trust weights); a non-finite reward is an error, or with
   ``on_nan_reward: skip`` its sample gets advantage 0 and is counted in ``dropped_samples``;
3. advantages (:mod:`diffalign.objectives.advantages`): standardised over the batch gathered from
   every process (``batch``), per prompt by DDPO's stat tracker (``per_prompt``, checkpointed), or
   within the ``samples_per_prompt`` samples of one input (``group``, GRPO-style);
4. ``inner_epochs`` passes; each shuffles the samples into chunks of ``train_batch_size`` and
   draws for each sample ``train_timesteps`` of its stochastic steps inside ``train_window`` (DDPO's
   per-sample permutation); **each (chunk, timestep) is one micro-batch**, one backward, as DDPO's
   ``scripts/train.py`` (so ``gradient_accumulation_steps`` counts chunks x timesteps);
5. loss: the objective (``ppo_clip``: ratio exp(logp_theta - logp_old) on the recorded step,
   advantages clipped, per-sample weights inside the loss) plus ``kl_weight`` x KL and ``l1_weight``
   x L1 between the policy's transition means and the old policy's at that step (a trust region
   that enters the loss; PrefPaint's config has an L1 weight its script computes but never adds),
   and ``reference_kl_weight`` x KL to the reference (base) model's means at that step (DPOK's
   regulariser, Fan et al. 2023: it holds the policy near the model it started from, which a
   learned reward's errors otherwise pull it away from; the reference is a frozen copy, or the
   adapters turned off under LoRA).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from diffalign.config import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, ConfigError, Range, check_ranges
from diffalign.diffusion.online import LaggedPolicy
from diffalign.diffusion.policy import DiffusionPolicy
from diffalign.diffusion.sampling import (
    Trajectory,
    check_sampling,
    make_scheduler,
    sample_with_trajectory,
    trajectory_transitions,
    transition_stats,
)
from diffalign.methods.unet_method import UNetMethod
from diffalign.objectives.advantages import PerPromptStatTracker, batch_advantages, group_advantages
from diffalign.rng import Generators
from diffalign.training.config import TrainConfig
from diffalign.training.loop import Stateful, row_generators

__all__ = [
    "PolicyGradientMethod",
    "PolicyGradientOptions",
    "Rollout",
    "micro_batches_per_rollout",
    "stochastic_steps",
    "transition_kl",
]


@dataclass
class PolicyGradientOptions:
    reward: str = field(default="jpeg_compressibility", metadata={"help": "registry reward to maximise"})
    reward_kwargs: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "arguments of the reward (weights=PATH, ...)"}
    )
    samples_per_prompt: int = field(default=1, metadata={"help": "rollouts of each loader row"})
    advantages: Literal["batch", "per_prompt", "group"] = field(
        default="per_prompt", metadata={"help": "standardise rewards over the batch, per prompt or per group"}
    )
    stat_buffer_size: int = field(default=16, metadata={"help": "per_prompt: rewards kept per prompt"})
    stat_min_count: int = field(
        default=16, metadata={"help": "per_prompt: rewards before a prompt's own stats"}
    )
    train_batch_size: int | None = field(
        default=None, metadata={"help": "samples per micro-batch (none: the whole rollout)"}
    )
    train_timesteps: int | None = field(
        default=None, metadata={"help": "sampler steps trained per trajectory (none: all stochastic ones)"}
    )
    train_window: tuple[float, float] = field(
        default=(0.0, 1.0),
        metadata={"help": "[start, end) fraction of the rollout (0: first, noisiest step) whose steps train"},
    )
    inner_epochs: int = field(default=1, metadata={"help": "passes over each rollout"})
    sync_every: int = field(default=1, metadata={"help": "optimiser steps between old-policy syncs"})
    rollout_steps: int = field(default=50, metadata={"help": "DDIM steps of a rollout"})
    rollout_guidance: float = field(default=5.0, metadata={"help": "guidance scale of rollouts"})
    eta: float = field(default=1.0, metadata={"help": "DDIM eta of rollouts (> 0: Gaussian steps)"})
    kl_weight: float = field(default=0.0, metadata={"help": "weight of the KL to the old transition means"})
    l1_weight: float = field(default=0.0, metadata={"help": "weight of the L1 to the old transition means"})
    reference_kl_weight: float = field(
        default=0.0, metadata={"help": "weight of the KL to the reference (base) model's transition means"}
    )
    on_nan_reward: Literal["error", "skip"] = field(
        default="error", metadata={"help": "a non-finite reward stops training, or its sample is skipped"}
    )
    validation_guidance: float = field(default=5.0, metadata={"help": "guidance scale of validation grids"})

    ranges: ClassVar[dict[str, Range]] = {
        **dict.fromkeys(
            ("samples_per_prompt", "stat_buffer_size", "stat_min_count", "inner_epochs", "sync_every",
             "rollout_steps", "train_batch_size", "train_timesteps"),
            AT_LEAST_ONE,
        ),
        "train_window": Range(0.0, 1.0),
        "eta": POSITIVE,  # a deterministic step has no log-prob to train
        "kl_weight": NON_NEGATIVE,
        "l1_weight": NON_NEGATIVE,
        "reference_kl_weight": NON_NEGATIVE,
        "rollout_guidance": AT_LEAST_ONE,  # 1: no guidance
        "validation_guidance": AT_LEAST_ONE,
    }  # fmt: skip

    def __post_init__(self) -> None:
        check_ranges(self)
        if len(self.train_window) != 2 or not self.train_window[0] < self.train_window[1]:
            raise ValueError(
                f"train_window needs [start, end) with start < end, got {list(self.train_window)}"
            )
        if self.stat_min_count > self.stat_buffer_size:
            raise ValueError(
                f"stat_min_count {self.stat_min_count} exceeds stat_buffer_size {self.stat_buffer_size}"
            )
        if self.advantages == "group" and self.samples_per_prompt < 2:
            raise ValueError(
                "advantages=group standardises within a prompt's samples: set samples_per_prompt >= 2"
            )


def stochastic_steps(
    policy: DiffusionPolicy, rollout_steps: int, eta: float, window: tuple[float, float] = (0.0, 1.0)
) -> Tensor:
    """Indices (S,) of a ``rollout_steps``-step DDIM (``eta``) schedule's Gaussian steps (std > 1e-6):
    the steps with a log-prob to train (DDIM's last is deterministic with ``set_alpha_to_one``);
    ``window``: only those at ``start <= j / rollout_steps < end`` (0: the first, noisiest step)."""
    scheduler = make_scheduler(policy, "ddim")
    scheduler.set_timesteps(rollout_steps)
    zeros = torch.zeros(len(scheduler.timesteps), 1, 1, 1)
    _, std = transition_stats(scheduler, zeros, scheduler.timesteps, zeros, eta=eta)
    position = torch.arange(len(scheduler.timesteps)) / len(scheduler.timesteps)
    inside = (position >= window[0]) & (position < window[1])
    return ((std.flatten() > 1e-6) & inside).nonzero().flatten()


def micro_batches_per_rollout(options: PolicyGradientOptions, batch_size: int, stochastic: int) -> int:
    """Micro-batches one rollout of ``batch_size`` loader rows makes: inner epochs x chunks of
    ``train_batch_size`` x trained timesteps (``stochastic``: the rollout's Gaussian steps, the
    default); as ``gradient_accumulation_steps`` it makes one optimiser step per rollout."""
    rows = batch_size * options.samples_per_prompt
    chunks = math.ceil(rows / min(options.train_batch_size or rows, rows))
    return options.inner_epochs * chunks * (options.train_timesteps or stochastic)


@dataclass
class Rollout:
    """One rollout: the trajectories (N = loader rows x samples_per_prompt) and what training needs."""

    trajectory: Trajectory
    advantages: Tensor  # (N,), 0 for a skipped sample
    weights: Tensor | None  # (N,) per-sample loss weights (PrefPaint's trust weights), or None
    metrics: dict[str, float]


class PolicyGradientMethod(UNetMethod):
    """A recipe of the RL core. Subclasses say what a loader batch is (:meth:`rollout_inputs`), may
    score and weight samples otherwise (:meth:`score_rollout`); ``inpainting``: which UNet they train."""

    inpainting: ClassVar[bool] = False
    options: PolicyGradientOptions

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        if self.objective.kind != "policy_gradient":
            raise ValueError(
                f"{cfg.method} trains on rollouts' advantages: objective '{self.objective.name}' is "
                f"{self.objective.kind}, pick a policy-gradient one (ppo_clip)"
            )
        self.read_data()  # data and reward before the policy loads: their errors come first
        self.reward = self.load_reward()
        self.skipped_rewards = 0
        o = self.options
        self.policy = self.load_policy(reference=o.reference_kl_weight > 0, inpainting=self.inpainting)
        self.stochastic_steps = self._stochastic_steps()
        self._check_schedule()
        self.lagged = LaggedPolicy(self.policy, o.sync_every) if o.sync_every > 1 else None
        if self.lagged is not None:
            self.frozen.append(self.lagged.policy)
        self.tracker = PerPromptStatTracker(o.stat_buffer_size, o.stat_min_count)

    # -- what a recipe provides ------------------------------------------------------------------

    def read_data(self) -> None:
        """Read and check the training data (before any model loads)."""
        raise NotImplementedError

    def rollout_inputs(self, batch: Any) -> tuple[list[str], Tensor | None, Tensor | None]:
        """A loader batch as the rollout's prompts, and its images (B, 3, H, W) and masks (B, 1, H, W)
        for inpainting (None otherwise)."""
        raise NotImplementedError

    def score_rollout(
        self, images: Tensor, prompts: list[str], originals: Tensor | None, masks: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """Rewards (N,) of the rollout's images (N, 3, H, W) in [0, 1], and per-sample loss weights
        (N,) or None. ``originals`` and ``masks``: the inpainting inputs (None for text-to-image).
        Default: the registry reward's scores (with the masks and masked inputs an inpainting
        reward needs), no weights."""
        return self.reward(images, prompts, **self.reward_context(originals, masks)).float(), None

    def reward_context(self, originals: Tensor | None, masks: Tensor | None) -> dict[str, Tensor]:
        """What an inpainting reward takes besides the images: the masks, and the masked inputs
        filled as the reward declares (``masked_fill``) from the original images, not the samples."""
        if masks is None or not getattr(self.reward, "needs_masks", False):
            return {}
        fill = getattr(self.reward, "masked_fill", None)
        if fill is None:
            return {"masks": masks}
        return {"masks": masks, "masked_images": torch.where(masks >= 0.5, fill, originals)}

    # -- set-up ----------------------------------------------------------------------------------

    def load_reward(self) -> torch.nn.Module:
        """The registry reward ``method_options.reward`` built with ``reward_kwargs``.

        Raises:
            ValueError: naming ``method_options.reward`` when it cannot be built (unknown name,
                missing weights, bad arguments).
        """
        from diffalign.rewards import load_reward

        o = self.options
        try:
            return load_reward(o.reward, **o.reward_kwargs).eval()
        except (KeyError, TypeError, ValueError, FileNotFoundError, OSError) as err:
            raise ValueError(
                f"method_options.reward: cannot build reward '{o.reward}' with reward_kwargs "
                f"{o.reward_kwargs}: {err}"
            ) from err

    def _stochastic_steps(self) -> Tensor:
        o = self.options
        try:
            check_sampling(self.policy, "ddim", o.rollout_steps)
        except ValueError as err:
            raise ValueError(f"method_options.rollout_steps: the rollouts cannot be drawn: {err}") from err
        steps = stochastic_steps(self.policy, o.rollout_steps, o.eta, o.train_window)
        if not len(steps):
            raise ConfigError(
                f"method_options.train_window: {list(o.train_window)} holds no stochastic step of a "
                f"{o.rollout_steps}-step DDIM rollout with eta {o.eta}"
            )
        return steps

    def _check_schedule(self) -> None:
        """Training timesteps within the stochastic steps, micro-batches that fill whole optimiser steps."""
        o, cfg = self.options, self.cfg
        available = len(self.stochastic_steps)
        if o.train_timesteps is not None and o.train_timesteps > available:
            raise ConfigError(
                f"method_options.train_timesteps: {o.train_timesteps} exceeds the {available} stochastic "
                f"steps of a {o.rollout_steps}-step DDIM rollout inside train_window {list(o.train_window)}"
            )
        per_rollout = micro_batches_per_rollout(o, cfg.batch_size, available)
        one_step = o.sync_every == 1 and per_rollout == cfg.gradient_accumulation_steps
        if (o.kl_weight or o.l1_weight) and one_step:
            raise ConfigError(
                "method_options.kl_weight / l1_weight: with sync_every 1 and one optimiser step per rollout "
                "the policy equals the old one at every micro-batch, so the term and its gradient are 0; "
                "set sync_every > 1, fewer gradient_accumulation_steps, or use reference_kl_weight"
            )
        if per_rollout % cfg.gradient_accumulation_steps:
            raise ConfigError(
                f"gradient_accumulation_steps: {cfg.gradient_accumulation_steps} does not divide the "
                f"{per_rollout} micro-batches of a rollout (inner_epochs x chunks of "
                "method_options.train_batch_size x train_timesteps): an optimiser step would mix two rollouts"
            )

    def setup(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        super().setup(device, weight_dtype)
        self.reward.to(device)

    def state(self) -> dict[str, Stateful]:
        return {"stat_tracker": self.tracker, **({"old_policy": self.lagged} if self.lagged else {})}

    def on_optimizer_step(self, step: int) -> None:
        if self.lagged is not None:
            self.lagged.on_optimizer_step(step)

    def dropped_samples(self) -> int:
        return self.skipped_rewards

    # -- training --------------------------------------------------------------------------------

    def micro_batches(self, batch: Any, step: int) -> Any:
        """Steps 1-3 on the loader batch, then step 4's micro-batches."""
        o = self.options
        streams = row_generators(batch, len(self.rollout_inputs(batch)[0]), o.samples_per_prompt)
        rollout = self.rollout(batch, streams)
        n = len(rollout.advantages)
        chunk = o.train_batch_size or n
        steps_per_sample = o.train_timesteps or len(self.stochastic_steps)
        available = len(self.stochastic_steps)
        for _ in range(o.inner_epochs):
            order = torch.randperm(n)
            picks = torch.stack(
                [torch.randperm(available, generator=g) for g in streams or [None] * n]
            )  # each sample's trained steps from its own stream
            steps = self.stochastic_steps[picks[:, :steps_per_sample]]  # (N, S) step indices
            for rows in order.split(chunk):
                for k in range(steps_per_sample):
                    yield {"rollout": rollout, "rows": rows, "steps": steps[rows, k : k + 1]}

    @torch.no_grad()
    def rollout(self, batch: Any, streams: Generators = None) -> Rollout:
        """Steps 1-3: sample, score and standardise; ``streams``: the generators of the samples
        (loader rows x ``samples_per_prompt``, row-major), or None (torch's global one)."""
        o = self.options
        prompts, images, masks = self.rollout_inputs(batch)
        k = o.samples_per_prompt
        prompts = [p for p in prompts for _ in range(k)]
        if images is not None:
            images, masks = images.repeat_interleave(k, 0), masks.repeat_interleave(k, 0)
        size = self.cfg.data.resolution if images is None else images.shape[-1]
        sampler = self.policy if self.lagged is None else self.lagged.policy
        trajectory = sample_with_trajectory(
            sampler, prompts, num_inference_steps=o.rollout_steps, guidance_scale=o.rollout_guidance,
            sampler="ddim", eta=o.eta, height=size, width=size, image=images, mask=masks, generator=streams,
        )  # fmt: skip
        rewards, weights = self.score_rollout(trajectory.images, prompts, images, masks)
        advantages = self._advantages(rewards.to(self.policy.device), prompts)
        trajectory.images = torch.empty(0)  # not needed any more: keep the rollout small
        return Rollout(trajectory, advantages, weights, self._rollout_metrics(rewards, weights))

    def _advantages(self, rewards: Tensor, prompts: list[str]) -> Tensor:
        """Step 3, with non-finite rewards refused or skipped (advantage 0)."""
        from accelerate import PartialState
        from accelerate.utils import gather, gather_object

        o = self.options
        bad = ~rewards.isfinite()
        if bool(bad.any()):
            if o.on_nan_reward == "error":
                examples = [prompts[i] for i in bad.nonzero().flatten().tolist()[:3]]
                raise FloatingPointError(
                    f"reward '{o.reward}' returned {int(bad.sum())} non-finite scores of {len(rewards)} "
                    f"(prompts {examples}); set method_options.on_nan_reward=skip to train without them"
                )
            self.skipped_rewards += int(bad.sum())
        if o.advantages == "group":
            groups = torch.arange(len(rewards), device=rewards.device) // o.samples_per_prompt
            advantages = group_advantages(rewards, groups)
        else:  # standardised over every process's samples; this process keeps its own rows
            everyone = gather(rewards)
            if o.advantages == "batch":
                advantages = batch_advantages(everyone)
            else:
                advantages = self.tracker.update(gather_object(prompts), everyone)
            offset = PartialState().process_index * len(rewards)  # gather concatenates ranks in order
            advantages = advantages[offset : offset + len(rewards)]
        return torch.nan_to_num(advantages, nan=0.0)

    @staticmethod
    def _rollout_metrics(rewards: Tensor, weights: Tensor | None) -> dict[str, float]:
        finite = rewards[rewards.isfinite()]
        metrics = {
            "reward/mean": float(finite.mean()) if len(finite) else math.nan,
            "reward/std": float(finite.std(correction=0)) if len(finite) else math.nan,
            "reward/non_finite": float((~rewards.isfinite()).sum()),
        }
        if weights is not None:
            metrics["weights/mean"] = float(weights.mean())
        return metrics

    def step(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        """Step 5 on one (chunk, timestep) micro-batch."""
        rollout, rows = batch["rollout"], batch["rows"]
        trajectory = rollout.trajectory.select(rows)
        steps = batch["steps"].to(trajectory.latents.device)
        o = self.options
        moved = trajectory_transitions(self.policy, trajectory, steps, reference=o.reference_kl_weight > 0)
        device = moved.logps.device
        old = trajectory.log_probs.gather(1, steps).to(device)
        weights = None if rollout.weights is None else rollout.weights[rows.to(rollout.weights.device)]
        result = self.objective(
            policy_logps=moved.logps[:, 0],
            old_policy_logps=old[:, 0],
            advantages=rollout.advantages[rows.to(rollout.advantages.device)].to(device),
            trust_weights=None if weights is None else weights.to(device),
        )
        loss, metrics = result.loss, {**rollout.metrics, **result.metrics}
        if o.kl_weight:
            kl = transition_kl(moved.means, moved.recorded_means, moved.stds)
            loss = loss + o.kl_weight * kl
            metrics["policy/kl_to_old"] = float(kl.detach())
        if o.l1_weight:
            l1 = (moved.means - moved.recorded_means).abs().mean()
            loss = loss + o.l1_weight * l1
            metrics["policy/l1_to_old"] = float(l1.detach())
        if o.reference_kl_weight:
            kl_ref = transition_kl(moved.means, moved.reference_means, moved.stds)
            loss = loss + o.reference_kl_weight * kl_ref
            metrics["policy/kl_to_reference"] = float(kl_ref.detach())
        return loss, metrics


def transition_kl(means: Tensor, target_means: Tensor, stds: Tensor) -> Tensor:
    """Mean KL (nats per latent dimension) between Gaussian transitions of one std and two means:
    ``|mu - mu_target|^2 / (2 std^2)``. ``means``, ``target_means``: (N, S, C, h, w); ``stds``:
    (N, S), positive. A scalar, with gradients through ``means``."""
    drift = (means - target_means).flatten(2)
    return ((drift**2).mean(-1) / (2 * stds**2)).mean()
