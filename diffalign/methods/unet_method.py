"""What every text-to-image recipe does the same way: the policy it trains (LoRA or full, its
reference, attention backend, gradient checkpointing), where its frozen parts live, the
diffusers-format export and the validation grids. Diffusion-DPO, SmPO and Diffusion-DRO build on
it; each adds its data, its estimator call and its objective.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch

from diffalign.config import ConfigError
from diffalign.diffusion.policy import DiffusionPolicy
from diffalign.diffusion.sampling import check_sampling, sample_with_trajectory
from diffalign.objectives import get_objective
from diffalign.training.config import TrainConfig
from diffalign.training.loop import Method

__all__ = ["UNetMethod"]


class UNetMethod(Method):
    """A recipe that trains a text-to-image UNet (``trainable_module``) of a diffusers pipeline.

    ``__init__`` builds ``self.objective`` (``Method`` builds ``self.options``); a subclass reads
    and checks its data next, so that bad data fails before any model loads, then calls
    :meth:`load_policy`. ``self.frozen`` lists the frozen UNet copies (lagged or inverting
    policies) that :meth:`setup` places beside the reference.
    """

    policy: DiffusionPolicy

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        if cfg.model.trust_remote_code:
            raise ConfigError(
                "model.trust_remote_code: diffusion pipelines are loaded without running code they ship; "
                "the option is for text models"
            )
        if cfg.model.reference == "adapters" and cfg.model.lora is None:
            raise ConfigError(
                "model.reference: 'adapters' needs model.lora (the reference is the UNet without them)"
            )
        self.objective = get_objective(**self.cfg.objective)
        self.frozen: list[DiffusionPolicy] = []

    def _check_unet_kind(self, in_channels: int, out_channels: int, inpainting: bool) -> None:
        is_inpainting = in_channels == 2 * out_channels + 1
        if is_inpainting != inpainting:
            kind = "an inpainting" if is_inpainting else "a text-to-image"
            wanted = "inpainting UNets (latents, mask and masked image: 2C + 1 input channels)"
            raise ValueError(
                f"model.pretrained: {self.cfg.model.pretrained} is {kind} pipeline (its UNet takes "
                f"{in_channels} input channels); {self.cfg.method} trains "
                f"{wanted if inpainting else 'text-to-image UNets'}"
            )

    def load_policy(self, reference: bool, inpainting: bool = False) -> DiffusionPolicy:
        """The pipeline of ``model.pretrained`` with LoRA adapters when ``model.lora`` is set, a
        reference when ``reference`` (``model.reference``: a frozen copy, or the adapters turned
        off; auto picks adapters under LoRA), the attention backend, gradient checkpointing and
        the memory format (``model.channels_last``).
        ``inpainting``: the recipe trains an inpainting UNet (else a text-to-image one).

        Raises:
            ValueError: a pipeline of the other kind (inpainting or not), validation samples that
                cannot be drawn, or a reference mode these recipes cannot use (``precomputed``: the
                noise is fresh every step).
        """
        cfg = self.cfg
        local = Path(cfg.model.pretrained) / "unet" / "config.json"
        unet: dict = {}
        if local.is_file():  # a local pipeline: refused before any weights load
            with contextlib.suppress(ValueError):  # unreadable: from_pretrained names the file
                unet = json.loads(local.read_text())
        if unet:
            self._check_unet_kind(unet.get("in_channels", 4), unet.get("out_channels", 4), inpainting)
        policy = DiffusionPolicy.from_pretrained(cfg.model.pretrained, adapter=cfg.model.adapter)
        self._check_unet_kind(policy.unet.config.in_channels, policy.unet.config.out_channels, inpainting)
        if cfg.validation_every and cfg.validation_prompts and not inpainting:
            try:
                check_sampling(policy, "ddim", cfg.validation_steps)
            except ValueError as err:
                raise ValueError(f"validation_every: the validation samples cannot be drawn: {err}") from err
        policy.set_attention_backend(cfg.model.attention)
        if cfg.model.lora is not None:
            lora = cfg.model.lora
            policy.add_lora(lora.rank, lora.alpha, lora.target_modules)
        if reference:
            mode = cfg.model.reference
            if mode == "precomputed":
                raise ValueError(
                    f"model.reference: 'precomputed' is for text methods; {cfg.method} draws fresh noise "
                    "each step, so its reference runs live (copy or adapters)"
                )
            policy.make_reference(("adapters" if cfg.model.lora else "copy") if mode == "auto" else mode)
        if cfg.model.gradient_checkpointing:
            policy.enable_gradient_checkpointing()
        if cfg.model.channels_last:
            for unet in (policy.unet, policy.reference_unet):
                if unet is not None:
                    unet.to(memory_format=torch.channels_last)
        return policy

    def trainable_module(self) -> torch.nn.Module:
        return self.policy.unet

    def use_prepared(self, module: torch.nn.Module) -> None:
        """Forwards through ``module`` (DDP's wrapper), compiled with ``model.compile``."""
        self.policy.train_unet = torch.compile(module) if self.cfg.model.compile else module

    def setup(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        """The trained UNet to ``device``; the frozen parts (VAE, text encoders, reference, the
        ``frozen`` copies) too, in ``weight_dtype`` under mixed precision, as they only run forwards."""
        self.policy.unet.to(device)
        frozen = [self.policy.vae, self.policy.reference_unet, *self.policy.text_encoders]
        for module in [*frozen, *(copy.unet for copy in self.frozen)]:
            if module is not None:
                module.to(device)
                if weight_dtype != torch.float32:
                    module.to(dtype=weight_dtype)

    def export(self, path: Path) -> None:
        """LoRA: ``pytorch_lora_weights.safetensors`` for ``pipeline.load_lora_weights(path)``;
        full fine-tuning: ``path/unet`` for ``UNet2DConditionModel.from_pretrained``."""
        unet = self.policy.unet
        path.mkdir(parents=True, exist_ok=True)
        if not self.policy.has_lora:
            unet.save_pretrained(path / "unet")
            return
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

    def sample_grid(self, prompts: list[str], seed: int, steps: int) -> torch.Tensor:
        generator = torch.Generator(self.policy.device).manual_seed(seed)
        guidance: Any = self.options.validation_guidance
        with torch.no_grad():
            traj = sample_with_trajectory(
                self.policy, prompts, num_inference_steps=steps, guidance_scale=guidance, eta=0.0,
                generator=generator,
            )  # fmt: skip
        return traj.images
