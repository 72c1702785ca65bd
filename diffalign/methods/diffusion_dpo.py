"""Diffusion-DPO (Wallace et al. 2023): DPO on the denoising-error likelihood proxy.

Algorithm (the paper's Eq. 14; the official code's reductions), per batch of pairs (c, x_w, x_l):

1. encode x_w and x_l to latents; encode c, replaced by "" with probability ``caption_dropout``;
2. draw one timestep t and one noise eps per pair, shared by x_w and x_l and by policy and
   reference (``denoising_logp``), and run the policy UNet once over [x_w; x_l];
3. ``logp = -0.5 * MSE`` for the policy and, under no-grad, for the reference (a frozen copy
   for full fine-tuning, the same UNet with adapters disabled for LoRA);
4. ``loss = objective(logp_w, logp_l, ref_w, ref_l)``: ``dpo`` at beta 5000 is exactly
   ``-log sigma(-0.5 beta ((mse_w - mse_l) - (ref_w - ref_l)))``; any registered pairwise
   objective (``ipo``, ``mappo``, ``simpo``, ...) works unchanged.

``sft: true`` trains the plain denoising loss on the chosen images instead (the paper's SFT
baseline). Ties kept with ``data.ties=half`` carry the soft label 1/2 into the objective (see
``diffalign.objectives.pairwise``), and into the SFT loss as equal weights on both images.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset

from diffalign.config import build
from diffalign.data.pairs import PreferencePairDataset, collate_pairs
from diffalign.data.preference import read_preference_pairs
from diffalign.diffusion.likelihood import denoising_logp
from diffalign.diffusion.policy import Conditioning, DiffusionPolicy
from diffalign.diffusion.sampling import check_sampling, sample_with_trajectory
from diffalign.objectives import check_ties, get_objective, soft_preference_probs
from diffalign.training.config import TrainConfig
from diffalign.training.loop import Method


@dataclass
class DiffusionDPOOptions:
    sft: bool = False
    timestep_weighting: Literal["constant", "min_snr"] = "constant"
    validation_guidance: float = 5.0


class DiffusionDPO(Method):
    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        self.options = build(DiffusionDPOOptions, cfg.method_options, source="method_options")
        self.objective = get_objective(**cfg.objective)
        if self.objective.kind != "pairwise":
            raise ValueError(f"diffusion_dpo needs a pairwise objective, got '{self.objective.name}'")
        if not self.options.sft:  # the SFT baseline weighs ties itself and never calls the objective
            check_ties(self.objective, cfg.data.ties)
        policy = DiffusionPolicy.from_pretrained(cfg.model.pretrained, adapter=cfg.model.adapter)
        if policy.is_inpainting:
            raise ValueError(
                f"model.pretrained: {cfg.model.pretrained} is an inpainting pipeline; diffusion_dpo trains "
                "text-to-image UNets on pairs without masks"
            )
        if cfg.validation_every and cfg.validation_prompts:
            try:
                check_sampling(policy, "ddim", cfg.validation_steps)
            except ValueError as err:
                raise ValueError(f"validation_every: the validation samples cannot be drawn: {err}") from err
        policy.set_attention_backend(cfg.model.attention)
        if cfg.model.lora is not None:
            lora = cfg.model.lora
            policy.add_lora(lora.rank, lora.alpha, lora.target_modules)
        if self.objective.uses_reference and not self.options.sft:
            mode = cfg.model.reference
            if mode == "precomputed":
                raise ValueError(
                    "model.reference: 'precomputed' is for text methods; diffusion_dpo draws fresh noise "
                    "each step, so its reference runs live (copy or adapters)"
                )
            policy.make_reference(("adapters" if cfg.model.lora else "copy") if mode == "auto" else mode)
        if cfg.model.gradient_checkpointing:
            policy.enable_gradient_checkpointing()
        self.policy = policy
        self.records = read_preference_pairs(cfg.data.path, ties=cfg.data.ties, split=cfg.data.split)
        self._dataset: PreferencePairDataset | None = None

    def trainable_module(self) -> torch.nn.Module:
        return self.policy.unet

    def use_prepared(self, module: torch.nn.Module) -> None:
        self.policy.train_unet = module

    def setup(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        self.policy.unet.to(device)
        for frozen in (self.policy.vae, self.policy.reference_unet, *self.policy.text_encoders):
            if frozen is not None:
                frozen.to(device)
                if weight_dtype != torch.float32:  # frozen parts run in the autocast dtype
                    frozen.to(dtype=weight_dtype)

    def dataset(self) -> tuple[Dataset, Any]:
        d = self.cfg.data
        self._dataset = PreferencePairDataset(
            self.records, d.resolution, d.random_crop, d.hflip, d.on_bad_sample, seed=self.cfg.seed
        )
        return self._dataset, collate_pairs

    def dropped_samples(self) -> int:
        return self._dataset.skipped if self._dataset is not None else 0

    def step(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        policy = self.policy
        images = torch.cat([batch["chosen"], batch["rejected"]])
        with torch.no_grad():
            latents = torch.stack(
                policy.encode_images(images).chunk(2), dim=1
            )  # (B, 2, C, h, w): chosen first
        size = tuple(images.shape[-2:])
        cond = policy.encode_prompts(batch["prompts"], dropout=self.cfg.data.caption_dropout, image_size=size)
        if self.options.sft:
            return self._sft_step(latents, cond, batch["labels"].to(latents.device))
        out = denoising_logp(
            policy,
            latents,
            cond,
            with_reference=self.objective.uses_reference,
            weighting=self.options.timestep_weighting,
        )
        ref = out.reference
        result = self.objective(
            policy_chosen_logps=out.policy[:, 0],
            policy_rejected_logps=out.policy[:, 1],
            reference_chosen_logps=None if ref is None else ref[:, 0],
            reference_rejected_logps=None if ref is None else ref[:, 1],
            preference_probs=soft_preference_probs(batch["labels"], out.policy.device),
        )
        metrics = dict(result.metrics)
        mse = out.policy_mse.detach()
        metrics.update(
            {"mse/policy_chosen": float(mse[:, 0].mean()), "mse/policy_rejected": float(mse[:, 1].mean())}
        )
        if out.reference_mse is not None:
            metrics["mse/reference_chosen"] = float(out.reference_mse[:, 0].mean())
            metrics["mse/reference_rejected"] = float(out.reference_mse[:, 1].mean())
        return result.loss, metrics

    def _sft_step(
        self, latents: torch.Tensor, cond: Conditioning, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The denoising loss on the preferred image; with ties kept, on both images weighted by
        the label (p, 1 - p), so that a tie teaches both halves equally."""
        keep = 2 if self.cfg.data.ties == "half" else 1
        out = denoising_logp(
            self.policy, latents[:, :keep], cond, with_reference=False,
            weighting=self.options.timestep_weighting,
        )  # fmt: skip
        weights = torch.stack([labels, 1 - labels], dim=1)[:, :keep]
        loss = (weights * out.policy_mse).sum(1).mean()
        return loss, {"mse/policy_chosen": float(out.policy_mse[:, 0].detach().mean())}

    def export(self, path: Path) -> None:
        """LoRA: ``pytorch_lora_weights.safetensors`` for ``pipeline.load_lora_weights(path)``;
        full fine-tuning: ``path/unet`` for ``UNet2DConditionModel.from_pretrained``."""
        unet = self.policy.unet
        path.mkdir(parents=True, exist_ok=True)
        if self.policy.has_lora:
            from diffusers import StableDiffusionPipeline
            from diffusers.utils import convert_state_dict_to_diffusers
            from peft.utils import get_peft_model_state_dict

            layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
            StableDiffusionPipeline.save_lora_weights(str(path), unet_lora_layers=layers)
            if self.cfg.model.adapter:  # these LoRA weights apply on top of the fused starting adapter
                start = {
                    k: str(Path(v).resolve()) if Path(v).exists() else v
                    for k, v in (
                        ("pretrained", self.cfg.model.pretrained),
                        ("fused_adapter", self.cfg.model.adapter),
                    )
                }
                (path / "starting_point.json").write_text(json.dumps(start, indent=2))
        else:
            unet.save_pretrained(path / "unet")

    def sample_grid(self, prompts: list[str], seed: int, steps: int) -> torch.Tensor:
        generator = torch.Generator(self.policy.device).manual_seed(seed)
        guidance = self.options.validation_guidance
        with torch.no_grad():
            traj = sample_with_trajectory(
                self.policy,
                prompts,
                num_inference_steps=steps,
                guidance_scale=guidance,
                eta=0.0,
                generator=generator,
            )
        return traj.images
