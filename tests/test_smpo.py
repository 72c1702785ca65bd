"""SmPO-Diffusion: Diffusion-DPO's loss with hard labels and no inversion, a loss that fades with
the score gap, latents from ReNoise inversion (not the forward process), and bad input refused
before any model loads."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

import diffalign.methods.smpo as smpo_module
from diffalign.config import ConfigError
from diffalign.diffusion.inversion import renoise_invert
from diffalign.methods import get_method
from diffalign.rewards import RewardModel, register_reward
from diffalign.training.config import DataConfig, ModelConfig, TrainConfig

Rows = list[tuple[float | None, float | None]]


def pairs(folder: Path, rewards: Rows, prompt: str = "a red square") -> Path:
    """A JSONL of len(rewards) pairs of noise images, with (chosen_reward, rejected_reward)."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (chosen, rejected) in enumerate(rewards):
        for side in ("c", "r"):
            pixels = torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(2 * i + (side == "r")))
            Image.fromarray((pixels * 255).round().to(torch.uint8).numpy()).save(
                folder / "img" / f"{i}{side}.png"
            )
        row: dict[str, Any] = {"prompt": prompt, "chosen": f"img/{i}c.png", "rejected": f"img/{i}r.png"}
        if chosen is not None:
            row.update(chosen_reward=chosen, rejected_reward=rejected)
        rows.append(row)
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build(method: str, pipeline: str, data: Path, objective: dict | None = None, **options: Any) -> Any:
    cfg = TrainConfig(
        method=method, model=ModelConfig(pretrained=pipeline),
        data=DataConfig(path=data, resolution=32, caption_dropout=0.0, hflip=False),
        objective=objective, method_options=options, output_dir=data.parent / "out", report_to=[],
    )  # fmt: skip
    built = get_method(method)(cfg)
    built.setup(torch.device("cpu"), torch.float32)
    return built


def batch_of(method: Any, n: int = 4) -> dict:
    dataset, collate = method.dataset()
    return collate([dataset[i] for i in range(n)])


def nudge(method: Any) -> None:
    """Move the policy off the reference (the same way for every method): a loss at h = 0 is log 2
    whatever the objective, which would make equal losses vacuous."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in method.policy.unet.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))


def loss_and_grad(method: Any, batch: dict, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    method.policy.unet.zero_grad()
    torch.manual_seed(seed)
    loss, _ = method.step(batch)
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in method.policy.unet.parameters() if p.grad is not None])
    return loss.detach(), grad


def test_hard_labels_without_inversion_are_diffusion_dpo(tiny_pipelines, tmp_path: Path) -> None:
    data = pairs(tmp_path / "d", [(0.9, 0.1), (0.7, 0.2), (0.6, 0.5), (0.8, 0.3)])
    dpo = build("diffusion_dpo", tiny_pipelines["sd"], data, {"name": "dpo", "beta": 5000.0})
    smpo = build(
        "smpo", tiny_pipelines["sd"], data, {"name": "smoothed_dpo", "beta": 5000.0, "gamma": 1.0},
        inversion_steps=0, smoothing=False,
    )  # fmt: skip
    batch = batch_of(dpo)
    nudge(dpo), nudge(smpo)
    want, want_grad = loss_and_grad(dpo, batch)
    got, grad = loss_and_grad(smpo, batch)
    assert torch.equal(got, want) and torch.equal(grad, want_grad)
    assert abs(float(want) - math.log(2)) > 1e-3  # a loss that moved off its start: not a vacuous match
    # with its soft labels (gamma 10, p < 1), the same inputs give another loss
    soft = build(
        "smpo", tiny_pipelines["sd"], data, {"name": "smoothed_dpo", "beta": 5000.0}, inversion_steps=0
    )
    assert not torch.equal(loss_and_grad(soft, batch)[0], want)


def test_the_loss_and_its_gradient_fade_as_the_scores_converge(tiny_pipelines, tmp_path: Path) -> None:
    norms = []
    for gap in (0.4, 0.04, 0.004, 0.0):
        rows = [(0.5 + gap, 0.5)] * 4 + [(0.9, 0.1)]  # the batch is the first 4; data must have a gap
        data = pairs(tmp_path / f"gap{gap}", rows)
        method = build("smpo", tiny_pipelines["sd"], data, score_bounds=(0.0, 1.0))
        nudge(method)
        loss, grad = loss_and_grad(method, batch_of(method))
        norms.append(float(grad.norm()))
        if gap == 0.0:  # p = 1/2: the loss is log 2 whatever the model does, and nothing moves it
            assert float(loss) == pytest.approx(math.log(2), abs=1e-6) and norms[-1] == 0.0
    assert norms[0] > norms[1] > norms[2] > norms[3] == 0.0
    assert norms[2] < 0.02 * norms[0]  # about proportional to the gap


def test_the_reward_decides_the_winner(tiny_pipelines, tmp_path: Path) -> None:
    data = pairs(tmp_path / "d", [(0.2, 0.9), (0.7, 0.1)])
    method = build("smpo", tiny_pipelines["sd"], data)
    assert [r.rewards for r in method.records] == [(0.9, 0.2), (0.7, 0.1)]
    assert method.records[0].chosen.name == "0r.png"
    # the data's own bounds normalise the scores, and config.json will say so
    assert (method.objective.reward_min, method.objective.reward_max) == (0.1, 0.9)
    assert method.cfg.objective["reward_min"] == 0.1


@pytest.mark.parametrize("invert_with", ["policy", "reference"])
def test_the_trained_latents_come_from_renoise_inversion(
    tiny_pipelines, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, invert_with: str
) -> None:
    """The latents and targets scored are renoise_invert's, called here directly on the same x_0,
    below the same t; not the forward process's."""
    data = pairs(tmp_path / "d", [(0.9, 0.1), (0.7, 0.2)])
    method = build("smpo", tiny_pipelines["sd"], data, invert_with=invert_with, renoise_steps=1)
    seen: dict[str, Any] = {}
    inverted, scored = method._inverted, smpo_module.denoising_logp_at

    def spy_inverted(x0: torch.Tensor, images: torch.Tensor, cond: Any, t: int) -> tuple:
        out = inverted(x0, images, cond, t)
        seen.update(x0=out[0].clone(), cond=cond, t=t)  # the x_0 inverted (cached: the first one)
        return out

    monkeypatch.setattr(method, "_inverted", spy_inverted)
    monkeypatch.setattr(
        smpo_module, "denoising_logp_at", lambda *a, **k: seen.update(args=a) or scored(*a, **k)
    )
    batch = batch_of(method, 2)
    for seed in range(40):  # a t with two inversion steps below it (of 5: 1, 201, 401, ...)
        loss_and_grad(method, batch, seed)
        if seen["t"] > 401:
            break
    _, z, target, timesteps, _ = seen["args"]
    x0, cond, t = seen["x0"], seen["cond"], seen["t"]
    inverter = method.policy if invert_with == "policy" else method.policy.frozen_copy()
    direct = renoise_invert(inverter, x0, cond, num_inference_steps=5, renoise_steps=1, below=t)
    assert len(direct.timesteps) >= 3
    want = direct.latents[:, -1].unflatten(0, (2, 2)).transpose(0, 1)  # (B, 2, ...): chosen first
    torch.testing.assert_close(z, want, rtol=0, atol=1e-6)
    alpha = method.policy.scheduler.alphas_cumprod[t]
    x0_pairs = x0.unflatten(0, (2, 2)).transpose(0, 1)
    torch.testing.assert_close(
        target, (want - alpha.sqrt() * x0_pairs) / (1 - alpha).sqrt(), rtol=1e-5, atol=1e-5
    )
    assert torch.equal(timesteps, torch.full((2,), t))


def test_reference_inversions_are_cached_once_per_image(tiny_pipelines, tmp_path: Path) -> None:
    data = pairs(tmp_path / "d", [(0.9, 0.1), (0.7, 0.2)])
    method = build("smpo", tiny_pipelines["sd"], data, invert_with="reference")
    calls = []
    method.inverter.unet.register_forward_hook(lambda *_: calls.append(1))
    batch = batch_of(method, 2)
    for seed in range(3):
        loss_and_grad(method, batch, seed)
    assert len(method.inversions) == 4  # 2 pairs x 2 images
    assert len(calls) == 5 * 2  # one inversion: 5 steps x (1 + 1 renoise) UNet calls, then the cache
    # the live policy trains while the inverter stays at the starting weights
    assert method.inverter.unet is not method.policy.unet


@register_reward("test_needs_prompts")
class NeedsPrompts(RewardModel):
    needs_prompts = True

    def score(self, images: torch.Tensor, prompts: list[str] | None, **context: Any) -> torch.Tensor:
        return images.mean((1, 2, 3))


def test_bad_input_is_refused_before_any_model_loads(tmp_path: Path) -> None:
    nowhere = str(tmp_path / "no-pipeline")
    with pytest.raises(
        ValueError, match=r"SmPO needs reward scores and the pairs have none: set .*score_prefix"
    ):
        build("smpo", nowhere, pairs(tmp_path / "none", [(None, None)] * 2))
    with pytest.raises(ValueError, match=r"pairs.jsonl:1: reward 'test_needs_prompts' needs a prompt"):
        build(
            "smpo",
            nowhere,
            pairs(tmp_path / "blank", [(None, None)] * 2, prompt=" "),
            reward="test_needs_prompts",
        )
    with pytest.raises(ValueError, match=r"every pair.s two scores are equal: each soft label is 1/2"):
        build("smpo", nowhere, pairs(tmp_path / "flat", [(0.5, 0.5)] * 3))
    with pytest.raises(ValueError, match="chosen_reward"):
        build("smpo", nowhere, pairs(tmp_path / "nan", [(float("nan"), 0.1), (0.5, 0.2)]))
    with pytest.raises(ValueError, match=r"score_bounds must rise"):
        build("smpo", nowhere, pairs(tmp_path / "ok", [(0.9, 0.1)]), score_bounds=(1.0, 0.0))
    with pytest.raises(ValueError, match="SmPO has no SFT baseline"):
        build("smpo", nowhere, pairs(tmp_path / "sft", [(0.9, 0.1)]), sft=True)
    for options, message in [
        ({"inversion_steps": -1}, "inversion_steps must be >= 0, got -1"),
        ({"renoise_steps": 1, "average_range": (0, 5)}, r"average_range must satisfy .* got \(0, 5\)"),
        ({"average_range": (1, 0)}, "average_range must satisfy"),
    ]:
        with pytest.raises(ConfigError, match=message):
            build("smpo", nowhere, pairs(tmp_path / "ok3", [(0.9, 0.1)]), **options)
    unscored = pairs(tmp_path / "unscored", [(None, None)])
    with pytest.raises(ConfigError, match=r"method_options\.reward: .*no option 'qualty'"):
        build("smpo", nowhere, unscored, reward="jpeg_compressibility", reward_options={"qualty": 50})
    with pytest.raises(ConfigError, match=r"method_options\.reward: unknown reward 'jpeg_compresibility'"):
        build("smpo", nowhere, unscored, reward="jpeg_compresibility")
    with pytest.raises(
        ConfigError, match="has reward scores already, so 'jpeg_compressibility' would go unused"
    ):
        build("smpo", nowhere, pairs(tmp_path / "both", [(0.9, 0.1)]), reward="jpeg_compressibility")
    with pytest.raises(ValueError, match="every pair's two scores are equal"):  # though not all alike
        build("smpo", nowhere, pairs(tmp_path / "ties", [(0.9, 0.9), (0.1, 0.1)]))
    with pytest.raises(ConfigError, match="inversion_stepz"):
        build("smpo", nowhere, pairs(tmp_path / "ok2", [(0.9, 0.1)]), inversion_stepz=3)


def test_a_registry_reward_scores_unscored_pairs(tiny_pipelines, tmp_path: Path) -> None:
    data = pairs(tmp_path / "d", [(None, None)] * 3)
    method = build("smpo", tiny_pipelines["sd"], data, reward="test_needs_prompts")
    for r in method.records:
        from diffalign.data.preference import load_image

        means = (float(load_image(r.chosen, "").mean()), float(load_image(r.rejected, "").mean()))
        assert r.rewards == pytest.approx(means, abs=1e-6) and r.rewards[0] >= r.rewards[1]


def test_renoise_invert_refuses_an_empty_schedule(tiny_pipelines) -> None:
    """diffusers gives an empty schedule for no steps: the inversion would silently be x_0 itself."""
    from diffalign.diffusion import DiffusionPolicy

    policy = DiffusionPolicy.from_pretrained(tiny_pipelines["sd"])
    x0, cond = torch.zeros(1, 4, 16, 16), policy.encode_prompts(["a red square"])
    for steps in (0, -1):
        with pytest.raises(
            ValueError, match=rf"num_inference_steps must be >= 1 and renoise_steps >= 0, got {steps}"
        ):
            renoise_invert(policy, x0, cond, num_inference_steps=steps)
