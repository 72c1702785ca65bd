"""The embedded world, its preference reward, and a reduced run of the demo pipeline."""

from __future__ import annotations

import json
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


def test_reduced_demo_runs_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every stage on minimal settings (seconds): this checks the plumbing and the report, not
    the alignment quality, which needs the default settings."""
    from diffalign.cli import main

    monkeypatch.setenv("DIFFALIGN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    code = main([
        "demo", f"output_dir={out}", "pretrain.steps=5", "pretrain.batch_size=8", "classifier_steps=5",
        "samples_per_prompt=3", "pairs_per_prompt=2", "eval_samples_per_prompt=3", "sampler_steps=2",
        "train_overrides=[max_steps=2, batch_size=4, checkpoint_every=2]",
    ])  # fmt: skip
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["training_steps"] == 2 and report["annotation"]["pairs"] == 9 * 2
    assert (
        0 <= report["win_rate"] <= 1
        and report["win_rate_95ci"][0] <= report["win_rate"] <= report["win_rate_95ci"][1]
    )
    for key in ("reward", "fidelity", "diversity"):
        assert key in report["base"] and key in report["aligned"]
    for name in ("before_after.png", "loss.png", "reward_margin.png"):
        assert (out / name).stat().st_size > 0
    assert any((tmp_path / "cache" / "demo").glob("base-*/model_index.json"))  # cached for the next run
