"""The embedded world, its preference reward, and a reduced run of the demo pipeline."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from diffalign.demo.world import BACKGROUND, COLOURS, World, class_of, prompts, shape_masks
from diffalign.rewards import load_reward


def test_world_is_deterministic_and_covers_every_prompt() -> None:
    a, pa = World(0).dataset(64, torch.Generator().manual_seed(3))
    b, pb = World(0).dataset(64, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and pa == pb
    assert a.shape == (64, 3, 16, 16) and float(a.min()) >= 0 and float(a.max()) <= 1
    assert len(prompts()) == 12 and [class_of(p) for p in prompts()] == list(range(12))
    with pytest.raises(ValueError, match="not a prompt of the demo world"):
        World().sample(["a purple cat"])


def test_inpainting_variant_hides_part_of_the_shape() -> None:
    ex = World(0).inpainting(256, torch.Generator().manual_seed(5))
    again = World(0).inpainting(256, torch.Generator().manual_seed(5))
    assert torch.equal(ex.masks, again.masks) and ex.prompts == again.prompts
    assert ex.masks.shape == (256, 1, 16, 16) and set(ex.masks.unique().tolist()) == {0.0, 1.0}
    hole = ex.masks.bool().expand_as(ex.images)
    assert torch.all(ex.masked_images[hole] == 0.5) and torch.equal(ex.masked_images[~hole], ex.images[~hole])
    assert torch.all(ex.masks[:, 0, 8, 8] == 1)  # the centre pixel is always hidden
    sides = ex.masks.sum(dim=(1, 2, 3)).sqrt()
    assert sides.min() == 5 and sides.max() == 9  # square holes of every size drawn
    # every hole hides shape pixels (colour, not background), so there is something to inpaint
    background = torch.tensor(BACKGROUND)[None, :, None, None]
    shape_pixels = ((ex.images - background).abs().sum(dim=1, keepdim=True) > 0.3) & ex.masks.bool()
    assert torch.all(shape_pixels.flatten(1).sum(dim=1) >= 3)


def render(prompt: str, radius: float) -> torch.Tensor:
    colour, shape = prompt.split()[1:]
    mask = shape_masks([shape], torch.tensor([8.0]), torch.tensor([8.0]), torch.tensor([radius]))
    c = torch.tensor(COLOURS[colour])[None, :, None, None]
    return mask * c + (1 - mask) * torch.tensor(BACKGROUND)[None, :, None, None]


@pytest.mark.parametrize("prompt", ["a red circle", "a green ring", "a blue cross"])
def test_bigger_is_better_up_to_the_largest_shape(prompt: str) -> None:
    reward = load_reward("demo_size")
    scores = [float(reward(render(prompt, r), [prompt])) for r in (3.0, 4.0, 5.0, 6.0)]
    assert scores == sorted(scores) and scores[-1] - scores[0] > 0.25


def test_shortcuts_do_not_pay() -> None:
    reward = load_reward("demo_size")
    prompt = ["a red circle"]
    honest = float(reward(render("a red circle", 5.0), prompt))
    brighter = float(reward((render("a red circle", 5.0) + 0.1).clamp(0, 1), prompt))
    tinted = render("a red circle", 5.0) * 0.7 + 0.3 * torch.tensor(COLOURS["red"])[None, :, None, None]
    canvas = torch.tensor(COLOURS["red"])[None, :, None, None].expand(1, 3, 16, 16)
    assert brighter < honest - 0.3  # a brighter background costs more than a size step gains
    assert float(reward(tinted, prompt)) < honest
    assert float(reward(canvas, prompt)) < float(reward(render("a red circle", 3.0), prompt))
    assert (
        float(reward(render("a red circle", 5.0), ["a blue circle"])) < 0.1
    )  # the wrong colour scores nothing


def test_reduced_demo_aligns_while_fidelity_holds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole demo on reduced settings (about 2 minutes on 2 cores, from an empty cache): a base
    model pretrained for 400 steps instead of 800, a third of the preference data, 60 DPO steps at
    batch 16. Diffusion-DPO must raise the held-out reward and beat the base model seed for seed,
    while prompt fidelity and diversity hold."""
    from diffalign.cli import main

    monkeypatch.setenv("DIFFALIGN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    code = main([
        "demo", f"output_dir={out}", "pretrain.steps=400", "classifier_steps=300", "samples_per_prompt=16",
        "pairs_per_prompt=32", "eval_samples_per_prompt=32", "sampler_steps=10",
        "train_overrides=[max_steps=60, batch_size=16, checkpoint_every=60]",
    ])  # fmt: skip
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["training_steps"] == 60 and report["annotation"]["pairs"] == 9 * 32
    assert 0 < report["training_seconds"] < report["seconds"]
    assert report["classifier_accuracy_on_real_images"] >= 0.99
    base, aligned = report["base"], report["aligned"]
    assert base["fidelity"] >= 0.4  # the reduced base follows its prompts (chance: 1/12)
    assert aligned["reward"] > base["reward"] + 0.1
    assert report["win_rate_95ci"][0] > 0.75
    assert report["fidelity_drop_points"] <= 5 and report["diversity_ratio"] >= 0.7
    for name in ("before_after.png", "loss.png", "reward_margin.png"):
        assert (out / name).stat().st_size > 0
    assert any((tmp_path / "cache" / "demo").glob("base-*/model_index.json"))  # cached for the next run


def test_demo_command_line_composes_method_and_objective(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import diffalign.demo.run as demo_run
    from diffalign.cli import main
    from diffalign.config import ConfigError

    seen, run_demo = [], demo_run.run_demo

    def fake_run(cfg: demo_run.DemoConfig) -> dict:
        seen.append(cfg)
        keys = ("win_rate", "win_rate_95ci", "base", "aligned", "fidelity_drop_points", "diversity_ratio")
        return {**dict.fromkeys(keys, 0), "seconds": 0, "config": {"output_dir": "x"}}

    monkeypatch.setattr(demo_run, "run_demo", fake_run)
    args = ["demo", "--method", "diffusion_dpo", "--objective", "ipo", "train_overrides=[optim.lr=1e-6]"]
    assert main(args) == 0
    assert seen[0].method == "diffusion_dpo" and seen[0].objective == "ipo"
    assert seen[0].train_overrides == ["optim.lr=1e-6"]
    # bad input fails at once, before minutes of pretraining
    monkeypatch.setenv("DIFFALIGN_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="no demo config for method 'nope'"):
        run_demo(demo_run.DemoConfig(method="nope", output_dir=tmp_path / "out"))
    with pytest.raises(ConfigError, match="bogus"):
        run_demo(demo_run.DemoConfig(output_dir=tmp_path / "out", train_overrides=["bogus=1"]))
    with pytest.raises(ConfigError, match="objective: unknown objective 'mapo'; did you mean 'mappo'"):
        run_demo(demo_run.DemoConfig(output_dir=tmp_path / "out", objective="mapo"))
    assert main(["demo", "--objective", ""]) == 0 and seen[-1].objective == ""  # given, so not ignored
    with pytest.raises(ConfigError, match="objective: unknown objective ''"):
        run_demo(demo_run.DemoConfig(output_dir=tmp_path / "out", objective=""))
    assert not (tmp_path / "cache").exists()


def test_publish_leaves_complete_caches_when_two_demos_race(tmp_path: Path) -> None:
    """Two demos (seeds 0 and 1) pretrain the same base at once: the second to finish keeps the
    first's folder instead of failing, a file is replaced whole, and a failed write leaves nothing."""
    from diffalign.demo.pretrain import publish

    def folder_with(text: str) -> Callable[[Path], None]:
        def write(path: Path) -> None:
            path.mkdir()
            (path / "model_index.json").write_text(text)

        return write

    target = tmp_path / "base-key"
    publish(target, folder_with("first"))
    publish(target, folder_with("second"))
    assert (target / "model_index.json").read_text() == "first"
    file = tmp_path / "classifier.safetensors"
    publish(file, lambda p: p.write_text("one"))
    publish(file, lambda p: p.write_text("two"))
    assert file.read_text() == "two"

    def broken(path: Path) -> None:
        path.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        publish(tmp_path / "other", broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base-key", "classifier.safetensors"]
