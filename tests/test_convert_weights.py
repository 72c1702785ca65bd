"""Released pickles convert to safetensors that the rewards load (read with weights_only=True)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from script_loader import load_script

from diffalign.rewards import load_reward
from diffalign_rewards.clip_rewards import AestheticMLP
from diffalign_rewards.prefpaint import PrefPaintHead

convert = load_script("convert_reward_weights").convert


def test_aesthetic_checkpoint_round_trip(tmp_path: Path, reward_assets) -> None:
    mlp = AestheticMLP(16)
    torch.save(mlp.state_dict(), tmp_path / "aesthetic.pth")
    convert("aesthetic", tmp_path / "aesthetic.pth", tmp_path / "out")
    reward = load_reward("aesthetic", clip=reward_assets["clip"], head=tmp_path / "out")
    for name, value in mlp.state_dict().items():
        assert torch.equal(reward.mlp.state_dict()[name], value)


def test_prefpaint_official_keys_are_mapped(tmp_path: Path, reward_assets) -> None:
    head = PrefPaintHead(16, heads=4, ff_dim=32)
    official = {}
    for key, value in head.state_dict().items():
        key = (
            key.replace("block.", "vit_block.transformer_encoder.layers.0.", 1)
            if key.startswith("block.")
            else key
        )
        key = key.replace("mlp.", "mlp.layers.", 1) if key.startswith("mlp.") else key
        official["module." + key.replace("last_layer.", "mlp.last_layer.")] = value
    official["module.clip_model.visual.proj"] = torch.zeros(2)  # skipped: CLIP loads separately
    torch.save(official, tmp_path / "prefpaint.pt")
    convert("prefpaint", tmp_path / "prefpaint.pt", tmp_path / "out")
    reward = load_reward("prefpaint", clip=reward_assets["clip"], head=tmp_path / "out", heads=4, ff_dim=32)
    for name, value in head.state_dict().items():
        assert torch.equal(reward.head.state_dict()[name], value)


class NotATensor:
    pass


def test_pickles_with_code_are_refused(tmp_path: Path) -> None:
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"x": NotATensor()}, f)
    with pytest.raises(pickle.UnpicklingError):
        convert("aesthetic", tmp_path / "evil.pt", tmp_path / "out")
