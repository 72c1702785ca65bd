"""Pretraining the demo's base model, and the classifier that measures prompt fidelity.

The base model is a pixel-space text-to-image pipeline in diffusers format (no VAE): a
~1.7M-parameter ``UNet2DConditionModel`` (attention at 8x8 and 4x4), a 2-layer CLIP text encoder
with a locally built character tokenizer, and a cosine-schedule DDPM scheduler predicting v (as
SD2). UNet and text encoder train together on the world for ``steps`` steps (10% of prompts
dropped for classifier-free guidance, EMA weights saved) and are cached, keyed on everything that
defines them, so later runs load the pipeline through ``DiffusionPolicy.from_pretrained`` like
SD1.5.

The inpainting base (``PretrainConfig(inpainting=True)``) is the same model with 7 UNet input
channels, as diffusers' ``StableDiffusionInpaintPipeline`` expects them: the noisy image, the mask
(1 = repaint) and the masked image (grey in the hole), built by ``DiffusionPolicy.prepare_inpaint``
exactly as ``sample_with_trajectory`` builds them. It trains on ``World.inpainting`` examples with
the loss on the whole image, in the same loop as the text-to-image base.

Why these choices (measured at 400 steps): with a frozen random encoder the 12 prompts' hidden
states were 0.81 cosine-similar on average and samples hardly followed them; epsilon-prediction
samples kept visible noise and x0-prediction samples collapsed to one blurred mean per prompt,
while v-prediction samples were clean and varied.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from diffalign.demo.world import SIZE, World, class_of, fingerprint, prompts
from diffalign.diffusion.likelihood import denoising_target
from diffalign.diffusion.policy import Conditioning, DiffusionPolicy

__all__ = [
    "FidelityClassifier",
    "PretrainConfig",
    "base_folder",
    "cache_dir",
    "pretrained_base",
    "trained_classifier",
]


@dataclass
class PretrainConfig:
    steps: int = 800
    batch_size: int = 32
    lr: float = 2e-3
    cond_dropout: float = 0.1
    ema_decay: float = 0.995
    seed: int = 0
    inpainting: bool = False  # the inpainting base (7 input channels) instead of text-to-image

    def key(self) -> str:
        spec = asdict(self)
        if not self.inpainting:  # keys from before the option existed: cached bases stay valid
            del spec["inpainting"]
        return hashlib.sha256(
            json.dumps({**spec, "world": fingerprint(), "version": 2}, sort_keys=True).encode()
        ).hexdigest()[:12]


def cache_dir() -> Path:
    return Path(os.environ.get("DIFFALIGN_CACHE", Path.home() / ".cache" / "diffalign")) / "demo"


def _build_pipeline(seed: int, inpainting: bool = False):  # type: ignore[no-untyped-def]
    """The untrained pipeline: text-to-image, or inpainting (UNet input: 3 noisy-image channels,
    1 mask channel, 3 masked-image channels)."""
    from diffusers import (
        DDPMScheduler,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )

    from diffalign.diffusion.tiny import tiny_text_encoder, tiny_tokenizer

    tokenizer = tiny_tokenizer(16)
    encoder = tiny_text_encoder(32, False, len(tokenizer), 16, seed + 1)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=SIZE,
        in_channels=7 if inpainting else 3,
        out_channels=3,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=8,
        cross_attention_dim=32,
    )
    scheduler = DDPMScheduler(
        beta_schedule="squaredcos_cap_v2", clip_sample=True, prediction_type="v_prediction", steps_offset=1
    )
    pipeline = StableDiffusionInpaintPipeline if inpainting else StableDiffusionPipeline
    with warnings.catch_warnings():
        # diffusers warns that clip_sample is set: right for latents, but this model works in pixel
        # space, where clipping the predicted image to [-1, 1] is what we want
        warnings.simplefilter("ignore", FutureWarning)
        return pipeline(
            vae=None, text_encoder=encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip


def base_folder(cfg: PretrainConfig) -> Path:
    """Where the base pipeline pretrained with ``cfg`` is cached."""
    return cache_dir() / f"base-{cfg.key()}"


def pretrained_base(cfg: PretrainConfig, progress: bool = True) -> Path:
    """The cached base pipeline for ``cfg`` (text-to-image, or inpainting with
    ``cfg.inpainting``), trained first if it is not cached yet."""
    folder = base_folder(cfg)
    if (folder / "model_index.json").is_file():
        return folder
    pipe = _build_pipeline(cfg.seed, cfg.inpainting)
    _pretrain(pipe, cfg, _inpainting_batch if cfg.inpainting else _text_to_image_batch, progress)
    publish(folder, pipe.save_pretrained)
    return folder


def publish(target: Path, write: Callable[[Path], None]) -> None:
    """``write(path)`` into a temporary path of this process's own beside ``target``, then renamed
    to ``target``: a cached file or folder is complete or absent, and demos run at once (several
    seeds) never write into one another's. When another process published ``target`` first, its
    copy (the same model: the cache key names every setting) is kept and ours dropped."""
    import shutil
    import tempfile

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f"{target.name}.tmp-"))
    path = tmp / target.name
    try:
        write(path)
        if target.exists() and path.is_dir():
            return  # published meanwhile by another process
        path.replace(target)  # a file replaces atomically; a folder lands only where none is
    except OSError:
        if not target.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# a training batch: images (N, 3, 16, 16) in [0, 1], their prompts, and the masks (N, 1, 16, 16)
# of an inpainting batch (1 = repaint) or None
Batch = tuple[Tensor, list[str], Tensor | None]


def _text_to_image_batch(world: World, n: int, generator: torch.Generator) -> Batch:
    images, chosen = world.dataset(n, generator)
    return images, chosen, None


def _inpainting_batch(world: World, n: int, generator: torch.Generator) -> Batch:
    examples = world.inpainting(n, generator)
    return examples.images, examples.prompts, examples.masks


def _pretrain(  # type: ignore[no-untyped-def]
    pipe, cfg: PretrainConfig, draw: Callable[[World, int, torch.Generator], Batch], progress: bool
) -> None:
    """Train the pipeline's UNet and text encoder in place on batches from ``draw``, then load
    their EMA weights. An inpainting batch's UNet input gets the mask and masked-image channels
    from ``policy.prepare_inpaint``, as sampling builds them; the loss covers the whole image."""
    unet, encoder, tokenizer, scheduler = pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler
    policy = DiffusionPolicy(unet=unet, scheduler=scheduler, text_encoders=[encoder], tokenizers=[tokenizer])
    all_prompts = [*prompts(), ""]
    params = [*unet.parameters(), *encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.steps)
    ema = [p.detach().clone() for p in params]
    world, g = World(cfg.seed), torch.Generator().manual_seed(cfg.seed)
    empty = len(all_prompts) - 1
    kind = "inpainting" if cfg.inpainting else "text-to-image"
    for _ in tqdm(range(cfg.steps), desc=f"pretraining the demo's {kind} base", disable=not progress):
        images, chosen, masks = draw(world, cfg.batch_size, g)
        cls = torch.tensor([class_of(p) for p in chosen])
        cls = torch.where(torch.rand(cfg.batch_size, generator=g) < cfg.cond_dropout, empty, cls)
        x0 = images * 2 - 1
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.batch_size,), generator=g)
        inpaint = None if masks is None else policy.prepare_inpaint(images, masks)
        # the 13 conditionings as the loaded policy will compute them; the encoder trains with the UNet
        table = policy.encode_prompts(all_prompts, grad=True).encoder_hidden_states
        pred = policy.unet_forward(scheduler.add_noise(x0, noise, t), t, Conditioning(table[cls]), inpaint)
        loss = F.mse_loss(pred, denoising_target(policy, x0, noise, t))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            for e, p in zip(ema, params, strict=True):
                e.lerp_(p, 1 - cfg.ema_decay)
    with torch.no_grad():
        for e, p in zip(ema, params, strict=True):
            p.copy_(e)


class FidelityClassifier(torch.nn.Module):
    """A small CNN that names an image's (colour, shape) class among the world's 12."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(32, 64, 3, padding=1, stride=2), torch.nn.ReLU(),
            torch.nn.Conv2d(64, 64, 3, padding=1, stride=2), torch.nn.ReLU(),
            torch.nn.Flatten(), torch.nn.Linear(64 * (SIZE // 4) ** 2, 128), torch.nn.ReLU(),
            torch.nn.Linear(128, len(prompts())),
        )  # fmt: skip

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images * 2 - 1)

    def accuracy(self, images: torch.Tensor, prompt_list: list[str]) -> float:
        with torch.no_grad():
            predicted = self(images).argmax(-1)
        return float((predicted == torch.tensor([class_of(p) for p in prompt_list])).float().mean())


def trained_classifier(
    seed: int = 0, steps: int = 800, progress: bool = True
) -> tuple[FidelityClassifier, float]:
    """The cached fidelity classifier and its accuracy on 2000 held-out real images."""
    from safetensors.torch import load_file, save_file

    path = cache_dir() / f"classifier-{fingerprint()}-{seed}-{steps}.safetensors"
    model = FidelityClassifier()
    world = World(seed)
    held_out, held_prompts = world.dataset(2000, torch.Generator().manual_seed(seed + 10_000))
    if path.is_file():
        model.load_state_dict(load_file(str(path)))
        return model.eval(), model.eval().accuracy(held_out, held_prompts)
    g = torch.Generator().manual_seed(seed + 1)
    torch.manual_seed(seed)
    model = FidelityClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in tqdm(range(steps), desc="training the fidelity classifier", disable=not progress):
        images, chosen = world.dataset(128, g)
        loss = F.cross_entropy(model(images), torch.tensor([class_of(p) for p in chosen]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    publish(path, lambda tmp: save_file(model.state_dict(), str(tmp)))
    return model, model.accuracy(held_out, held_prompts)
