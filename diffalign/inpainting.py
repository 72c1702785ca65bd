"""The Python API for aligning an inpainting model: load, fit, inpaint, save.

``InpaintingAligner`` wraps the PrefPaint recipe (:mod:`diffalign.methods.prefpaint`) and the
training loop for a notebook or a script::

    aligner = InpaintingAligner.from_pretrained("sd-inpainting", reward_path="prefpaint-reward")
    aligner.fit("examples.jsonl", steps=200)            # or [(image, mask, prompt), ...]
    [result] = aligner.inpaint(image, mask, "a cat", seed=0)
    aligner.save_pretrained("aligned")                   # a diffusers inpainting pipeline folder

Each ``fit`` is one ordinary ``prefpaint`` run (its ``config.json``, ``metrics.jsonl`` and final
checkpoint in ``output_dir``) starting from the aligner's current weights, after which the
aligner holds the trained UNet (LoRA fused when LoRA was configured). ``inpaint`` samples with
DDIM at eta 0, as diffusers' ``StableDiffusionInpaintPipeline`` does with a DDIM scheduler and
the same seed, and by default pastes the input back outside the mask.

Images given to it are PIL images, numpy arrays (H, W, 3) of uint8 or of floats in [0, 1], or
tensors (3, H, W) / (1, 3, H, W) in [0, 1] (uint8 tensors are scaled by 1/255), or image paths;
masks (white / 1 = repaint) are PIL images of any mode (converted to L), numpy (H, W) / (H, W, 1),
tensors (H, W) / (1, H, W) / (1, 1, H, W), or paths, and must be binary (0 or 1 once 8-bit
values are scaled by 1/255).

Limits: one process (for several GPUs, run the ``config.json`` a fit writes with ``diffalign
train`` under accelerate); no EMA (the aligner keeps the trained weights themselves); image sides
must be multiples of :attr:`InpaintingAligner.size_multiple` (diffusers' UNet would also run
other multiples of the VAE's scale factor, through its ``upsample_size`` path); a saved pipeline
has no safety checker, and one without a VAE (the demo world's pixel-space model) loads through
``DiffusionPolicy`` and this class, while diffusers' pipeline loads it (``vae=None``) but cannot
run it.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from diffalign.config import build
from diffalign.data.inpainting import write_inpainting_examples
from diffalign.data.preference import load_image
from diffalign.diffusion.policy import DiffusionPolicy
from diffalign.diffusion.sampling import sample_with_trajectory
from diffalign.images import from_pil, paste_unmasked, to_pil
from diffalign.methods.policy_gradient import micro_batches_per_rollout, stochastic_steps
from diffalign.methods.prefpaint import PrefPaint, PrefPaintOptions
from diffalign.training.config import TrainConfig
from diffalign.training.loop import Callback, TrainResult, run_training

__all__ = ["InpaintingAligner", "image_tensor", "mask_tensor"]

ImageInput = Image.Image | np.ndarray | Tensor | str | Path
Example = tuple | Mapping[str, Any]

# the reward argument that names its weights, for the rewards whose weights are one path
REWARD_PATH_ARGUMENT = {"prefpaint": "weights", "bradley_terry": "path"}
# the keys fit sets from its own arguments (or refuses), with what to do instead
FIT_OWNS = {
    "method": "the aligner trains with prefpaint",
    "max_steps": "pass steps=",
    "resume_from": "each fit is a fresh run in a fresh output_dir",
    "ema_decay": "the aligner keeps the trained weights, not an EMA of them",
    "model.pretrained": "the aligner's current weights are the starting point",
    "data.path": "pass the data as fit's first argument",
}


# -- inputs ------------------------------------------------------------------------------------


def image_tensor(image: ImageInput) -> Tensor:
    """An image as float (3, H, W) in [0, 1] (see the module docstring for what is accepted).

    Raises:
        ValueError: a wrong shape or channel count, a dtype that is neither uint8, bool nor
            float, or float values outside [0, 1].
    """
    if isinstance(image, (str, Path)):
        return load_image(Path(image), str(image))
    if isinstance(image, Image.Image):
        return from_pil(image)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(
                f"image: a numpy array must be (H, W, 3) RGB, got shape {image.shape}"
                + (f" ({image.shape[-1]} channels)" if image.ndim == 3 else "")
            )
        return _in_unit_range(_unit(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1), "image"))
    if not isinstance(image, Tensor):
        raise TypeError(
            f"image: expected a PIL image, numpy array, tensor or path, got {type(image).__name__}"
        )
    x = image.detach().cpu()
    x = x[0] if x.dim() == 4 and x.shape[0] == 1 else x
    if x.dim() != 3 or x.shape[0] != 3:
        raise ValueError(
            f"image: a tensor must be (3, H, W) or (1, 3, H, W) RGB, got shape {tuple(image.shape)}"
            + (f" ({x.shape[0]} channels)" if x.dim() == 3 else "")
        )
    return _in_unit_range(_unit(x, "image"))


def mask_tensor(mask: ImageInput) -> Tensor:
    """A mask as float (1, H, W) in {0, 1}, 1 = repaint (see the module docstring).

    Raises:
        ValueError: a wrong shape (a mask has one channel), or values other than 0 and 1 (after
            8-bit values are scaled by 1/255), with how many pixels.
    """
    if isinstance(mask, (str, Path)):
        m = load_image(Path(mask), str(mask), grey=True)
    elif isinstance(mask, Image.Image):
        m = from_pil(mask, grey=True)
    elif isinstance(mask, (np.ndarray, Tensor)):
        m = _unit(_one_channel(mask)[None], "mask")
    else:
        raise TypeError(f"mask: expected a PIL image, numpy array, tensor or path, got {type(mask).__name__}")
    bad = int(((m != 0) & (m != 1)).sum())
    if bad:
        raise ValueError(
            f"mask is not binary: {bad} of {m.numel()} pixels are neither 0 nor 1 (nor 0 / 255 in 8 "
            "bit); white / 1 = repaint. Threshold it first, e.g. mask >= 0.5 (or > 127 for 8-bit)"
        )
    return m


def _one_channel(mask: np.ndarray | Tensor) -> Tensor:
    """A numpy (H, W) / (H, W, 1) or tensor (H, W) / (1, H, W) / (1, 1, H, W) mask as (H, W)."""
    if isinstance(mask, np.ndarray):
        m, kind = torch.from_numpy(np.ascontiguousarray(mask)), "a numpy array (H, W) or (H, W, 1)"
        m = m[..., 0] if m.dim() == 3 and m.shape[-1] == 1 else m
    else:
        m, kind = mask.detach().cpu(), "a tensor (H, W), (1, H, W) or (1, 1, H, W)"
        while m.dim() > 2 and m.shape[0] == 1:
            m = m[0]
    if m.dim() != 2:
        raise ValueError(f"mask: one channel expected, {kind}; got shape {tuple(mask.shape)}")
    return m


def _unit(x: Tensor, what: str) -> Tensor:
    """uint8 scaled by 1/255, bool as 0/1, floats as float32; other dtypes refused."""
    if x.dtype == torch.uint8:
        return x.float() / 255
    if x.dtype == torch.bool or x.is_floating_point():
        return x.float()
    raise ValueError(f"{what}: expected uint8 (0-255), bool or float (0-1) values, got dtype {x.dtype}")


def _in_unit_range(x: Tensor) -> Tensor:
    lo, hi = float(x.min()), float(x.max())
    if not (lo >= 0 and hi <= 1):  # also refuses NaN
        hint = " (an 8-bit image as floats? divide it by 255)" if hi > 1 else ""
        raise ValueError(f"image values must lie in [0, 1], got {lo:.4g} to {hi:.4g}{hint}")
    return x


def _pair(image: ImageInput, mask: ImageInput) -> tuple[Tensor, Tensor]:
    """``image_tensor`` and ``mask_tensor``, checked to be the same size."""
    x, m = image_tensor(image), mask_tensor(mask)
    if x.shape[-2:] != m.shape[-2:]:
        raise ValueError(
            f"image and mask differ in size: the image is {x.shape[-1]}x{x.shape[-2]} (WxH), the mask "
            f"{m.shape[-1]}x{m.shape[-2]}"
        )
    return x, m


def _examples(examples: Sequence[Example]) -> tuple[Tensor, Tensor, list[str]]:
    """In-memory examples as images (N, 3, H, W), masks (N, 1, H, W) and prompts; each one
    ``(image, mask)``, ``(image, mask, prompt)`` or a dict of those keys, all of one size."""
    images, masks, prompts = [], [], []
    for i, example in enumerate(examples):
        if isinstance(example, Mapping) and {"image", "mask"} <= example.keys():
            parts = (example["image"], example["mask"], example.get("prompt", ""))
        elif isinstance(example, (tuple, list)) and len(example) in (2, 3):
            parts = (*example, "")[:3]
        else:
            raise ValueError(f"example {i}: expected (image, mask[, prompt]) or a dict with image and mask")
        try:
            image, mask = _pair(parts[0], parts[1])
        except ValueError as err:
            raise ValueError(f"example {i}: {err}") from err
        if not isinstance(parts[2], str):
            raise ValueError(f"example {i}: the prompt must be text, got {type(parts[2]).__name__}")
        if images and image.shape != images[0].shape:
            raise ValueError(
                f"example {i} is {image.shape[-1]}x{image.shape[-2]}, example 0 {images[0].shape[-1]}x"
                f"{images[0].shape[-2]}: in-memory examples share one size (a folder or JSONL may mix sizes)"
            )
        images.append(image)
        masks.append(mask)
        prompts.append(parts[2])
    if not images:
        raise ValueError("fit: no examples to train on")
    return torch.stack(images), torch.stack(masks), prompts


# -- configuration -----------------------------------------------------------------------------


def _reward_kwargs(reward: str, reward_path: str | Path | None, reward_kwargs: Mapping | None) -> dict:
    """``reward_kwargs`` with ``reward_path`` under the argument that names the reward's weights.

    Raises:
        ValueError: ``reward_path`` for a reward without such an argument, or given twice.
        FileNotFoundError: ``reward_path`` is a local path that does not exist (an ``owner/name``
            hub id is left to the reward, which says how to fetch it offline).
    """
    kwargs = dict(reward_kwargs or {})
    if reward_path is None:
        return kwargs
    key = REWARD_PATH_ARGUMENT.get(reward)
    if key is None:
        raise ValueError(
            f"reward_path names the weights of the {' and '.join(REWARD_PATH_ARGUMENT)} rewards; give "
            f"reward '{reward}' its files through reward_kwargs"
        )
    if key in kwargs:
        raise ValueError(f"reward_path and reward_kwargs['{key}'] both name the reward's weights: give one")
    path = Path(reward_path)
    hub_like = not path.is_absolute() and len(path.parts) == 2 and not str(reward_path).startswith((".", "~"))
    if not path.exists() and not hub_like:
        raise FileNotFoundError(
            f"reward_path: {reward_path} does not exist (the '{reward}' reward's weights)"
        )
    kwargs[key] = str(reward_path)
    return kwargs


def _merge(base: dict[str, Any], overrides: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``base`` with ``overrides`` merged in, section by section; keys in ``FIT_OWNS`` refused."""
    out = dict(base)
    for key, value in overrides.items():
        dotted = f"{prefix}{key}"
        if dotted in FIT_OWNS:
            raise ValueError(f"fit: '{dotted}' cannot be overridden: {FIT_OWNS[dotted]}")
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value, f"{dotted}.")
        else:
            out[key] = value
    return out


def _fresh_output_dir(output_dir: str | Path | None) -> Path:
    if output_dir is None:
        return Path(tempfile.mkdtemp(prefix="diffalign-inpainting-"))
    out = Path(output_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"output_dir: {out} is not an empty folder; each fit writes a new run")
    return out


# -- the aligner -------------------------------------------------------------------------------


class InpaintingAligner:
    """An inpainting pipeline's policy, aligned with PrefPaint by :meth:`fit`. Build it with
    :meth:`from_pretrained`."""

    def __init__(self, policy: DiffusionPolicy, base: str, options: dict[str, Any]) -> None:
        self._policy = policy
        self._base = base  # the pipeline whose non-UNet components this one shares
        self._source: str | None = base  # a pipeline folder (or hub id) holding the current weights
        self.options = options  # prefpaint's method_options (reward and reward_kwargs included)

    @classmethod
    def from_pretrained(
        cls,
        pipeline_path: str | Path,
        *,
        reward: str = "prefpaint",
        reward_path: str | Path | None = None,
        reward_kwargs: Mapping[str, Any] | None = None,
        **method_options: Any,
    ) -> InpaintingAligner:
        """Load an inpainting pipeline (a local diffusers folder, or a hub id when online) and set
        the reward and the PrefPaint options (:class:`PrefPaintOptions`: ``rollout_steps``,
        ``trust_weights``, ...) its fits train with.

        ``reward``: a registry name or ``module:Class``; ``reward_path``: the reward's weights
        (``weights=`` of ``prefpaint``, ``path=`` of ``bradley_terry``; other rewards take theirs in
        ``reward_kwargs``). The reward itself is built at the start of each :meth:`fit` (inpainting
        alone never needs it); a reward that cannot be built fails there, before any model loads.

        Raises:
            FileNotFoundError: the pipeline, or a local ``reward_path``, does not exist.
            ValueError: the pipeline is not an inpainting one (a text-to-image UNet of C input
                channels instead of 2C + 1), ``reward_path`` for a reward that takes no path, or
                unknown or invalid options (``ConfigError``).
        """
        options = {"reward": reward, "reward_kwargs": _reward_kwargs(reward, reward_path, reward_kwargs)}
        options.update(method_options)
        build(PrefPaintOptions, options, source="InpaintingAligner options")
        policy = DiffusionPolicy.from_pretrained(pipeline_path)
        if not policy.is_inpainting:
            raise ValueError(
                f"{pipeline_path} is a text-to-image pipeline: its UNet takes "
                f"{policy.unet.config.in_channels} input channels, an inpainting UNet "
                f"{2 * policy.latent_channels + 1} (latents, mask, masked-image latents); load an "
                "inpainting checkpoint"
            )
        policy.unet.requires_grad_(False).eval()
        local = Path(pipeline_path)
        return cls(policy, str(local.resolve()) if local.exists() else str(pipeline_path), options)

    @property
    def policy(self) -> DiffusionPolicy:
        """The current model (its UNet trained by the last fit)."""
        return self._policy

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE's scale factor x 2^(UNet down blocks - 1)."""
        return self._policy.vae_scale_factor * 2 ** (len(self._policy.unet.config.down_block_types) - 1)

    @property
    def native_size(self) -> int:
        """The side the UNet was configured for (``sample_size`` x the VAE's scale factor): 512 for
        SD inpainting, the default training resolution."""
        return self._policy.unet.config.sample_size * self._policy.vae_scale_factor

    def to(self, device: str | torch.device) -> InpaintingAligner:
        """Move the model (for :meth:`inpaint`; :meth:`fit` trains where accelerate places it)."""
        self._policy.to(device)
        return self

    # -- training ------------------------------------------------------------------------------

    def fit(
        self,
        data: str | Path | Sequence[Example],
        /,
        steps: int,
        *,
        output_dir: str | Path | None = None,
        callbacks: Sequence[Callback] = (),
        batch_size: int = 4,
        **config_overrides: Any,
    ) -> TrainResult:
        """Align the model with PrefPaint for ``steps`` optimiser steps, one per rollout of
        ``batch_size`` examples (``gradient_accumulation_steps`` is derived to that end), from the
        current weights: a second fit goes on from the first.

        ``data``: a folder, ``.jsonl`` or ``.parquet`` of inpainting examples
        (:mod:`diffalign.data.inpainting`), or in-memory ``(image, mask[, prompt])`` tuples or dicts
        of one size, written to ``output_dir/data``. ``output_dir``: a new or empty folder for the
        run (default: a fresh temporary folder). ``callbacks``: ``fn(step, metrics)`` at every log
        (every step by default). ``config_overrides``: :class:`TrainConfig` keys, sections as dicts
        merged into the defaults (``optim={"lr": 1e-5}``, ``model={"lora": {"rank": 8}}``,
        ``data={"resolution": 256}``: ``data`` is positional-only to leave that key free,
        ``method_options={...}`` for this fit alone, ``mixed_precision="bf16"``). Defaults: the
        recipe's, with ``data.resolution`` the UNet's native size, ``log_every`` 1, no trackers,
        one checkpoint kept (the final one, which the loop always writes).

        On success the aligner holds the trained UNet (LoRA fused) on the training device; a fit
        that fails leaves its weights as they were (on the CPU). Its model stays in memory on the
        CPU while the recipe trains its own copy.

        Raises:
            ValueError: bad examples (naming the example), a non-empty ``output_dir``, an override
                of what fit sets itself, or a config the recipe refuses (``ConfigError``); the
                recipe's errors for data and reward (naming the file, the row or the reward's path).
        """
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        examples = None if isinstance(data, (str, Path)) else _examples(data)
        out = _fresh_output_dir(output_dir)
        data_path = Path(data).resolve() if examples is None else out / "data"
        start = self._source or str(out / "initial_pipeline")
        cfg = self._config(data_path, start, steps, out, batch_size, config_overrides)
        if examples is not None:
            write_inpainting_examples(data_path, *examples)
        if self._source is None:
            self.save_pretrained(start)
        self._policy.to("cpu")  # off the training device while the recipe trains its own copy
        method = PrefPaint(cfg)
        result = run_training(method, callbacks)
        self._adopt(method)
        return result

    def _config(
        self, data: Path, start: str, steps: int, out: Path, batch_size: int, overrides: Mapping[str, Any]
    ) -> TrainConfig:
        """The prefpaint run's config: fit's settings, then ``overrides`` merged in."""
        overrides = dict(overrides)
        options = {**self.options, **overrides.pop("method_options", {})}
        checked = build(PrefPaintOptions, options, source="method_options")
        trained = stochastic_steps(self._policy, checked.rollout_steps, checked.eta, checked.train_window)
        settings = {
            "method": "prefpaint", "model": {"pretrained": start},
            "data": {"path": str(data), "resolution": self.native_size}, "output_dir": str(out),
            "method_options": options, "max_steps": steps, "batch_size": batch_size,
            "gradient_accumulation_steps": micro_batches_per_rollout(checked, batch_size, len(trained)),
            "log_every": 1, "checkpoint_every": steps, "keep_checkpoints": 1, "report_to": [],
        }  # fmt: skip
        return build(TrainConfig, _merge(settings, overrides), source="InpaintingAligner.fit")

    def _adopt(self, method: PrefPaint) -> None:
        """Take the recipe's trained UNet: LoRA fused, accelerate's mixed-precision forward removed
        (as :meth:`DiffusionPolicy.frozen_copy` does), frozen for sampling."""
        unet = method.policy.unet
        if method.policy.has_lora:
            unet.fuse_lora()
            unet.unload_lora()
        for name in ("forward", "_original_forward"):
            vars(unet).pop(name, None)
        unet.requires_grad_(False).eval()
        # the aligner's own VAE and text encoders: in full precision whatever the run's mixed precision
        self._policy = dataclasses.replace(self._policy, unet=unet).to(next(unet.parameters()).device)
        self._source = None

    # -- inpainting ----------------------------------------------------------------------------

    @torch.no_grad()
    def inpaint(
        self,
        image: ImageInput,
        mask: ImageInput,
        prompt: str = "",
        *,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.0,
        seed: int | None = None,
        num_images: int = 1,
        keep_unmasked: bool = True,
    ) -> list[Image.Image]:
        """``num_images`` inpaintings of one image where ``mask`` is white / 1, as 8-bit RGB images
        of the input's size.

        DDIM with eta 0 on the pipeline's noise schedule, classifier-free guidance
        ``guidance_scale`` (<= 1: none), the noise drawn from a CPU generator seeded with ``seed``
        (None: torch's global one) in diffusers' order: with ``num_images=1`` the image is
        diffusers' ``StableDiffusionInpaintPipeline`` output with a DDIM scheduler and that seed
        (with more, each sample draws its own masked-image latents, where diffusers repeats one).
        ``keep_unmasked``: outside the mask the input's pixels, exactly (8-bit); else the model's
        raw output everywhere.

        Raises:
            ValueError: image and mask of different sizes, a non-binary mask, a size that is not
                a multiple of :attr:`size_multiple`, a wrong channel count or shape, image values
                outside [0, 1], ``num_images`` < 1, or a prompt that is not text.
        """
        x, m = self._checked(image, mask, prompt, num_images)
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        n, (h, w) = num_images, x.shape[-2:]
        trajectory = sample_with_trajectory(
            self._policy, [prompt] * n, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, sampler="ddim", eta=0.0, generator=generator, height=h, width=w,
            image=x.expand(n, -1, -1, -1), mask=m.expand(n, -1, -1, -1),
        )  # fmt: skip
        images = trajectory.images
        if keep_unmasked:
            images = paste_unmasked(images, x, m)
        return to_pil(images)

    def _checked(self, image: ImageInput, mask: ImageInput, prompt: str, n: int) -> tuple[Tensor, Tensor]:
        """Image (1, 3, H, W) and mask (1, 1, H, W) of a size the model takes."""
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be text, got {type(prompt).__name__}")
        if n < 1:
            raise ValueError(f"num_images must be >= 1, got {n}")
        x, m = _pair(image, mask)
        f, (h, w) = self.size_multiple, x.shape[-2:]
        if h % f or w % f:
            down = len(self._policy.unet.config.down_block_types)
            raise ValueError(
                f"image size {w}x{h} (WxH) is not a multiple of {f} (the VAE's scale factor "
                f"{self._policy.vae_scale_factor} x 2^({down} - 1) for the UNet's {down} down blocks): "
                f"resize or crop it, e.g. to {max(f, w // f * f)}x{max(f, h // f * f)}"
            )
        return x[None], m[None]

    # -- saving --------------------------------------------------------------------------------

    def save_pretrained(self, out: str | Path) -> Path:
        """Write a diffusers pipeline folder: the base pipeline's components (its class, scheduler,
        tokenizers, VAE and text encoders) with the current UNet, and no safety checker (as
        :class:`DiffusionPolicy` loads pipelines). ``StableDiffusionInpaintPipeline.from_pretrained``
        (for pipelines with a VAE), ``DiffusionPolicy.from_pretrained`` and :meth:`from_pretrained`
        load it. Returns ``out``."""
        from diffusers import DiffusionPipeline

        policy, out = self._policy, Path(out)
        parts: dict[str, Any] = {"unet": policy.unet, "vae": policy.vae, "safety_checker": None}
        for i, (encoder, tokenizer) in enumerate(zip(policy.text_encoders, policy.tokenizers, strict=True)):
            suffix = "_2" if i else ""
            parts[f"text_encoder{suffix}"], parts[f"tokenizer{suffix}"] = encoder, tokenizer
        pipeline = DiffusionPipeline.from_pretrained(self._base, **parts)  # loads only the small parts
        pipeline.save_pretrained(out)
        return out
