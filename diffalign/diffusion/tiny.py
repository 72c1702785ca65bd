"""Tiny Stable-Diffusion-shaped pipelines built from configs, for tests, benchmarks and demos.

Nothing is downloaded: the UNet, VAE and CLIP text encoders are initialised from small
configs, the tokenizer is a character-level CLIP tokenizer built from a vocabulary made here,
and the result is saved in diffusers format so that it loads through the same
``DiffusionPolicy.from_pretrained`` (and ``StableDiffusionPipeline.from_pretrained``) that a real
SD1.5 or SDXL folder goes through.

Also here: ``SD15_UNET_CONFIG``, the UNet config of Stable Diffusion 1.5, for benchmarks that
want an SD1.5-sized UNet with random weights.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Literal

import torch

__all__ = ["SD15_UNET_CONFIG", "build_tiny_pipeline", "tiny_text_encoder", "tiny_tokenizer"]

SD_DDIM_SCHEDULE = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}
"""Stable Diffusion's DDIM scheduler config (its ``scheduler_config.json``), that of every tiny pipeline."""

SD15_UNET_CONFIG = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}


def tiny_tokenizer(max_length: int = 16):
    """A character-level CLIP tokenizer (lower-case letters, digits, punctuation)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits + ".,!?'-":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def tiny_text_encoder(
    hidden: int, projection: bool, vocab_size: int, max_length: int, seed: int
) -> torch.nn.Module:
    """A 2-layer CLIP text encoder of width ``hidden`` initialised from ``seed`` (with SDXL's
    projection head when ``projection``), for :func:`tiny_tokenizer`'s vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=max_length,
        projection_dim=hidden,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def build_tiny_pipeline(
    path: str | Path,
    kind: Literal["sd", "sdxl", "inpaint"] = "sd",
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon",
    sample_size: int = 16,
    seed: int = 0,
    unet_config: dict | None = None,
    scheduler_options: dict | None = None,
) -> Path:
    """Save a tiny pipeline of the given kind under ``path`` and return the path.

    ``sd``: SD1.x/2.x layout (one CLIP text encoder); ``sdxl``: two text encoders, pooled
    embeddings and added time ids; ``inpaint``: SD layout with a 9-channel UNet.
    ``unet_config`` (``kind="sd"`` only) replaces the tiny UNet, e.g. by ``SD15_UNET_CONFIG`` for
    an SD1.5-sized UNet; the text encoder then gets its ``cross_attention_dim``.
    ``scheduler_options`` override the DDIM scheduler's config (e.g. a zero-terminal-SNR schedule:
    ``{"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}``).
    Latents are ``sample_size`` wide; the two-level VAE makes images twice that (32 px by default).
    """
    from diffusers import (
        DDIMScheduler,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    if unet_config is not None and kind != "sd":
        raise ValueError("unet_config is only supported for kind='sd'")
    max_length = 16
    tokenizer = tiny_tokenizer(max_length)
    torch.manual_seed(seed)
    vae = _tiny_vae(sample_size)
    scheduler = DDIMScheduler(
        **{**SD_DDIM_SCHEDULE, "prediction_type": prediction_type, **(scheduler_options or {})}
    )
    unet_kwargs = dict(unet_config) if unet_config is not None else _tiny_unet_kwargs(kind, sample_size)
    # SDXL: two 16-d encoders whose hidden states are concatenated to the UNet's 32
    width = 16 if kind == "sdxl" else unet_kwargs["cross_attention_dim"]
    encoders = [
        tiny_text_encoder(width, i == 1, len(tokenizer), max_length, seed + 1 + i)
        for i in range(2 if kind == "sdxl" else 1)
    ]
    torch.manual_seed(seed + 3)
    unet = UNet2DConditionModel(**unet_kwargs)
    parts = dict(vae=vae, text_encoder=encoders[0], tokenizer=tokenizer, unet=unet, scheduler=scheduler)
    if kind == "sdxl":
        pipe = StableDiffusionXLPipeline(
            **parts, text_encoder_2=encoders[1], tokenizer_2=tiny_tokenizer(max_length)
        )
    else:
        cls = StableDiffusionInpaintPipeline if kind == "inpaint" else StableDiffusionPipeline
        pipe = cls(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)
    return Path(path)


def _tiny_vae(sample_size: int) -> torch.nn.Module:
    """A two-level KL VAE with 4 latent channels: images are twice ``sample_size`` wide."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=2 * sample_size,
    )


def _tiny_unet_kwargs(kind: str, sample_size: int) -> dict:
    """The tiny UNet's config: 9 input channels for inpainting, SDXL's added conditions for sdxl."""
    kwargs = {
        "sample_size": sample_size,
        "in_channels": 9 if kind == "inpaint" else 4,
        "out_channels": 4,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "attention_head_dim": 8,
        "cross_attention_dim": 32,
    }
    if kind == "sdxl":
        kwargs.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=16 + 6 * 8,  # pooled text (16) + 6 time ids x 8
            transformer_layers_per_block=1,
        )
    return kwargs
