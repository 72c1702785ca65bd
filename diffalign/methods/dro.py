"""Diffusion-DRO (Wu et al., NeurIPS 2025): rank expert images above the policy's own samples.

No reward model and no preference pairs: a set of expert images with their prompts (e.g. the
top-K of a dataset by a registry reward, ``scripts/score_dataset.py`` + ``top_k``), a frozen
reference, and a lagged copy of the policy that samples the negatives. Algorithm (the paper's
thresholded ranking objective on denoising errors, as the official ``basiclab/DiffusionDRO``
``train.py`` computes it; the paper's equation numbers are not checked here), for each loader
batch of experts (x_0, c):

1. rollout: each prompt c becomes "" with probability ``caption_dropout``; the lagged policy
   samples from it (``rollout_sampler`` DPM-Solver++, ``rollout_steps`` 20, guidance
   ``rollout_guidance`` 1), each sample on its own schedule shifted by a random offset within
   one stride (``perturb_timesteps``) so that every timestep is trained; the trajectories
   (latents x_t, the sampler's predictions, timesteps), the expert latents and the prompt
   embeddings go into a replay buffer of ``buffer_size`` rows;
2. ``refresh_every`` micro-batches, each ``batch_size`` rows drawn from the buffer, each row at
   one random step t of its trajectory;
3. expert term at forward-noised ``x_0`` (fresh noise eps, target eps), policy term at the
   recorded x_t (target: the sampler's own prediction), both at t, for the policy and the
   reference (``denoising_logp_at``, ``logp = -0.5 mse``);
4. ``loss = dro_ranking``: ``mean(max(diff + 0.001, 0))``, ``diff = (mse_theta - mse_ref)(expert)
   - (mse_theta - mse_ref)(sample)`` at its defaults (the paper's max(m, diff), m = -0.001);
5. after every ``sync_every``-th optimiser step the lagged copy takes the policy's weights; the
   exported weights are the EMA's (``ema_decay`` 0.9999).

Any pairwise objective that needs no reward scores takes the expert as chosen and the sample as
rejected (``dpo`` then is a self-play DPO). The buffer and the lagged copy are checkpointed, so a
resumed run goes on with the same samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch.utils.data import Dataset

from diffalign.config import AT_LEAST_ONE, ConfigError, Range, check_ranges
from diffalign.data.experts import ExpertDataset, ExpertRecord, collate_experts, read_experts, usable_experts
from diffalign.diffusion.likelihood import denoising_logp_at, denoising_target
from diffalign.diffusion.online import LaggedPolicy, ReplayBuffer
from diffalign.diffusion.policy import UNET_ATTENTION_PROJECTIONS, Conditioning, drop_captions
from diffalign.diffusion.sampling import check_sampling, perturbed_timesteps, sample_with_trajectory
from diffalign.diffusion.schedule import require_sampleable
from diffalign.methods.unet_method import UNetMethod
from diffalign.objectives import check_objective_inputs
from diffalign.training.config import TrainConfig
from diffalign.training.loop import Stateful

__all__ = ["DiffusionDRO", "DiffusionDROOptions"]


@dataclass
class DiffusionDROOptions:
    score_prefix: str | None = field(
        default=None,
        metadata={"help": "score columns of scripts/score_dataset.py to rank the experts by (with top_k)"},
    )
    top_k: int | None = field(default=None, metadata={"help": "keep the K best-scored images (none: all)"})
    top_k_per_prompt: bool = field(default=False, metadata={"help": "top_k counts per prompt"})
    buffer_size: int = field(default=4, metadata={"help": "trajectories in the replay buffer (per process)"})
    refresh_every: int = field(
        default=1, metadata={"help": "micro-batches drawn from the buffer per rollout of a loader batch"}
    )
    sync_every: int = field(default=1, metadata={"help": "optimiser steps between lagged-copy syncs"})
    rollout_sampler: Literal["dpmsolver++", "ddim", "ddpm"] = field(
        default="dpmsolver++", metadata={"help": "sampler of the online negatives"}
    )
    rollout_steps: int = field(default=20, metadata={"help": "sampler steps of a rollout"})
    rollout_guidance: float = field(default=1.0, metadata={"help": "guidance scale of rollouts"})
    perturb_timesteps: bool = field(
        default=True, metadata={"help": "shift each rollout's schedule by a random offset within a stride"}
    )
    validation_guidance: float = field(default=5.0, metadata={"help": "guidance scale of validation grids"})

    ranges: ClassVar[dict[str, Range]] = dict.fromkeys(
        # guidance: 1 is the conditional prediction, below it no guidance either
        ("buffer_size", "refresh_every", "sync_every", "rollout_steps", "top_k", "rollout_guidance",
         "validation_guidance"),
        AT_LEAST_ONE,
    )  # fmt: skip

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.top_k_per_prompt and self.top_k is None:
            raise ValueError("top_k_per_prompt keeps the top_k images of each prompt: set top_k too")


class DiffusionDRO(UNetMethod):
    # the official train.py's: lr 1e-4 unscaled, constant, AdamW (torch's weight decay 1e-2),
    # EMA 0.9999, 20% empty prompts, center crop with flips at 512; full fine-tuning
    defaults: ClassVar[dict[str, Any]] = {
        "objective": {"name": "dro_ranking"},
        "optim": {"lr": 1e-4, "scale_lr": False, "weight_decay": 1e-2, "warmup_steps": 0},
        "data": {"resolution": 512, "random_crop": False, "hflip": True, "caption_dropout": 0.2},
        "model": {"lora": {"target_modules": list(UNET_ATTENTION_PROJECTIONS)}},
        "ema_decay": 0.9999,
    }
    options_class = DiffusionDROOptions

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        self.options: DiffusionDROOptions
        self._check_objective()
        self.experts = self.expert_records()  # before any model loads
        self._check_buffer()
        self.policy = self.load_policy(reference=self.objective.uses_reference)
        self._check_rollouts()
        self.lagged = LaggedPolicy(self.policy, self.options.sync_every)
        self.frozen.append(self.lagged.policy)
        shape = {
            "method_options.rollout_steps": self.options.rollout_steps,
            "data.resolution": self.cfg.data.resolution,
        }
        self.buffer = ReplayBuffer(self.options.buffer_size, settings=shape)
        self._dataset: ExpertDataset | None = None

    def expert_records(self) -> list[ExpertRecord]:
        """The expert images with their prompts, decoded once to drop (or refuse) broken ones.

        Raises:
            ValueError: no expert image, one without a prompt, no usable image, or ``top_k``
                without scores (naming ``data.path``, the row or the image).
        """
        d, o = self.cfg.data, self.options
        candidates = read_experts(d.path, split=d.split, score_prefix=o.score_prefix)
        # best first, so that an image skipped as broken leaves its place to the next best
        records, self.skipped_experts = usable_experts(
            candidates, d.on_bad_sample, o.top_k, o.top_k_per_prompt
        )
        return records

    def _check_objective(self) -> None:
        objective = self.objective
        if objective.kind != "pairwise":
            raise ValueError(
                f"{self.cfg.method} ranks an expert image above a sample: objective '{objective.name}' "
                f"is {objective.kind}, pick a pairwise one (dro_ranking, dpo, ipo, ...)"
            )
        logps = torch.zeros(2)
        ref = logps if objective.uses_reference else None
        inputs = self._objective_inputs(logps, logps, ref, ref)
        check_objective_inputs(objective, inputs, self.cfg.method, {})

    def _check_buffer(self) -> None:
        """The buffer must hold a micro-batch, and the run must make enough rollouts to fill it."""
        o, cfg = self.options, self.cfg
        if o.buffer_size < cfg.batch_size:
            raise ConfigError(
                f"method_options.buffer_size: {o.buffer_size} rows hold less than a micro-batch "
                f"(batch_size {cfg.batch_size}): each rollout would drop samples before training on them"
            )
        rollouts = math.ceil(cfg.max_steps * cfg.gradient_accumulation_steps / o.refresh_every)
        rows = min(cfg.batch_size, len(self.experts))  # a set smaller than a batch makes smaller rollouts
        if o.buffer_size > rollouts * rows:
            raise ConfigError(
                f"method_options.buffer_size: {o.buffer_size} rows, but the run samples only "
                f"{rollouts * rows} per process ({rollouts} rollouts of {rows} prompts: batch_size "
                f"{cfg.batch_size}, {len(self.experts)} experts): the buffer would never fill"
            )

    def _check_rollouts(self) -> None:
        o, training = self.options, self.policy.scheduler
        if o.rollout_steps > training.config.num_train_timesteps:
            raise ConfigError(
                f"method_options.rollout_steps: {o.rollout_steps} exceeds the schedule's "
                f"{training.config.num_train_timesteps} timesteps"
            )
        try:
            check_sampling(self.policy, o.rollout_sampler, o.rollout_steps)
        except ValueError as err:
            raise ValueError(f"method_options.rollout_sampler: the rollouts cannot be drawn: {err}") from err
        if not o.perturb_timesteps:
            return
        stride = training.config.num_train_timesteps // o.rollout_steps
        try:  # shifted schedules visit every timestep below T x stride, the last one included
            require_sampleable(training, torch.arange(o.rollout_steps * stride))
        except ValueError as err:
            raise ValueError(
                f"method_options.perturb_timesteps: shifted rollout schedules reach timestep "
                f"{o.rollout_steps * stride - 1}, where this model cannot sample (set "
                f"perturb_timesteps=false to keep the sampler's own schedule): {err}"
            ) from err

    def dataset(self) -> tuple[Dataset, Any]:
        d = self.cfg.data
        self._dataset = ExpertDataset(
            self.experts, d.resolution, d.random_crop, d.hflip, d.on_bad_sample, seed=self.cfg.seed
        )
        return self._dataset, collate_experts

    def dropped_samples(self) -> int:
        return self.skipped_experts + (self._dataset.skipped if self._dataset is not None else 0)

    def state(self) -> dict[str, Stateful]:
        return {"buffer": self.buffer, "lagged_policy": self.lagged}

    def on_optimizer_step(self, step: int) -> None:
        self.lagged.on_optimizer_step(step)

    def micro_batches(self, batch: dict, step: int) -> Any:
        """Step 1 on the loader batch, then step 2: ``refresh_every`` draws from the buffer."""
        self.buffer.push(self.rollout(batch["prompts"], batch["images"]))
        for _ in range(self.options.refresh_every):
            yield self.buffer.draw(self.cfg.batch_size)

    @torch.no_grad()
    def rollout(self, prompts: list[str], images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Buffer rows for B experts (``images`` (B, 3, R, R) in [0, 1]): the expert latent
        ``x0`` (B, C, h, w), the lagged policy's trajectory on the (dropped-out) prompt --
        ``latents`` (B, T, C, h, w) at which ``predictions`` (B, T, C, h, w) were made at
        ``timesteps`` (B, T) -- and the prompt's conditioning tensors (``cond.*``)."""
        o, policy = self.options, self.lagged.policy
        prompts = drop_captions(prompts, self.cfg.data.caption_dropout)  # for sampling and training alike
        x0 = policy.encode_images(images)
        timesteps = None
        if o.perturb_timesteps:
            num_train = policy.scheduler.config.num_train_timesteps
            timesteps = perturbed_timesteps(num_train, o.rollout_steps, len(prompts))
        height, width = images.shape[-2:]
        traj = sample_with_trajectory(
            policy, prompts, num_inference_steps=o.rollout_steps, guidance_scale=o.rollout_guidance,
            sampler=o.rollout_sampler, eta=0.0, timesteps=timesteps, height=height, width=width, decode=False,
        )  # fmt: skip
        steps = len(traj.predictions[0])
        cond = _flat_conditioning(traj.conditioning)
        return {
            "x0": x0,
            "latents": traj.latents[:, :steps],  # the inputs of the recorded steps (not the final x_0)
            "predictions": traj.predictions,
            "timesteps": traj.timesteps.expand(len(prompts), steps),
            **cond,
        }

    def step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Steps 3-4 on rows drawn from the buffer."""
        policy, device = self.policy, self.policy.device
        rows = torch.arange(len(batch["x0"]))
        at = torch.randint(0, batch["timesteps"].shape[1], (len(rows),))  # one trajectory step per row
        t = batch["timesteps"][rows, at].to(device)
        x0 = batch["x0"].to(device, policy.dtype)
        noise = torch.randn(x0.shape, dtype=torch.float32).to(device, x0.dtype)
        expert = (policy.scheduler.add_noise(x0, noise, t), denoising_target(policy, x0, noise, t))
        sample = (batch["latents"][rows, at].to(device, x0.dtype), batch["predictions"][rows, at].to(device))
        out = denoising_logp_at(
            policy,
            torch.stack([expert[0], sample[0]], 1),
            torch.stack([expert[1], sample[1].to(expert[1].dtype)], 1),
            t,
            _conditioning(batch, device, policy.dtype),
            with_reference=self.objective.uses_reference,
        )
        ref = (None, None) if out.reference is None else out.reference.unbind(1)
        result = self.objective(**self._objective_inputs(*out.policy.unbind(1), *ref))
        metrics = dict(result.metrics)
        for name, mse in (("policy", out.policy_mse), ("reference", out.reference_mse)):
            if mse is not None:
                metrics[f"mse/{name}_expert"] = float(mse[:, 0].detach().mean())
                metrics[f"mse/{name}_sample"] = float(mse[:, 1].detach().mean())
        return result.loss, metrics

    @staticmethod
    def _objective_inputs(
        expert: torch.Tensor,
        sample: torch.Tensor,
        ref_expert: torch.Tensor | None,
        ref_sample: torch.Tensor | None,
    ) -> dict[str, torch.Tensor | None]:
        return {
            "policy_chosen_logps": expert,
            "policy_rejected_logps": sample,
            "reference_chosen_logps": ref_expert,
            "reference_rejected_logps": ref_sample,
        }


def _flat_conditioning(cond: Conditioning) -> dict[str, torch.Tensor]:
    """A conditioning's tensors as buffer columns: ``cond.encoder_hidden_states``, ``cond.<added>``."""
    extra = cond.added_cond_kwargs or {}
    return {
        "cond.encoder_hidden_states": cond.encoder_hidden_states,
        **{f"cond.{k}": v for k, v in extra.items()},
    }


def _conditioning(batch: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> Conditioning:
    """The conditioning of buffer rows (see :func:`_flat_conditioning`) on ``device``, in the trained
    UNet's ``dtype`` (the lagged copy that encoded it may run in the mixed-precision one)."""
    extra = {
        k.removeprefix("cond."): v
        for k, v in batch.items()
        if k.startswith("cond.") and k != "cond.encoder_hidden_states"
    }
    cond = Conditioning(batch["cond.encoder_hidden_states"], extra or None)
    return cond.map(lambda t: t.to(device, dtype) if t.is_floating_point() else t.to(device))
