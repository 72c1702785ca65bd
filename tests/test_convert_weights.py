"""Released pickles convert to safetensors that the rewards load (read with weights_only=True)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from script_loader import load_script

from diffalign.rewards import load_reward
from diffalign_rewards._weights import WeightsError
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
    with pytest.raises(WeightsError, match=r"evil\.pt: not a weights-only checkpoint.*never runs the code"):
        convert("aesthetic", tmp_path / "evil.pt", tmp_path / "out")
    assert not (tmp_path / "out" / "aesthetic_mlp.safetensors").exists()


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", r"empty\.pt: not a weights-only checkpoint"),
        ([torch.zeros(2)], r"empty\.pt: expected a dict of tensors \(a state dict\), got list"),
    ],
)
def test_unreadable_checkpoints_name_the_file(tmp_path: Path, payload, message: str) -> None:
    path = tmp_path / "empty.pt"
    if isinstance(payload, bytes):
        path.write_bytes(payload)
    else:
        torch.save(payload, path)
    with pytest.raises(WeightsError, match=message):
        convert("aesthetic", path, tmp_path / "out")


def test_torchscript_archives_are_refused_with_a_way_out(tmp_path: Path) -> None:
    """OpenAI's original CLIP release is a TorchScript archive: code, never loaded."""
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(tmp_path / "ViT-B-32.pt"))
    with pytest.raises(WeightsError, match=r"ViT-B-32\.pt is a TorchScript archive.*weights='openai'"):
        load_reward("clipscore", weights=tmp_path / "ViT-B-32.pt")


def test_an_aesthetic_head_that_does_not_fit_writes_nothing(tmp_path: Path) -> None:
    state = AestheticMLP(16).state_dict()
    state["layers.2.weight"] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "head.pth")
    with pytest.raises(WeightsError, match=r"(?s)head\.pth does not fit AestheticMLP.*layers\.2\.weight"):
        convert("aesthetic", tmp_path / "head.pth", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_cli_reports_errors_without_a_traceback(tmp_path: Path) -> None:
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "scripts" / "convert_reward_weights.py"
    run = subprocess.run(
        [sys.executable, str(script), "aesthetic", str(tmp_path / "nope.pt"), str(tmp_path / "out")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 2 and "source: no such file:" in run.stderr and "Traceback" not in run.stderr
    torch.save({"x": torch.zeros(1)}, tmp_path / "odd.pt")
    run = subprocess.run(
        [sys.executable, str(script), "aesthetic", str(tmp_path / "odd.pt"), str(tmp_path / "out")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert (
        run.returncode == 2 and "odd.pt: no layers.0.weight" in run.stderr and "Traceback" not in run.stderr
    )
