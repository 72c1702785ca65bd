"""Tiny random-init versions of every reward architecture, saved the way users store weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_OPEN_CLIP = "diffalign-tiny-clip"


def build_reward_assets(root: Path) -> dict[str, Path]:
    import open_clip
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from diffalign.diffusion.tiny import tiny_tokenizer
    from diffalign_rewards.clip_rewards import AestheticMLP
    from diffalign_rewards.prefpaint import PrefPaintHead

    torch.manual_seed(0)
    clip_dir = root / "clip"
    config = CLIPConfig(
        text_config={
            "vocab_size": 86, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 77, "bos_token_id": 0, "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={
            "image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": 2,
        },
        projection_dim=16,
    )  # fmt: skip
    CLIPModel(config).save_pretrained(clip_dir)
    tiny_tokenizer(77).save_pretrained(clip_dir)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        clip_dir
    )

    save_file(AestheticMLP(16).state_dict(), str(root / "aesthetic_mlp.safetensors"))
    head = PrefPaintHead(16, heads=4, ff_dim=32)
    save_file(head.state_dict(), str(root / "prefpaint_head.safetensors"))

    open_clip_config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    config_dir = root / "open_clip_configs"
    config_dir.mkdir()
    (config_dir / f"{TINY_OPEN_CLIP}.json").write_text(json.dumps(open_clip_config))
    open_clip.add_model_config(config_dir)
    model = open_clip.create_model(TINY_OPEN_CLIP, pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "open_clip.safetensors"))
    return {
        "clip": clip_dir,
        "aesthetic_head": root / "aesthetic_mlp.safetensors",
        "prefpaint_head": root / "prefpaint_head.safetensors",
        "open_clip": root / "open_clip.safetensors",
    }
