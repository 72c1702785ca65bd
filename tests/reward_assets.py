"""Tiny random-init versions of every reward architecture, saved the way users store weights.

The CLIP image towers keep the real input size (224) so that preprocessing takes the same
resize and crop geometry as the full-size models; their transformers are one narrow layer.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_OPEN_CLIP = "diffalign-tiny-clip"  # GELU, as LAION's open_clip models
TINY_OPENAI_CLIP = "diffalign-tiny-clip-quickgelu"  # QuickGELU, as OpenAI's CLIP
IMAGE_SIZE, PATCH = 224, 32


def open_clip_config(quick_gelu: bool) -> dict:
    return {
        "embed_dim": 16,
        "quick_gelu": quick_gelu,
        "vision_cfg": {
            "image_size": IMAGE_SIZE,
            "layers": 1,
            "width": 32,
            "head_width": 16,
            "patch_size": PATCH,
        },
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }


def build_reward_assets(root: Path) -> dict[str, Path]:
    import open_clip
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from diffalign.diffusion.tiny import tiny_tokenizer
    from diffalign_rewards.clip_rewards import AestheticMLP

    torch.manual_seed(0)
    clip_dir = root / "clip"
    config = CLIPConfig(
        text_config={
            "vocab_size": 86, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 77, "bos_token_id": 0, "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={
            "image_size": IMAGE_SIZE, "patch_size": PATCH, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": 2,
        },
        projection_dim=16,
    )  # fmt: skip
    CLIPModel(config).save_pretrained(clip_dir)
    tiny_tokenizer(77).save_pretrained(clip_dir)
    CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    ).save_pretrained(clip_dir)

    save_file(AestheticMLP(16).state_dict(), str(root / "aesthetic_mlp.safetensors"))

    config_dir = root / "open_clip_configs"
    config_dir.mkdir()
    for name, quick_gelu in ((TINY_OPEN_CLIP, False), (TINY_OPENAI_CLIP, True)):
        (config_dir / f"{name}.json").write_text(json.dumps(open_clip_config(quick_gelu)))
    open_clip.add_model_config(config_dir)
    paths = {}
    for name, key in ((TINY_OPEN_CLIP, "open_clip"), (TINY_OPENAI_CLIP, "openai_clip")):
        model = open_clip.create_model(name, pretrained=None)
        paths[key] = root / f"{key}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(paths[key]))
    return {"clip": clip_dir, "aesthetic_head": root / "aesthetic_mlp.safetensors", **paths}
