"""``DiffusionPolicy``: one wrapper around a diffusers UNet and everything it is conditioned on.

It owns what every method needs from a Stable-Diffusion-family model and nothing method-specific:

- loading a diffusers pipeline folder (or a hub id where a network exists);
- conditioning: SD 1.x/2.x text embeddings, SDXL's two encoders with pooled embeddings and
  added time ids, and inpainting UNets' extra channels (mask and masked-image latents);
- prompt encoding with caption dropout, image encoding/decoding through the VAE (scaling and
  shift factors), classifier-free guidance;
- LoRA through peft, and the reference model: a frozen copy of the UNet, or the same UNet with
  its adapters disabled;
- gradient checkpointing and the attention backend (PyTorch SDPA by default; xformers on
  request, with a clear error where it cannot run).

Images at this boundary are float NCHW in [0, 1]; latents are scaled VAE latents.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from diffalign import rng
from diffalign.images import masked_for_inpainting
from diffalign.rng import Generators

__all__ = [
    "UNET_ATTENTION_PROJECTIONS",
    "Conditioning",
    "DiffusionPolicy",
    "InpaintInputs",
    "attention_backend_available",
]

UNET_ATTENTION_PROJECTIONS = ("to_k", "to_q", "to_v", "to_out.0")
"""The UNet modules diffusers' LoRA training scripts adapt: each attention's projections."""


def drop_captions(prompts: list[str], dropout: float, generator: Generators = None) -> list[str]:
    """Each prompt replaced by "" with probability ``dropout`` (caption dropout, as the official
    Diffusion-DPO and Diffusion-DRO scripts train); one uniform draw per prompt from ``generator``
    (one, one per prompt, or None: torch's global one), none at all when ``dropout`` is 0."""
    if dropout <= 0:
        return prompts
    drop = rng.rand(len(prompts), generator) < dropout
    return ["" if d else p for p, d in zip(prompts, drop.tolist(), strict=True)]


@dataclass
class Conditioning:
    """What the UNet is conditioned on, batched: text hidden states plus SDXL's added conditions."""

    encoder_hidden_states: Tensor
    added_cond_kwargs: dict[str, Tensor] | None = None

    def __len__(self) -> int:
        return self.encoder_hidden_states.shape[0]

    def map(self, fn: Callable[[Tensor], Tensor]) -> Conditioning:
        extra = (
            None if self.added_cond_kwargs is None else {k: fn(v) for k, v in self.added_cond_kwargs.items()}
        )
        return Conditioning(fn(self.encoder_hidden_states), extra)

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        extra = None
        if parts[0].added_cond_kwargs is not None:
            extra = {
                k: torch.cat([p.added_cond_kwargs[k] for p in parts]) for k in parts[0].added_cond_kwargs
            }
        return Conditioning(torch.cat([p.encoder_hidden_states for p in parts]), extra)


@dataclass
class InpaintInputs:
    """The extra UNet channels of an inpainting model, at latent resolution (1 = repaint)."""

    mask: Tensor
    masked_image_latents: Tensor

    def repeat(self, times: int) -> InpaintInputs:
        return InpaintInputs(
            self.mask.repeat(times, 1, 1, 1), self.masked_image_latents.repeat(times, 1, 1, 1)
        )


def _holds_lora(folder: Path) -> bool:
    """Whether a folder holds a safetensors file of LoRA weights (whatever its name)."""
    from safetensors import safe_open

    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            if any("lora" in key for key in f.keys()):  # noqa: SIM118 (a safetensors handle)
                return True
    return False


def _fuse_lora(pipe, adapter: str | Path) -> None:  # type: ignore[no-untyped-def]
    """Fuse a LoRA into the pipeline's weights and drop the LoRA layers (diffusers' own loaders)."""
    if not Path(adapter).exists():
        raise FileNotFoundError(f"model.adapter: {adapter} does not exist")
    if not hasattr(pipe, "load_lora_weights"):
        raise ValueError(f"model.adapter: {type(pipe).__name__} cannot load LoRA weights ({adapter})")
    try:
        pipe.load_lora_weights(str(adapter))
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ValueError(f"model.adapter: cannot load {adapter} into this pipeline ({err})") from err
    components = [c for c in ("unet", "text_encoder", "text_encoder_2") if getattr(pipe, c, None) is not None]
    loaded = sum("lora_" in name for c in components for name, _ in getattr(pipe, c).named_parameters())
    if loaded == 0:  # diffusers only warns when no key matches: the adapter would vanish silently
        raise ValueError(
            f"model.adapter: {adapter} has no LoRA weights for this pipeline's UNet or text encoders "
            "(saved for another model family?)"
        )
    pipe.fuse_lora(components=components)
    pipe.unload_lora_weights()
    pipe.unet.requires_grad_(True)  # peft froze it to attach the adapter; training decides what trains


def _load_pipeline(source: str, torch_dtype: torch.dtype | None, local_files_only: bool | None):  # type: ignore[no-untyped-def]
    """``DiffusionPipeline.from_pretrained`` with errors that name the folder and the fix."""
    from diffusers import DiffusionPipeline

    is_dir = Path(source).is_dir()
    if not is_dir and Path(source).exists():
        raise FileNotFoundError(
            f"{source} is a file; pass the pipeline folder (the one with model_index.json)"
        )
    if is_dir and not (Path(source) / "model_index.json").is_file():
        if _holds_lora(Path(source)):
            raise FileNotFoundError(
                f"{source} is a LoRA folder, not a pipeline: set model.pretrained to the base pipeline "
                f"it was trained on and model.adapter={source} (it is fused into the UNet)"
            )
        raise FileNotFoundError(f"{source} has no model_index.json: not a diffusers pipeline folder")
    kwargs: dict = {"safety_checker": None}
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    if local_files_only is not None:
        kwargs["local_files_only"] = local_files_only
    if is_dir:  # components saved as null (a pixel-space model has no VAE) load as None
        index = json.loads((Path(source) / "model_index.json").read_text())
        kwargs.update({k: None for k, v in index.items() if isinstance(v, list) and v[0] is None})
    try:
        return DiffusionPipeline.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        if is_dir:
            raise
        raise FileNotFoundError(
            f"could not load diffusion pipeline '{source}': it is not a local folder and the hub did not "
            f"provide it ({type(err).__name__}: {err}). Without a network, download it elsewhere "
            f"(e.g. `huggingface-cli download {source} --local-dir DIR`) and pass DIR instead."
        ) from err


def attention_backend_available(backend: str) -> tuple[bool, str]:
    """Whether ``backend`` can run here, and if not, why."""
    if backend in ("sdpa", "classic"):
        return True, ""
    if backend == "xformers":
        try:
            import xformers.ops  # noqa: F401
        except Exception as err:  # ImportError, or its compiled extension failing to load
            why = f"xformers is not usable here ({type(err).__name__}: {err})"
            return False, f"{why}; pip install 'diffalign[xformers]' with a wheel matching your torch"
        if not torch.cuda.is_available():
            return False, "xformers has no CPU path: it needs a CUDA device"
        return True, ""
    return False, f"unknown attention backend '{backend}' (choose sdpa, xformers or classic)"


@dataclass
class DiffusionPolicy:
    """A diffusers UNet with its scheduler, VAE, text encoders and reference model."""

    unet: torch.nn.Module
    scheduler: object  # a DDPMScheduler on the pipeline's noise schedule (samplers derive from its config)
    vae: torch.nn.Module | None = None
    text_encoders: list[torch.nn.Module] = field(default_factory=list)
    tokenizers: list[object] = field(default_factory=list)
    reference_unet: torch.nn.Module | None = None
    force_zeros_for_empty_prompt: bool = False
    # the UNet as the training loop prepared it (DDP/FSDP wrapper); policy forwards go through it
    train_unet: torch.nn.Module | None = None

    # -- loading ---------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        local_files_only: bool | None = None,
        adapter: str | Path | None = None,
    ) -> DiffusionPolicy:
        """Load a diffusers pipeline folder (SD 1.x/2.x, SDXL, or their inpainting variants).

        ``name_or_path`` is a local folder, or a hub id when a network is available. Offline, an id
        that is not in the local cache raises ``FileNotFoundError`` saying how to pass a folder.
        ``adapter``: a LoRA folder or file (``save_lora_weights``' format, e.g. an SFT LoRA) fused into
        the UNet and text encoders, so that the policy and its reference both start from it;
        ``ValueError`` if it holds no LoRA weights for this pipeline.
        """
        from diffusers import DDPMScheduler

        pipe = _load_pipeline(str(name_or_path), torch_dtype, local_files_only)
        if adapter is not None:
            _fuse_lora(pipe, adapter)
        encoders = [
            e for e in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if e
        ]
        tokenizers = [t for t in (getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None)) if t]
        policy = cls(
            unet=pipe.unet,
            scheduler=DDPMScheduler.from_config(pipe.scheduler.config),  # the training noise schedule
            vae=getattr(pipe, "vae", None),
            text_encoders=encoders,
            tokenizers=tokenizers,
            force_zeros_for_empty_prompt=bool(pipe.config.get("force_zeros_for_empty_prompt", False)),
        )
        for module in (policy.vae, *policy.text_encoders):
            if module is not None:
                module.requires_grad_(False).eval()
        return policy.to(device) if device is not None else policy

    def to(
        self, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> DiffusionPolicy:
        for module in (self.unet, self.vae, self.reference_unet, *self.text_encoders):
            if module is not None:
                module.to(device=device, dtype=dtype)
        return self

    # -- what kind of model this is --------------------------------------------------------

    @property
    def is_sdxl(self) -> bool:
        return len(self.text_encoders) == 2

    @property
    def is_inpainting(self) -> bool:
        return self.unet.config.in_channels == self.unet.config.out_channels * 2 + 1

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    @property
    def latent_channels(self) -> int:
        return self.unet.config.out_channels

    # -- LoRA, reference, memory -----------------------------------------------------------

    def add_lora(
        self,
        rank: int = 4,
        alpha: float | None = None,
        target_modules: Sequence[str] = UNET_ATTENTION_PROJECTIONS,
        init: str | bool = "gaussian",
    ) -> None:
        """Freeze the UNet and add trainable LoRA adapters (peft) to ``target_modules``, by default its
        attention projections (as diffusers' LoRA scripts)."""
        from peft import LoraConfig

        self.unet.requires_grad_(False)
        config = LoraConfig(
            r=rank, lora_alpha=alpha or rank, init_lora_weights=init, target_modules=list(target_modules)
        )
        self.unet.add_adapter(config)

    @property
    def has_lora(self) -> bool:
        return bool(getattr(self.unet, "_hf_peft_config_loaded", False))

    def make_reference(self, mode: Literal["copy", "adapters"] = "copy") -> None:
        """Set up the reference: a frozen copy of the UNet as it is now, or (LoRA) adapters off."""
        if mode == "adapters":
            if not self.has_lora:
                raise ValueError("reference 'adapters' needs LoRA adapters (call add_lora first); use 'copy'")
            self.reference_unet = None
        elif mode == "copy":
            self.reference_unet = copy.deepcopy(self.unet).requires_grad_(False).eval()
        else:
            raise ValueError(f"unknown reference mode '{mode}' (choose copy or adapters)")

    @property
    def has_reference(self) -> bool:
        """Whether reference forwards can run: a frozen copy, or adapters to disable."""
        return self.reference_unet is not None or self.has_lora

    def require_reference(self) -> None:
        if not self.has_reference:
            raise ValueError("no reference model: call make_reference('copy') or add LoRA adapters")

    @contextlib.contextmanager
    def _reference(self) -> Iterator[torch.nn.Module]:
        if self.reference_unet is not None:
            yield self.reference_unet
            return
        self.require_reference()
        self.unet.disable_adapters()
        try:
            yield self.unet
        finally:
            self.unet.enable_adapters()

    def frozen_copy(self) -> DiffusionPolicy:
        """A lagged or old policy: its own frozen copy of the UNet as it is now, everything else shared.

        The copy holds a deep copy of ``self.unet`` (``requires_grad`` off, eval mode; LoRA
        layers and their scale copied with it, so its outputs are the live model's effective
        weights) and shares the VAE, text encoders, tokenizers and noise schedule with ``self``
        (``.to()`` on the copy therefore moves those too: move ``copy.unet`` alone to change only
        its device or dtype). It has no reference UNet and no ``train_unet``: its forwards, and
        sampling through it, never run the live or the trained (DDP/accelerate-wrapped) module.
        Re-sync it with :meth:`load_unet_from`. Diffusion-DRO samples its negatives from such a
        copy synced every optimizer step; PrefPaint's PPO samples from one synced every 15
        iterations.
        """
        unet = copy.deepcopy(self.unet).requires_grad_(False).eval()
        # accelerate's mixed precision replaces `forward` on the instance; an override that deepcopy
        # cannot rebind (a closure over the live module's method) would run the live UNet
        for name in ("forward", "_original_forward"):
            vars(unet).pop(name, None)
        return DiffusionPolicy(
            unet=unet,
            scheduler=self.scheduler,
            vae=self.vae,
            text_encoders=list(self.text_encoders),
            tokenizers=list(self.tokenizers),
            force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt,
        )

    @torch.no_grad()
    def load_unet_from(self, live: DiffusionPolicy) -> None:
        """Copy ``live.unet``'s weights (LoRA factors included) into this policy's UNet, in place.

        One tensor copy per weight, no allocation; the dtype and device of this UNet are kept
        (a bfloat16 copy of a float32 live UNet gets the weights rounded). ``live.unet`` is the
        module inside any DDP wrapper, so its state dict is the whole model on every process
        (FSDP shards it: not supported).

        Raises:
            ValueError: ``live`` is this policy.
            RuntimeError: the UNets differ in structure (another model, LoRA on one side only).
        """
        if live.unet is self.unet:
            raise ValueError("load_unet_from: the source is this policy's own UNet")
        self.unet.load_state_dict(live.unet.state_dict())

    def enable_gradient_checkpointing(self) -> None:
        self.unet.enable_gradient_checkpointing()

    def set_attention_backend(self, backend: Literal["sdpa", "xformers", "classic"] = "sdpa") -> None:
        """Select the attention implementation of every attention layer of the UNet(s).

        ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (memory-efficient and flash
        kernels where the device has them); ``xformers``: xformers' memory-efficient attention;
        ``classic``: the explicit softmax(QK^T)V (a baseline for benchmarks). SD/SDXL UNets take
        processors, not diffusers' ``set_attention_backend`` (which does nothing for them).
        """
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

        ok, why = attention_backend_available(backend)
        if not ok:
            raise RuntimeError(f"attention backend '{backend}' unavailable: {why}")
        for unet in (self.unet, self.reference_unet):
            if unet is None:
                continue
            if backend == "xformers":
                unet.enable_xformers_memory_efficient_attention()
            else:
                unet.set_attn_processor(AttnProcessor2_0() if backend == "sdpa" else AttnProcessor())

    def attention_processors(self) -> dict[str, int]:
        """How many attention layers use each processor class (to check what is active)."""
        return dict(Counter(type(p).__name__ for p in self.unet.attn_processors.values()))

    # -- conditioning ----------------------------------------------------------------------

    def encode_prompts(
        self,
        prompts: list[str],
        *,
        dropout: float = 0.0,
        generator: Generators = None,
        image_size: tuple[int, int] | None = None,
        grad: bool = False,
    ) -> Conditioning:
        """Text conditioning; each prompt becomes "" with probability ``dropout`` (caption dropout).
        ``grad=True`` keeps the graph through the text encoders, to train them.

        SDXL: hidden states of both encoders' penultimate layers concatenated, the second encoder's
        pooled projection, and time ids (original size, crop (0, 0), target size) for ``image_size``.
        """
        if not self.text_encoders:
            raise ValueError("this pipeline has no text encoder to encode prompts with")
        prompts = drop_captions(prompts, dropout, generator)
        device = self.device
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders, strict=True):
            ids = tokenizer(
                prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                return_tensors="pt",
            )  # fmt: skip
            mask = (
                ids.attention_mask.to(device)
                if getattr(encoder.config, "use_attention_mask", False)
                else None
            )
            with torch.set_grad_enabled(grad):
                if self.is_sdxl:
                    out = encoder(ids.input_ids.to(device), output_hidden_states=True)
                    pooled = out[0]
                    hidden.append(out.hidden_states[-2])
                else:
                    hidden.append(encoder(ids.input_ids.to(device), attention_mask=mask)[0])
        states = torch.cat(hidden, dim=-1).to(self.dtype)
        if not self.is_sdxl:
            return Conditioning(states)
        return Conditioning(
            states,
            {"text_embeds": pooled.to(self.dtype), "time_ids": self._time_ids(len(prompts), image_size)},
        )

    def _time_ids(self, n: int, image_size: tuple[int, int] | None) -> Tensor:
        if image_size is None:
            side = self.unet.config.sample_size * self.vae_scale_factor
            image_size = (side, side)
        h, w = image_size
        return torch.tensor([[h, w, 0, 0, h, w]], dtype=self.dtype, device=self.device).repeat(n, 1)

    def unconditional(self, n: int, image_size: tuple[int, int] | None = None) -> Conditioning:
        """The negative conditioning for classifier-free guidance (as diffusers' pipelines build it)."""
        cond = self.encode_prompts([""] * n, image_size=image_size)
        if self.force_zeros_for_empty_prompt:  # SDXL: zeros, not the encoded empty prompt
            zeros = Conditioning(torch.zeros_like(cond.encoder_hidden_states))
            zeros.added_cond_kwargs = {
                "text_embeds": torch.zeros_like(cond.added_cond_kwargs["text_embeds"]),
                "time_ids": cond.added_cond_kwargs["time_ids"],
            }
            return zeros
        return cond

    # -- images and latents ----------------------------------------------------------------

    def encode_images(self, images: Tensor, generator: Generators = None, sample: bool = True) -> Tensor:
        """Images in [0, 1] (N, 3, H, W) to scaled latents; ``sample=False`` takes the posterior mode.
        ``generator``: of the posterior sample (one, one per image, or None)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
        x = images.to(self.device, self.vae.dtype if self.vae is not None else self.dtype) * 2 - 1
        if self.vae is None:
            return x
        dist = self.vae.encode(x).latent_dist
        latents = dist.sample(generator) if sample else dist.mode()
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * self.vae.config.scaling_factor).to(self.dtype)

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Scaled latents to images in [0, 1]."""
        if self.vae is None:
            return (latents / 2 + 0.5).clamp(0, 1)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        z = latents.to(self.vae.dtype) / self.vae.config.scaling_factor + shift
        return (self.vae.decode(z, return_dict=False)[0] / 2 + 0.5).clamp(0, 1)

    def prepare_inpaint(self, images: Tensor, masks: Tensor, generator: Generators = None) -> InpaintInputs:
        """Mask and masked-image latents for an inpainting UNet, as diffusers' inpaint pipeline makes
        them: mask binarised at 0.5 and resized (nearest) to latent size; the masked image keeps
        the pixels where the mask is 0, is grey elsewhere (:func:`~diffalign.images.masked_for_inpainting`)
        and is encoded with a posterior sample from ``generator``."""
        if not self.is_inpainting:
            raise ValueError(
                f"this UNet has {self.unet.config.in_channels} input channels; inpainting needs "
                f"{2 * self.latent_channels + 1} (latents, mask, masked-image latents)"
            )
        if masks.dim() != 4 or masks.shape[1] != 1 or masks.shape[-2:] != images.shape[-2:]:
            raise ValueError(
                f"masks must be (N, 1, H, W) matching images {tuple(images.shape)}, got {tuple(masks.shape)}"
            )
        binary = (masks.to(self.device) >= 0.5).to(self.dtype)
        masked = masked_for_inpainting(images.to(self.device, self.dtype), binary)
        masked_latents = self.encode_images(masked, generator=generator)
        h, w = images.shape[-2] // self.vae_scale_factor, images.shape[-1] // self.vae_scale_factor
        mask_latents = torch.nn.functional.interpolate(binary, size=(h, w))
        return InpaintInputs(mask_latents, masked_latents)

    # -- the UNet --------------------------------------------------------------------------

    def unet_forward(
        self,
        latents: Tensor,
        timesteps: Tensor,
        cond: Conditioning,
        inpaint: InpaintInputs | None = None,
        reference: bool = False,
    ) -> Tensor:
        """One UNet call (policy, or reference under no-grad) on a batch; returns the raw prediction."""
        x = latents
        if inpaint is not None:
            x = torch.cat(
                [latents, inpaint.mask.to(latents.dtype), inpaint.masked_image_latents.to(latents.dtype)], 1
            )
        if x.shape[1] != self.unet.config.in_channels:
            extra = " (pass `inpaint` inputs)" if self.is_inpainting and inpaint is None else ""
            raise ValueError(
                f"UNet expects {self.unet.config.in_channels} input channels, got {x.shape[1]}{extra}"
            )
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(x.shape[0])
        kwargs = {"encoder_hidden_states": cond.encoder_hidden_states, "return_dict": False}
        if cond.added_cond_kwargs is not None:
            kwargs["added_cond_kwargs"] = cond.added_cond_kwargs
        if not reference:
            return (self.train_unet or self.unet)(x, timesteps, **kwargs)[0]
        with torch.no_grad(), self._reference() as ref:
            dtype = next(ref.parameters()).dtype  # a frozen copy may run in the mixed-precision dtype
            cast = Conditioning(kwargs["encoder_hidden_states"], kwargs.get("added_cond_kwargs")).map(
                lambda t: t.to(dtype) if t.is_floating_point() else t
            )
            kwargs["encoder_hidden_states"] = cast.encoder_hidden_states
            if cast.added_cond_kwargs is not None:
                kwargs["added_cond_kwargs"] = cast.added_cond_kwargs
            return ref(x.to(dtype), timesteps, **kwargs)[0]

    def guided_prediction(
        self,
        latents: Tensor,
        t: Tensor,
        cond: Conditioning,
        uncond: Conditioning | None,
        guidance_scale: float,
        inpaint: InpaintInputs | None = None,
        reference: bool = False,
    ) -> Tensor:
        """Classifier-free guidance: ``u + g (c - u)`` from one batched forward over [uncond; cond].
        ``t``: a scalar or one timestep per row of ``latents``; ``reference``: the reference UNet's
        (no grad), as :meth:`unet_forward`."""
        if guidance_scale <= 1.0 or uncond is None:
            return self.unet_forward(latents, t, cond, inpaint, reference)
        both = Conditioning.cat([uncond, cond])
        both_inpaint = inpaint.repeat(2) if inpaint is not None else None
        both_t = t.repeat(2) if t.dim() == 1 else t
        pred_uncond, pred_cond = self.unet_forward(
            torch.cat([latents] * 2), both_t, both, both_inpaint, reference
        ).chunk(2)
        return pred_uncond + guidance_scale * (pred_cond - pred_uncond)
