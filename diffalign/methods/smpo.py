"""SmPO-Diffusion (Lu et al., ICML 2025): smoothed preferences on ReNoise-inverted trajectories.

Algorithm (the paper's Eq. 9 and its Sec. 4; the official ``JaydenLyh/SmPO`` ``train.py``), with
reward scores ``(r_a, r_b)`` for each pair of images:

1. the winner is the image the reward prefers, not the human label; scores are min-max
   normalised with ``score_bounds`` (default: the lowest and highest score of the data; the
   official code hard-codes PickScore's 0.1154 / 0.2820);
2. both images are encoded to latents ``x_0`` and the prompt ``c`` (replaced by "" with
   probability ``caption_dropout``), as Diffusion-DPO does;
3. one timestep ``t`` is drawn for the batch, and ``x_0`` is inverted with ReNoise
   (``inversion_steps`` DDIM steps, ``renoise_steps`` iterations each, no guidance) through the
   inversion timesteps below ``t``, by the current policy (the paper's) or the frozen reference
   (``invert_with: reference``: its inversions are cached once per image), reaching ``z``;
4. the target is the noise that ``z`` implies at ``t``, ``(z - sqrt(a_t) x_0) / sqrt(1 - a_t)``
   (in the model's prediction type), and ``logp = -0.5 mse`` at ``(z, t)`` for the policy and,
   under no-grad, the reference (``denoising_logp_at``); as in the official code, ``z`` sits at
   the highest inversion timestep below ``t``, not at ``t`` itself;
5. ``loss = smoothed_dpo``: ``-log sigma(gamma (2p - 1) beta h)`` with the soft label
   ``p = sigmoid(r'_w - r'_l)`` (Eq. 9): it fades to ``log 2``, with no gradient, as the two
   scores converge.

``inversion_steps: 0`` noises forward instead (Diffusion-DPO's step), and ``smoothing: false``
passes hard labels (``p = 1``): with both, and ``gamma = 1``, SmPO's loss is Diffusion-DPO's.
Scores come from the data (``score_prefix``, JSONL ``chosen_reward`` / ``rejected_reward``) or
from a registry reward (``reward``) that scores every image once, before training.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from diffalign.config import NON_NEGATIVE, ConfigError, Range
from diffalign.data.preference import PairRecord, load_image
from diffalign.diffusion.inversion import renoise_invert
from diffalign.diffusion.likelihood import DenoisingLogp, denoising_logp_at, denoising_target
from diffalign.diffusion.policy import Conditioning
from diffalign.methods.diffusion_dpo import DiffusionDPO, DiffusionDPOOptions
from diffalign.rng import Generators
from diffalign.training.config import TrainConfig

__all__ = ["SmPO", "SmPOOptions"]


@dataclass
class SmPOOptions(DiffusionDPOOptions):
    reward: str | None = field(
        default=None,
        metadata={"help": "registry reward that scores every image once when the data has no scores"},
    )
    reward_options: dict[str, Any] = field(default_factory=dict, metadata={"help": "the reward's options"})
    score_bounds: tuple[float, float] | None = field(
        default=None,
        metadata={"help": "min and max of the score normalisation (none: the data's; official: PickScore's)"},
    )
    smoothing: bool = field(default=True, metadata={"help": "soft labels from the scores (false: p = 1)"})
    inversion_steps: int = field(
        default=5,
        metadata={"help": "DDIM inversion steps (official: 5 for SD1.5, 10 for SDXL; 0: forward noise)"},
    )
    renoise_steps: int = field(default=1, metadata={"help": "ReNoise iterations per inversion step"})
    average_range: tuple[int, int] | None = field(
        default=None, metadata={"help": "ReNoise iterations whose estimates are averaged (none: all)"}
    )
    invert_with: Literal["policy", "reference"] = field(
        default="policy",
        metadata={
            "help": "the current policy inverts (the paper), or the frozen reference, cached per image"
        },
    )

    ranges: ClassVar[dict[str, Range]] = {
        "score_bounds": Range(),
        "inversion_steps": NON_NEGATIVE,
        "renoise_steps": NON_NEGATIVE,
        "average_range": NON_NEGATIVE,
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        first, last = self.average_range or (0, self.renoise_steps)
        if not 0 <= first <= last <= self.renoise_steps:
            raise ValueError(
                f"average_range must satisfy 0 <= first <= last <= renoise_steps ({self.renoise_steps}), "
                f"got {self.average_range}"
            )


class SmPO(DiffusionDPO):
    # the official SD1.5 launcher's (examples/sd15.sh): beta 2000, lr 1e-8 per sample scaled by
    # the batch, warmup 100 (gamma 10 is the objective's default); data and LoRA as Diffusion-DPO
    defaults: ClassVar[dict[str, Any]] = {
        **DiffusionDPO.defaults,
        "objective": {"name": "smoothed_dpo", "beta": 2000.0},
        "optim": {**DiffusionDPO.defaults["optim"], "warmup_steps": 100},
    }
    options_class = SmPOOptions

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        self.options: SmPOOptions
        steps, limit = self.options.inversion_steps, self.policy.scheduler.config.num_train_timesteps
        if steps > limit:
            raise ConfigError(
                f"method_options.inversion_steps: {steps} exceeds the schedule's {limit} timesteps"
            )
        lo, hi = self.score_bounds
        if hasattr(self.objective, "reward_min"):  # smoothed_dpo, mappo: the normalisation SmPO uses
            self.objective = dataclasses.replace(self.objective, reward_min=lo, reward_max=hi)
            self.cfg.objective.update(reward_min=lo, reward_max=hi)  # config.json says what trained
        self.inverter = self.policy
        if self.options.invert_with == "reference":
            self.inverter = self.policy.frozen_copy()  # the starting weights, as the reference's
            self.frozen.append(self.inverter)
        self.inversions: dict[bytes, torch.Tensor] = {}  # the reference's trajectories, by image

    def preference_pairs(self) -> list[PairRecord]:
        if self.options.sft:
            raise ValueError("method_options.sft: SmPO has no SFT baseline; use diffusion_dpo for it")
        records = super().preference_pairs()
        if records[0].rewards is None:
            records = self._scored(records)
        elif self.options.reward is not None:
            raise ConfigError(
                f"method_options.reward: {self.cfg.data.path} has reward scores already, so "
                f"'{self.options.reward}' would go unused: remove one of the two"
            )
        if all(r.rewards[0] == r.rewards[1] for r in records):
            raise ValueError(
                f"{self.cfg.data.path}: every pair's two scores are equal: each soft label is 1/2, and "
                "SmPO would learn nothing"
            )
        # checked here, with the data, before any model loads
        lo, hi = self.score_bounds = self.options.score_bounds or _data_bounds(records)
        if not hi > lo:
            raise ValueError(f"method_options.score_bounds must rise, got ({lo}, {hi})")
        # the reward decides the winner (official code): swap the pairs it ranks the other way
        return [
            dataclasses.replace(r, chosen=r.rejected, rejected=r.chosen, rewards=r.rewards[::-1])
            if r.rewards[1] > r.rewards[0]
            else r
            for r in records
        ]

    def _scored(self, records: list[PairRecord]) -> list[PairRecord]:
        """The pairs with the scores of ``options.reward``, computed once here."""
        from diffalign.rewards import load_reward

        if self.options.reward is None:
            raise ValueError(
                f"{self.cfg.data.path}: SmPO needs reward scores and the pairs have none: set "
                "method_options.score_prefix (columns of scripts/score_dataset.py), give chosen_reward "
                "and rejected_reward on every JSONL row, or name a reward in method_options.reward"
            )
        try:
            reward = load_reward(self.options.reward, **self.options.reward_options)
        except (KeyError, TypeError) as err:  # an unknown reward or option: the config's to fix
            raise ConfigError(f"method_options.reward: {err.args[0]}") from err
        if reward.needs_prompts and (empty := next((r for r in records if not r.prompt.strip()), None)):
            raise ValueError(
                f"{empty.where}: reward '{self.options.reward}' needs a prompt, and the row has none"
            )
        scored = []
        for r in records:
            images = torch.stack([load_image(r.chosen, r.where), load_image(r.rejected, r.where)])
            scores = reward(images, [r.prompt] * 2 if reward.needs_prompts else None).float()
            scored.append(dataclasses.replace(r, rewards=(float(scores[0]), float(scores[1]))))
        return scored

    def denoising_logps(
        self, latents: torch.Tensor, cond: Conditioning, batch: dict, streams: Generators = None
    ) -> DenoisingLogp:
        """Policy and reference log-likelihood proxies at the pairs' inverted latents (steps 3-4);
        one timestep for the batch, from torch's generator, as the official code draws it."""
        if self.options.inversion_steps == 0:
            return super().denoising_logps(latents, cond, batch, streams)
        policy, (b, k) = self.policy, latents.shape[:2]
        t = torch.randint(0, policy.scheduler.config.num_train_timesteps, (), device=latents.device)
        # candidate-major, as the official [winners; losers]
        x0, z = self._inverted(
            latents.transpose(0, 1).flatten(0, 1),
            torch.cat([batch["chosen"], batch["rejected"]]),
            Conditioning.cat([cond] * k),
            int(t),
        )
        alpha = policy.scheduler.alphas_cumprod.to(latents.device, torch.float32)[t]
        noise = (z.float() - alpha.sqrt() * x0.float()) / (1 - alpha).sqrt()
        target = denoising_target(policy, x0, noise.to(x0.dtype), t.expand(len(x0)))
        return denoising_logp_at(
            policy,
            z.unflatten(0, (k, b)).transpose(0, 1),
            target.unflatten(0, (k, b)).transpose(0, 1),
            t.expand(b),
            cond,
            with_reference=self.objective.uses_reference,
            weighting=self.options.timestep_weighting,
        )

    @torch.no_grad()
    def _inverted(
        self, x0: torch.Tensor, images: torch.Tensor, cond: Conditioning, t: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x0`` (N, C, h, w), the latents of ``images``, and ``x0`` inverted through the
        inversion timesteps below ``t``. The reference's inversions are cached by image (pixels
        after crop and flip) with the latent they started from, which then stands for ``x0``:
        the VAE samples a new one each step, and the target must be of the latent inverted."""
        o = self.options
        kwargs = {"num_inference_steps": o.inversion_steps, "renoise_steps": o.renoise_steps}
        kwargs["average_range"] = o.average_range
        if o.invert_with == "policy":
            return x0, renoise_invert(self.inverter, x0, cond, below=t, **kwargs).latents[:, -1]
        keys = [hashlib.sha1(image.float().cpu().numpy().tobytes()).digest() for image in images]
        missing = [i for i, key in enumerate(keys) if key not in self.inversions]
        if missing:  # the whole trajectory, once per image: each step picks the latent below its t
            done = renoise_invert(self.inverter, x0[missing], cond.map(lambda c: c[missing]), **kwargs)
            self.inversions.update(zip([keys[i] for i in missing], done.latents.cpu(), strict=True))
            self.inversion_timesteps = done.timesteps.cpu()
        reached = int((self.inversion_timesteps < t).sum())  # trajectory[0] is x0 itself
        trajectories = torch.stack([self.inversions[key] for key in keys]).to(x0.device)
        return trajectories[:, 0], trajectories[:, reached]

    def _objective_inputs(
        self, policy: torch.Tensor, reference: torch.Tensor | None, batch: dict
    ) -> dict[str, torch.Tensor | None]:
        inputs = super()._objective_inputs(policy, reference, batch)
        if not self.options.smoothing:  # hard labels: the reward's winner is certain
            inputs.update(chosen_rewards=None, rejected_rewards=None)
            inputs["preference_probs"] = torch.ones(len(policy), device=policy.device)
        return inputs


def _data_bounds(records: list[PairRecord]) -> tuple[float, float]:
    """The lowest and highest score of the data (distinct: some pair has a gap, checked before)."""
    scores = [s for r in records for s in r.rewards]
    return min(scores), max(scores)
