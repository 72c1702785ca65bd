"""The RL core (DDPO and PrefPaint): advantages and trust weights against hand-computed values,
the surrogate against DDPO's and PrefPaint's code on equal inputs, per-step log-probs from the
trajectory module (ratio 1 before the first update), a KL / L1 trust region that enters the loss,
the stat tracker across a resume, and bad input refused."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from diffalign.config import ConfigError
from diffalign.diffusion.sampling import trajectory_logps, trajectory_transitions
from diffalign.methods import get_method
from diffalign.methods.prefpaint import trust_weights
from diffalign.objectives import get_objective
from diffalign.objectives.advantages import PerPromptStatTracker, batch_advantages, group_advantages
from diffalign.training.config import DataConfig, ModelConfig, TrainConfig
from diffalign.training.loop import run_training
from diffalign.training.state_files import load_state

PROMPTS = ["a red ball", "a blue cube", "a green cone"]


def prompt_file(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def ddpo_config(pipeline: str, data: Path, out: Path, **extra: Any) -> TrainConfig:
    options = {
        "reward": "rl_rewards:Brightness", "samples_per_prompt": 2, "train_batch_size": 3,
        "train_timesteps": 2, "rollout_steps": 4, "rollout_guidance": 2.0, **extra.pop("method_options", {}),
    }  # fmt: skip
    return TrainConfig(
        method="ddpo", model=ModelConfig(pretrained=pipeline), data=DataConfig(path=data, resolution=32),
        method_options=options, output_dir=out, report_to=[],
        **{"batch_size": 3, "gradient_accumulation_steps": 2, "log_every": 1, **extra},
    )  # fmt: skip


def build(cfg: TrainConfig) -> Any:
    method = get_method(cfg.method)(cfg)
    method.setup(torch.device("cpu"), torch.float32)
    return method


def first_batch(method: Any) -> Any:
    dataset, collate = method.dataset()
    return collate([dataset[i] for i in range(min(3, len(dataset)))])


# -- pure parts ------------------------------------------------------------------------------------


def test_batch_advantages_standardise_over_finite_rewards() -> None:
    rewards = torch.tensor([1.0, 2.0, 3.0, float("nan")])
    std = math.sqrt(2 / 3)  # population std of 1, 2, 3
    expected = torch.tensor([-1 / (std + 1e-6), 0.0, 1 / (std + 1e-6), float("nan")])
    torch.testing.assert_close(batch_advantages(rewards), expected, equal_nan=True)


def test_group_advantages_standardise_within_each_group() -> None:
    rewards = torch.tensor([1.0, 3.0, 5.0, 5.0, 2.0])
    groups = torch.tensor([0, 0, 1, 1, 2])
    # group 0: mean 2, std 1; group 1: no spread; group 2: one sample
    expected = torch.tensor([-1 / (1 + 1e-6), 1 / (1 + 1e-6), 0.0, 0.0, 0.0])
    torch.testing.assert_close(group_advantages(rewards, groups), expected)


def test_the_stat_tracker_is_ddpos_and_survives_a_round_trip() -> None:
    """ddpo_pytorch/stat_tracking.py: a prompt's own buffer once it holds min_count, the batch's
    rewards before; numpy's population std + 1e-6."""
    tracker = PerPromptStatTracker(buffer_size=3, min_count=2)
    first = tracker.update(["a", "a", "b"], torch.tensor([1.0, 3.0, 10.0]))
    batch = torch.tensor([1.0, 3.0, 10.0])
    b_expected = (10 - batch.mean()) / (batch.std(correction=0) + 1e-6)
    torch.testing.assert_close(
        first, torch.stack([torch.tensor(-1 / (1 + 1e-6)), torch.tensor(1 / (1 + 1e-6)), b_expected])
    )
    restored = PerPromptStatTracker(buffer_size=3, min_count=2)
    restored.load_state_dict(json.loads(json.dumps(tracker.state_dict())))
    # "a" now holds 1, 3, 5 (mean 3); the next 7 pushes 1 out: 3, 5, 7
    for t in (tracker, restored):
        assert float(t.update(["a"], torch.tensor([5.0]))[0]) == pytest.approx(2 / (math.sqrt(8 / 3) + 1e-6))
        assert float(t.update(["a"], torch.tensor([7.0]))[0]) == pytest.approx(2 / (math.sqrt(8 / 3) + 1e-6))
    with pytest.raises(ValueError, match="buffer_size, min_count"):
        PerPromptStatTracker(4, 2).load_state_dict(tracker.state_dict())


def test_trust_weights_are_the_official_formula_and_clamped() -> None:
    g = torch.Generator().manual_seed(0)
    features, v_inverse = torch.randn(64, 8, generator=g), torch.randn(8, 8, generator=g)
    # train_inpainting_model.py: sqrt(sum((f @ V_inverse)^2, 1)); clamp(exp(-a b + c), 1, 2.21)
    bound = torch.sqrt(torch.sum(torch.pow(torch.matmul(features, v_inverse), 2), dim=1))
    expected = torch.clamp(torch.exp(-0.05 * bound + 0.7), min=1.0, max=2.21)
    torch.testing.assert_close(trust_weights(features, v_inverse), expected)
    assert 0 < int((expected == 1.0).sum()) < 64  # the test reaches the lower clamp and not only it
    near = trust_weights(torch.zeros(3, 8), v_inverse)
    torch.testing.assert_close(near, torch.full((3,), math.exp(0.7)))
    capped = trust_weights(torch.zeros(3, 8), v_inverse, beta=1.0)
    torch.testing.assert_close(capped, torch.full((3,), 2.21))
    with pytest.raises(ValueError, match=r"V\^-1 \(D, D\)"):
        trust_weights(features, v_inverse[:4])


def test_the_surrogate_is_ddpos_and_prefpaints_on_equal_inputs() -> None:
    g = torch.Generator().manual_seed(1)
    logp, old = torch.randn(32, generator=g) * 1e-3, torch.randn(32, generator=g) * 1e-3
    adv, w = torch.randn(32, generator=g) * 8, 1 + torch.rand(32, generator=g)
    # kvablack/ddpo-pytorch scripts/train.py
    advantages = torch.clamp(adv, -5, 5)
    ratio = torch.exp(logp - old)
    unclipped, clipped = -advantages * ratio, -advantages * torch.clamp(ratio, 1.0 - 1e-4, 1.0 + 1e-4)
    ddpo = torch.mean(torch.maximum(unclipped, clipped))
    out = get_objective("ppo_clip")(policy_logps=logp, old_policy_logps=old, advantages=adv)
    torch.testing.assert_close(out.loss, ddpo, check_dtype=False)
    assert 0 < out.metrics["policy/clipfrac"] < 1
    # PrefPaint's: boundary_weight * max(...) per sample, advantages clipped to 10
    pp = get_objective("ppo_clip", advantage_clip=10.0)
    a10 = torch.clamp(adv, -10, 10)
    expected = w * torch.max(-a10 * ratio, -a10 * torch.clamp(ratio, 1 - 1e-4, 1 + 1e-4))
    got = pp(policy_logps=logp, old_policy_logps=old, advantages=adv, trust_weights=w)
    torch.testing.assert_close(got.losses, expected, check_dtype=False)


# -- the recipes -----------------------------------------------------------------------------------


def test_step_log_probs_come_from_the_trajectory_and_the_first_ratio_is_one(
    tiny_pipelines, tmp_path: Path
) -> None:
    method = build(ddpo_config(tiny_pipelines["sd"], prompt_file(tmp_path), tmp_path / "out"))
    rollout = method.rollout(first_batch(method))
    trajectory = rollout.trajectory
    assert trajectory.log_probs.shape == (6, 4) and trajectory.sampler == "ddim" and trajectory.eta == 1.0
    with torch.no_grad():
        torch.testing.assert_close(
            trajectory_logps(method.policy, trajectory), trajectory.log_probs, atol=1e-4, rtol=0
        )
    micro = {"rollout": rollout, "rows": torch.arange(3), "steps": torch.tensor([[0], [2], [3]])}
    loss, metrics = method.step(micro)
    assert metrics["policy/ratio"] == pytest.approx(1.0, abs=1e-4)
    assert metrics["policy/clipfrac"] == 0.0
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.policy.unet.parameters())


def test_micro_batches_cover_each_sample_on_its_own_steps(tiny_pipelines, tmp_path: Path) -> None:
    method = build(ddpo_config(tiny_pipelines["sd"], prompt_file(tmp_path), tmp_path / "out"))
    torch.manual_seed(0)
    micro = list(method.micro_batches(first_batch(method), 0))
    assert len(micro) == 2 * 2  # 6 samples in chunks of 3, 2 timesteps each
    seen: dict[int, list[int]] = {}
    for m in micro:
        for row, step in zip(m["rows"].tolist(), m["steps"][:, 0].tolist(), strict=True):
            seen.setdefault(row, []).append(step)
    assert sorted(seen) == list(range(6))
    assert all(len(set(s)) == 2 for s in seen.values())  # two distinct steps per sample


def test_a_train_window_trains_only_its_steps(tiny_pipelines, tmp_path: Path) -> None:
    """4 rollout steps at positions 0, 0.25, 0.5, 0.75: the window [0, 0.5) trains steps 0 and 1
    only (each sample both, as train_timesteps is 2); a window that holds no step is refused."""
    data = prompt_file(tmp_path)
    options = {"train_window": [0.0, 0.5]}
    method = build(ddpo_config(tiny_pipelines["sd"], data, tmp_path / "a", method_options=options))
    assert method.stochastic_steps.tolist() == [0, 1]
    torch.manual_seed(0)
    seen = {row: set() for row in range(6)}
    for m in method.micro_batches(first_batch(method), 0):
        for row, step in zip(m["rows"].tolist(), m["steps"][:, 0].tolist(), strict=True):
            seen[row].add(step)
    assert all(steps == {0, 1} for steps in seen.values())
    with pytest.raises(ConfigError, match=r"train_window: \[0.9, 1.0\] holds no stochastic step"):
        build(
            ddpo_config(
                tiny_pipelines["sd"], data, tmp_path / "b", method_options={"train_window": [0.9, 1.0]}
            )
        )
    with pytest.raises(ValueError, match="train_window needs"):
        build(
            ddpo_config(
                tiny_pipelines["sd"], data, tmp_path / "c", method_options={"train_window": [0.5, 0.2]}
            )
        )


def test_a_kl_or_l1_term_to_the_old_means_enters_the_loss(tiny_pipelines, tmp_path: Path) -> None:
    data = prompt_file(tmp_path)
    method = build(ddpo_config(tiny_pipelines["sd"], data, tmp_path / "out"))
    rollout = method.rollout(first_batch(method))
    with torch.no_grad():  # a policy that has moved since the rollout
        for p in method.policy.unet.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    micro = {"rollout": rollout, "rows": torch.arange(3), "steps": torch.tensor([[1], [1], [2]])}
    base, _ = method.step(micro)
    with torch.no_grad():
        moved = trajectory_transitions(
            method.policy, rollout.trajectory.select(torch.arange(3)), micro["steps"]
        )
    drift = (moved.means - moved.recorded_means).flatten(2)
    assert float(drift.abs().mean()) > 0
    method.options.l1_weight = 0.5
    with_l1, metrics = method.step(micro)
    assert float((with_l1 - base).detach()) == pytest.approx(0.5 * float(drift.abs().mean()), rel=1e-4)
    method.options.l1_weight, method.options.kl_weight = 0.0, 2.0
    with_kl, metrics = method.step(micro)
    kl = ((drift**2).mean(-1) / (2 * moved.stds**2)).mean()
    assert float((with_kl - base).detach()) == pytest.approx(2.0 * float(kl), rel=1e-4)
    assert metrics["policy/kl_to_old"] == pytest.approx(float(kl), rel=1e-4)


def test_a_kl_to_the_reference_enters_the_loss(tiny_pipelines, tmp_path: Path) -> None:
    """DPOK's regulariser: the KL to the base model's means, 0 before the policy moves, then the
    hand-computed Gaussian KL to a frozen copy taken at the start, with gradients to the UNet."""
    options = {"reference_kl_weight": 2.0}
    method = build(
        ddpo_config(tiny_pipelines["sd"], prompt_file(tmp_path), tmp_path / "out", method_options=options)
    )
    start = method.policy.frozen_copy()
    rollout = method.rollout(first_batch(method))
    micro = {"rollout": rollout, "rows": torch.arange(3), "steps": torch.tensor([[1], [1], [2]])}
    _, metrics = method.step(micro)
    assert metrics["policy/kl_to_reference"] == pytest.approx(0.0, abs=1e-9)
    with torch.no_grad():
        for p in method.policy.unet.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    with_kl, metrics = method.step(micro)
    method.options.reference_kl_weight = 0.0
    without, _ = method.step(micro)
    with torch.no_grad():
        trajectory = rollout.trajectory.select(torch.arange(3))
        moved = trajectory_transitions(method.policy, trajectory, micro["steps"])
        anchor = trajectory_transitions(start, trajectory, micro["steps"]).means
    kl = (((moved.means - anchor).flatten(2) ** 2).mean(-1) / (2 * moved.stds**2)).mean()
    assert float(kl) > 0
    assert metrics["policy/kl_to_reference"] == pytest.approx(float(kl), rel=1e-4)
    assert float((with_kl - without).detach()) == pytest.approx(2.0 * float(kl), rel=1e-4)
    (with_kl - without).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.policy.unet.parameters())


def test_a_trust_region_to_the_old_policy_that_cannot_act_is_refused(tiny_pipelines, tmp_path: Path) -> None:
    """One optimiser step per rollout with the live policy sampling: the old means are the policy's
    own at every micro-batch, so a KL or L1 to them would be 0 with gradient 0."""
    data = prompt_file(tmp_path)
    for term in ("kl_weight", "l1_weight"):
        cfg = ddpo_config(
            tiny_pipelines["sd"],
            data,
            tmp_path / term,
            method_options={term: 0.1},
            gradient_accumulation_steps=4,
        )
        with pytest.raises(ConfigError, match="sync_every 1 and one optimiser step per rollout"):
            build(cfg)


def test_nan_rewards_stop_training_or_are_skipped_and_counted(tiny_pipelines, tmp_path: Path) -> None:
    data = prompt_file(tmp_path)
    options = {"reward": "rl_rewards:NanForRed", "advantages": "batch"}
    method = build(ddpo_config(tiny_pipelines["sd"], data, tmp_path / "a", method_options=options))
    with pytest.raises(FloatingPointError, match=r"2 non-finite scores of 6 .*on_nan_reward=skip"):
        method.rollout(first_batch(method))
    skip = build(
        ddpo_config(
            tiny_pipelines["sd"], data, tmp_path / "b", method_options={**options, "on_nan_reward": "skip"}
        )
    )
    rollout = skip.rollout(first_batch(skip))
    red = torch.tensor([p == "a red ball" for p in PROMPTS for _ in range(2)])
    assert bool((rollout.advantages[red] == 0).all()) and bool(rollout.advantages[~red].abs().sum() > 0)
    assert skip.dropped_samples() == 2 and rollout.metrics["reward/non_finite"] == 2


def test_the_stat_tracker_and_old_policy_survive_a_resume(tiny_pipelines, tmp_path: Path) -> None:
    """A rollout makes 4 micro-batches, 2 optimiser steps: a run cut after the first rollout and
    resumed trains, logs and keeps what the uninterrupted one does."""
    data = prompt_file(tmp_path)
    options = {"advantages": "per_prompt", "stat_min_count": 2, "stat_buffer_size": 4, "sync_every": 2}
    runs = {
        name: ddpo_config(
            tiny_pipelines["sd"], data, tmp_path / out, method_options=options, max_steps=steps,
            checkpoint_every=2,
        )
        for name, out, steps in (("whole", "whole", 4), ("first", "cut", 2))
    }  # fmt: skip
    run_training(get_method("ddpo")(runs["whole"]))
    run_training(get_method("ddpo")(runs["first"]))
    resumed = ddpo_config(
        tiny_pipelines["sd"], data, tmp_path / "cut", method_options=options, max_steps=4, checkpoint_every=2,
        resume_from="latest",
    )  # fmt: skip
    run_training(get_method("ddpo")(resumed))

    def state(out: Path) -> dict:
        return load_state(out / "checkpoints" / "checkpoint-4" / "method_state_0.safetensors")

    a, b = state(tmp_path / "whole"), state(tmp_path / "cut")
    assert a["stat_tracker"] == b["stat_tracker"] and a["stat_tracker"]["stats"]
    assert a["old_policy"]["synced_at"] == b["old_policy"]["synced_at"] == 4
    lines = [(tmp_path / o / "metrics.jsonl").read_text().splitlines() for o in ("whole", "cut")]
    for x, y in zip(lines[0], lines[1], strict=True):
        x, y = json.loads(x), json.loads(y)
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-6) and x["reward/mean"] == y["reward/mean"]


def test_schedules_that_cannot_work_are_refused_before_training(tiny_pipelines, tmp_path: Path) -> None:
    data = prompt_file(tmp_path)
    with pytest.raises(
        ConfigError, match="gradient_accumulation_steps: 3 does not divide the 4 micro-batches"
    ):
        build(ddpo_config(tiny_pipelines["sd"], data, tmp_path / "a", gradient_accumulation_steps=3))
    with pytest.raises(ConfigError, match="train_timesteps: 9 exceeds the 4 stochastic steps"):
        build(ddpo_config(tiny_pipelines["sd"], data, tmp_path / "b", method_options={"train_timesteps": 9}))
    narrowed = {"train_timesteps": 3, "train_window": [0.0, 0.5]}
    with pytest.raises(ConfigError, match=r"3 exceeds the 2 stochastic .* inside train_window \[0.0, 0.5\]"):
        build(ddpo_config(tiny_pipelines["sd"], data, tmp_path / "b2", method_options=narrowed))
    with pytest.raises(ValueError, match=r"is an inpainting pipeline .* ddpo trains text-to-image"):
        build(ddpo_config(tiny_pipelines["inpaint"], data, tmp_path / "c"))
    with pytest.raises(ValueError, match=r"method_options\.reward: cannot build reward 'no_such_reward'"):
        build(
            ddpo_config(
                tiny_pipelines["sd"], data, tmp_path / "d", method_options={"reward": "no_such_reward"}
            )
        )
    with pytest.raises(ValueError, match="eta must be > 0"):
        build(ddpo_config(tiny_pipelines["sd"], data, tmp_path / "e", method_options={"eta": 0.0}))
    with pytest.raises(ValueError, match="objective 'dpo' is pairwise"):
        build(ddpo_config(tiny_pipelines["sd"], data, tmp_path / "f", objective={"name": "dpo"}))


def inpainting_examples(folder: Path, n: int = 4) -> Path:
    from diffalign.data.inpainting import write_inpainting_examples

    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(n, 1, 32, 32)
    masks[:, :, 8:24, 8:24] = 1
    return write_inpainting_examples(folder, torch.rand(n, 3, 32, 32, generator=g), masks, ["a cat"] * n)


def prefpaint_config(pipeline: str, data: Path, out: Path, **options: Any) -> TrainConfig:
    options = {
        "reward": "rl_rewards:HoleFeatures", "train_timesteps": 2, "rollout_steps": 4, "sync_every": 1,
        "train_batch_size": 4, **options,
    }  # fmt: skip
    return TrainConfig(
        method="prefpaint", model=ModelConfig(pretrained=pipeline), data=DataConfig(path=data, resolution=32),
        method_options=options, output_dir=out, report_to=[], batch_size=2, gradient_accumulation_steps=2,
    )  # fmt: skip


def test_prefpaint_weights_samples_by_trust_inside_the_loss(tiny_pipelines, tmp_path: Path) -> None:
    data = inpainting_examples(tmp_path / "d")
    method = build(prefpaint_config(tiny_pipelines["inpaint"], data, tmp_path / "out", samples_per_prompt=2))
    batch = first_batch(method)
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    originals, masks = batch["images"][:2].repeat_interleave(2, 0), batch["masks"][:2].repeat_interleave(2, 0)
    scores, weights = method.score_rollout(images, ["a cat"] * 4, originals, masks)
    # the reward sees the original picture blacked out in the hole, not the sample's
    expected, features = method.reward.score_with_features(
        images, masks, torch.where(masks >= 0.5, 0.0, originals)
    )
    torch.testing.assert_close(scores, expected)
    torch.testing.assert_close(weights, trust_weights(features, method.reward.v_inverse))
    assert float(weights.min()) >= 1.0 and float(weights.max()) <= 2.21
    rollout = method.rollout({k: v[:2] for k, v in batch.items()})
    micro = {"rollout": rollout, "rows": torch.arange(4), "steps": torch.tensor([[0], [1], [2], [0]])}
    rollout.weights = torch.ones(4)
    once, _ = method.step(micro)
    rollout.weights = torch.full((4,), 2.0)
    twice, _ = method.step(micro)
    assert float(twice.detach()) == pytest.approx(2 * float(once.detach()), rel=1e-5)


def test_prefpaint_scores_inpaintings_with_the_input_pasted_back_outside_the_hole(
    tiny_pipelines, tmp_path: Path
) -> None:
    data = inpainting_examples(tmp_path / "d")
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    scores = {}
    for keep in (True, False):
        options = {"reward": "rl_rewards:Brightness", "trust_weights": False, "keep_unmasked": keep}
        method = build(prefpaint_config(tiny_pipelines["inpaint"], data, tmp_path / str(keep), **options))
        batch = first_batch(method)
        originals, masks = batch["images"][:2], batch["masks"][:2]
        scores[keep], _ = method.score_rollout(images, ["a cat"] * 2, originals, masks)
    hole = masks >= 0.5  # the 16 x 16 centre of 32 x 32: a quarter of the pixels
    pasted = torch.where(hole, images, originals)
    torch.testing.assert_close(scores[True], pasted.mean(dim=(1, 2, 3)))
    torch.testing.assert_close(scores[False], images.mean(dim=(1, 2, 3)))
    assert not torch.allclose(scores[True], scores[False])


def test_prefpaint_refuses_a_text_to_image_unet_a_missing_reward_and_untrusted_rewards(
    tiny_pipelines, tmp_path: Path
) -> None:
    data = inpainting_examples(tmp_path / "d")
    with pytest.raises(ValueError, match=r"is a text-to-image pipeline .* prefpaint trains inpainting UNets"):
        build(prefpaint_config(tiny_pipelines["sd"], data, tmp_path / "a"))
    missing = tmp_path / "no_reward_here"
    with pytest.raises(
        ValueError, match=rf"method_options\.reward: cannot build reward 'prefpaint'.*{missing.name}"
    ):
        build(prefpaint_config(tiny_pipelines["inpaint"], data, tmp_path / "b", reward="prefpaint",
                               reward_kwargs={"weights": str(missing)}))  # fmt: skip
    with pytest.raises(ValueError, match="gives no features to weigh trust by"):
        build(
            prefpaint_config(tiny_pipelines["inpaint"], data, tmp_path / "c", reward="rl_rewards:Brightness")
        )
    plain = build(
        prefpaint_config(tiny_pipelines["inpaint"], data, tmp_path / "e", reward="rl_rewards:Brightness",
                         trust_weights=False)
    )  # fmt: skip
    assert plain.rollout(first_batch(plain)).weights is None
