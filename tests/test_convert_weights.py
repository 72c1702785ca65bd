"""Released pickles convert to safetensors that the rewards load (read with weights_only=True)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from script_loader import load_script

from diffalign.rewards import load_reward
from diffalign_rewards.clip_rewards import AestheticMLP

convert = load_script("convert_reward_weights").convert


def test_aesthetic_checkpoint_round_trip(tmp_path: Path, reward_assets) -> None:
    mlp = AestheticMLP(16)
    torch.save(mlp.state_dict(), tmp_path / "aesthetic.pth")
    convert("aesthetic", tmp_path / "aesthetic.pth", tmp_path / "out")
    reward = load_reward("aesthetic", clip=reward_assets["clip"], head=tmp_path / "out")
    for name, value in mlp.state_dict().items():
        assert torch.equal(reward.mlp.state_dict()[name], value)


class NotATensor:
    pass


def test_pickles_with_code_are_refused(tmp_path: Path) -> None:
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"x": NotATensor()}, f)
    with pytest.raises(pickle.UnpicklingError):
        convert("aesthetic", tmp_path / "evil.pt", tmp_path / "out")
