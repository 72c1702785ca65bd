"""``diffalign eval``: several models on one prompt set with the same seeds, the win-rate table with
Wilson intervals, plots and grids; bad input named before any model samples."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffalign.config import ConfigError
from diffalign.eval_report import EvalConfig, ModelSpec, run_eval
from diffalign.evaluation import win_rate


def hand_wilson(wins: float, n: int, z: float = 1.96) -> list[float]:
    p = wins / n
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z / (1 + z**2 / n) * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    return [centre - half, centre + half]


def test_win_rate_and_interval_on_a_fixed_table() -> None:
    ours = torch.tensor([3.0, 2.0, 5.0, 1.0, 0.5])
    base = torch.tensor([1.0, 2.0, 4.0, 2.0, 0.7])
    out = win_rate(ours, base)  # wins 3 > 1 and 5 > 4, a tie 2 = 2: 2.5 of 5
    assert out["win_rate"] == 0.5
    assert out["win_rate_95ci"] == pytest.approx(hand_wilson(2.5, 5), abs=1e-12)
    assert out["win_rate_95ci"] == pytest.approx([0.1704, 0.8296], abs=1e-4)
    with pytest.raises(ValueError, match="NaN or infinite"):
        win_rate(torch.tensor([math.nan]), torch.tensor([0.0]))
    with pytest.raises(ValueError, match=r"two \(N,\) score vectors"):
        win_rate(torch.zeros(2), torch.zeros(3))


@pytest.fixture()
def parti(tmp_path: Path) -> Path:
    path = tmp_path / "PartiPrompts.tsv"
    rows = [("a red cat", "Animals"), ("a blue dog", "Animals"), ("a green tree", "Plants")]
    path.write_text("Prompt\tCategory\tChallenge\tNote\n" + "".join(f"{p}\t{c}\tBasic\t\n" for p, c in rows))
    return path


@pytest.fixture()
def tuned_unet(tiny_pipelines, tmp_path: Path) -> Path:
    """A checkpoint export (``export/unet``) of the tiny UNet with its weights moved."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(Path(tiny_pipelines["sd"]) / "unet")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    export = tmp_path / "export"
    unet.save_pretrained(export / "unet")
    return export


def test_eval_table_on_three_models(tiny_pipelines, parti: Path, tuned_unet: Path, tmp_path: Path) -> None:
    from diffalign.diffusion.policy import DiffusionPolicy
    from diffalign.evaluation import sample_images
    from diffalign.images import from_pil
    from diffalign.rewards import load_reward

    out = tmp_path / "eval"
    cfg = EvalConfig(
        models={
            "base": ModelSpec(pipeline=tiny_pipelines["sd"]),
            "same": ModelSpec(pipeline=tiny_pipelines["sd"]),
            "tuned": ModelSpec(pipeline=tiny_pipelines["sd"], unet=str(tuned_unet)),
        },
        prompts=parti, output_dir=out, rewards=["rl_rewards:Brightness", "jpeg_compressibility"],
        samples_per_prompt=2, steps=2, guidance_scale=2.0, batch_size=4, seed=5,
    )  # fmt: skip
    results = run_eval(cfg)
    assert results["image_seeds_equal"] and results["compared_with"] == "base"

    def stored(model: str) -> torch.Tensor:
        return torch.stack([from_pil(Image.open(out / "images" / model / f"{i:06d}.png")) for i in range(6)])

    # the same seeds for every model: one model under two names samples the same images, and each
    # image is what sampling that prompt alone with its index's seed gives (batching changes nothing)
    assert torch.equal(stored("base"), stored("same"))
    policy = DiffusionPolicy.from_pretrained(tiny_pipelines["sd"])
    alone = sample_images(policy, ["a green tree"], 5, 2, 2.0, first=5)
    assert (alone - stored("base")[5:6]).abs().max() <= 1 / 255 + 1e-6
    assert not torch.equal(stored("tuned"), stored("base"))

    brightness = load_reward("rl_rewards:Brightness")
    for reward_name, reward in (("rl_rewards:Brightness", brightness), ("jpeg_compressibility", None)):
        table = results["rewards"][reward_name]
        assert table["same"]["win_rate"] == 0.5  # every image a tie
        if reward is None:
            continue
        tuned, base = reward(stored("tuned")).double(), reward(stored("base")).double()
        assert table["tuned"]["mean"] == pytest.approx(float(tuned.mean()), rel=1e-6)
        assert table["tuned"]["median"] == pytest.approx(float(tuned.sort().values[2:4].mean()), rel=1e-6)
        wins = float((tuned > base).sum() + 0.5 * (tuned == base).sum())
        assert table["tuned"]["win_rate"] == wins / 6
        assert table["tuned"]["win_rate_95ci"] == pytest.approx(hand_wilson(wins, 6), abs=1e-9)
        assert "win_rate" not in table["base"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["rewards"] == results["rewards"]
    markdown = (out / "results.md").read_text()
    assert markdown.count("\n| ") == 3 and "| tuned |" in markdown  # a row per model
    for name in ("scores.png", "win_rates.png", "grid_Animals.png", "grid_Plants.png"):
        assert Image.open(out / name).size[0] > 100


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("empty", "no prompts"),
        ("format", "unknown prompt file format '.yaml'"),
        ("masks", "reward 'rl_rewards:HoleFeatures' scores inpaintings"),
        ("inpainting", "an inpainting pipeline"),
        ("unet", "holds neither unet/"),
    ],
)
def test_bad_input_is_named(tiny_pipelines, parti: Path, tmp_path: Path, case: str, message: str) -> None:
    prompts, rewards, spec = parti, ["rl_rewards:Brightness"], ModelSpec(pipeline=tiny_pipelines["sd"])
    if case == "empty":
        prompts = tmp_path / "empty.txt"
        prompts.write_text("")
    elif case == "format":
        prompts = tmp_path / "prompts.yaml"
        prompts.write_text("- a\n")
    elif case == "masks":
        rewards = ["rl_rewards:HoleFeatures"]
    elif case == "inpainting":
        spec = ModelSpec(pipeline=tiny_pipelines["inpaint"])
    else:
        spec = ModelSpec(pipeline=tiny_pipelines["sd"], unet=str(tmp_path))
    cfg = EvalConfig(
        models={"m": spec}, prompts=prompts, output_dir=tmp_path / "out", rewards=rewards, steps=1
    )
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        run_eval(cfg)
    assert not (tmp_path / "out" / "results.json").exists()


def test_config_errors(parti: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="at least one model"):
        EvalConfig(models={}, prompts=parti, output_dir=tmp_path, rewards=["x"])
    with pytest.raises(ConfigError, match="share an image folder name"):
        spec = ModelSpec(pipeline="p")
        EvalConfig(models={"a/b": spec, "a_b": spec}, prompts=parti, output_dir=tmp_path, rewards=["x"])
    with pytest.raises(ConfigError, match="at least one reward"):
        EvalConfig(models={"m": ModelSpec(pipeline="p")}, prompts=parti, output_dir=tmp_path)


def test_the_eval_command(tiny_pipelines, parti: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from diffalign.cli import main

    out = tmp_path / "cli"
    code = main([
        "eval", f"models={{base: {{pipeline: {tiny_pipelines['sd']}}}}}", f"prompts={parti}",
        f"output_dir={out}", "rewards=[rl_rewards:Brightness]", "steps=1",
    ])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "| base |" in printed and (out / "results.json").is_file()
