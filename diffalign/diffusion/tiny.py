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

__all__ = ["SD15_UNET_CONFIG", "build_tiny_pipeline", "tiny_tokenizer"]

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


def _text_encoder(hidden: int, projection: bool, vocab_size: int, max_length: int, seed: int):
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
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    path = Path(path)
    max_length = 16
    tokenizer = tiny_tokenizer(max_length)
    vocab = len(tokenizer)
    torch.manual_seed(seed)
    vae = AutoencoderKL(
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
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
        **(scheduler_options or {}),
    )
    unet_kwargs = {
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
        encoder_1 = _text_encoder(16, False, vocab, max_length, seed + 1)
        encoder_2 = _text_encoder(16, True, vocab, max_length, seed + 2)
        unet_kwargs.update(
            cross_attention_dim=32,  # 16 + 16: the two encoders' hidden states are concatenated
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=16 + 6 * 8,
            transformer_layers_per_block=1,
        )
        torch.manual_seed(seed + 3)
        unet = UNet2DConditionModel(**unet_kwargs)
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=encoder_1,
            text_encoder_2=encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tiny_tokenizer(max_length),
            unet=unet,
            scheduler=scheduler,
        )
    else:
        if unet_config is not None:
            if kind != "sd":
                raise ValueError("unet_config is only supported for kind='sd'")
            unet_kwargs = dict(unet_config)
        encoder = _text_encoder(unet_kwargs["cross_attention_dim"], False, vocab, max_length, seed + 1)
        torch.manual_seed(seed + 3)
        unet = UNet2DConditionModel(**unet_kwargs)
        cls = StableDiffusionInpaintPipeline if kind == "inpaint" else StableDiffusionPipeline
        pipe = cls(
            vae=vae,
            text_encoder=encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.save_pretrained(path)
    return path
