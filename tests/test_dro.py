"""Diffusion-DRO: the official loss on the same inputs, negatives and targets recorded by the lagged
policy's sampler, the lagged copy's sync interval, a killed run that resumes bit-identical, and bad
input refused before training.

Run as a script, this file is the worker that a test kills:
``python tests/test_dro.py PIPELINE DATA OUT MAX_STEPS KILL_AT``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from diffalign.config import ConfigError
from diffalign.diffusion.online import LaggedPolicy, ReplayBuffer
from diffalign.diffusion.sampling import perturbed_timesteps, sample_with_trajectory
from diffalign.methods import get_method
from diffalign.training.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
from diffalign.training.state_files import load_state

WORKER = Path(__file__).resolve()
PROMPTS = ["a red square", "a blue circle", "a green cross", "a red ring"]


def experts(folder: Path, n: int = 6) -> Path:
    """An expert JSONL of ``n`` noise images with prompts."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        pixels = torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(i))
        Image.fromarray((pixels * 255).round().to(torch.uint8).numpy()).save(folder / "img" / f"{i}.png")
        rows.append({"prompt": PROMPTS[i % len(PROMPTS)], "image": f"img/{i}.png"})
    path = folder / "experts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(pipeline: str, data: Path, out: Path, caption_dropout: float = 0.0, **extra: Any) -> TrainConfig:
    options = {"rollout_steps": 3, "buffer_size": 4, **extra.pop("method_options", {})}
    return TrainConfig(
        method="dro", model=ModelConfig(pretrained=pipeline),
        data=DataConfig(path=data, resolution=32, caption_dropout=caption_dropout, hflip=False),
        method_options=options, output_dir=out, report_to=[], **{"batch_size": 4, **extra},
    )  # fmt: skip


def build(cfg: TrainConfig) -> Any:
    method = get_method("dro")(cfg)
    method.setup(torch.device("cpu"), torch.float32)
    return method


def batch_of(method: Any, n: int = 4) -> dict:
    dataset, collate = method.dataset()
    return collate([dataset[i] for i in range(n)])


def nudge(unet: torch.nn.Module, seed: int = 7) -> None:
    """Move a UNet off its starting weights (a loss with policy = reference is not a test)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))


def test_the_loss_is_the_official_formula_on_equal_inputs(tiny_pipelines, tmp_path: Path) -> None:
    """basiclab/DiffusionDRO train.py: one reference and one policy forward over [expert; sample]
    at one t per row, MSE means over C, H, W, ``max(diff + margin, 0).mean()``."""
    method = build(config(tiny_pipelines["sd"], experts(tmp_path / "d"), tmp_path / "out"))
    # three different UNets, as after some training: policy, reference, and the lagged sampler
    nudge(method.policy.unet, seed=7)
    nudge(method.lagged.policy.unet, seed=11)
    batch = batch_of(method)
    torch.manual_seed(1)
    method.buffer.push(method.rollout(batch["prompts"], batch["images"]))
    torch.manual_seed(2)
    drawn = method.buffer.draw(4)
    torch.manual_seed(3)
    loss, metrics = method.step(drawn)

    torch.manual_seed(3)  # the step's draws, in its order: one trajectory step per row, then eps
    rows = torch.arange(4)
    at = torch.randint(0, drawn["timesteps"].shape[1], (4,))
    noise = torch.randn(drawn["x0"].shape)
    t = drawn["timesteps"][rows, at]
    xt = torch.cat([method.policy.scheduler.add_noise(drawn["x0"], noise, t), drawn["latents"][rows, at]])
    eps = torch.cat([noise, drawn["predictions"][rows, at]])
    c, tt = drawn["cond.encoder_hidden_states"].repeat(2, 1, 1), t.repeat(2)
    with torch.no_grad():
        ref = method.policy.reference_unet(xt, tt, c).sample
        pol = method.policy.unet(xt, tt, c).sample
    expert0, policy0 = (ref - eps).square().mean(dim=[1, 2, 3]).chunk(2)
    expert, policy = (pol - eps).square().mean(dim=[1, 2, 3]).chunk(2)
    diff = (expert - expert0) - (policy - policy0)
    official = torch.maximum(diff + 0.001, torch.zeros_like(diff)).mean()
    assert float(official) > 0  # a loss of 0 on both sides would prove nothing
    assert abs(loss.item() - official.item()) < 1e-6
    assert metrics["dro/active_fraction"] == pytest.approx(float((diff + 0.001 > 0).float().mean()))
    assert metrics["mse/policy_expert"] == pytest.approx(float(expert.mean()), rel=1e-5)


def test_policy_targets_are_the_samplers_predictions_at_the_recorded_latents(
    tiny_pipelines, tmp_path: Path
) -> None:
    method = build(
        config(tiny_pipelines["sd"], experts(tmp_path / "d"), tmp_path / "out", caption_dropout=0.5)
    )
    nudge(method.policy.unet)  # the live policy differs: the rows must come from the lagged copy
    batch = batch_of(method)
    torch.manual_seed(5)
    rows = method.rollout(batch["prompts"], batch["images"])

    lagged = method.lagged.policy
    torch.manual_seed(5)  # the rollout's draws, in its order: dropout, VAE, schedules, x_T
    drop = torch.rand(4) < 0.5
    prompts = ["" if d else p for p, d in zip(batch["prompts"], drop.tolist(), strict=True)]
    assert 0 < int(drop.sum()) < 4  # the seed drops some prompts, not all
    x0 = lagged.encode_images(batch["images"])
    schedules = perturbed_timesteps(1000, 3, 4)
    traj = sample_with_trajectory(
        lagged, prompts, num_inference_steps=3, guidance_scale=1.0, sampler="dpmsolver++", eta=0.0,
        timesteps=schedules, height=32, width=32, decode=False,
    )  # fmt: skip
    assert torch.equal(rows["x0"], x0) and torch.equal(rows["timesteps"], schedules)
    assert torch.equal(rows["latents"], traj.latents[:, :3]) and torch.equal(
        rows["predictions"], traj.predictions
    )
    assert torch.equal(
        rows["cond.encoder_hidden_states"], lagged.encode_prompts(prompts).encoder_hidden_states
    )
    assert len({tuple(s) for s in schedules.tolist()}) > 1  # the schedules are shifted per sample
    # each recorded prediction is the lagged UNet's output at the recorded latent and timestep
    for j in range(3):
        with torch.no_grad():
            again = lagged.unet(
                rows["latents"][:, j], rows["timesteps"][:, j], rows["cond.encoder_hidden_states"]
            )
        assert torch.allclose(again.sample, rows["predictions"][:, j], atol=1e-5), j
        live = method.policy.unet(
            rows["latents"][:, j], rows["timesteps"][:, j], rows["cond.encoder_hidden_states"]
        )
        assert not torch.allclose(live.sample, rows["predictions"][:, j], atol=1e-3), j


def test_the_lagged_copy_syncs_at_its_interval_and_not_otherwise(tiny_pipelines) -> None:
    from diffalign.diffusion.policy import DiffusionPolicy

    live = DiffusionPolicy.from_pretrained(tiny_pipelines["sd"])
    lagged = LaggedPolicy(live, every=3)

    def weights(policy: DiffusionPolicy) -> torch.Tensor:
        return torch.cat([p.detach().flatten() for p in policy.unet.parameters()]).clone()

    held = weights(live)
    for step in range(1, 8):
        nudge(live.unet, seed=step)
        lagged.on_optimizer_step(step)
        if step % 3 == 0:
            held = weights(live)
        assert torch.equal(weights(lagged.policy), held), step
        assert not torch.equal(weights(lagged.policy), weights(live)) or step % 3 == 0, step
    # a checkpoint keeps the copy's weights only when they differ from the live policy's
    assert lagged.state_dict()["unet"] is not None  # step 7: synced at 6
    lagged.on_optimizer_step(9)
    state = lagged.state_dict()
    assert state["unet"] is None and state["synced_at"] == 9
    restored = LaggedPolicy(live, every=3)
    restored.load_state_dict(state)
    assert torch.equal(weights(restored.policy), weights(live))  # re-synced from the restored live weights
    with pytest.raises(ValueError, match="every 3 optimiser steps, this run every 2"):
        LaggedPolicy(live, every=2).load_state_dict(state)


def test_the_replay_buffer_keeps_the_newest_rows_and_draws_uniformly() -> None:
    buffer = ReplayBuffer(capacity=5)
    for start in (0, 3, 6):
        buffer.push({"x": torch.arange(start, start + 3), "y": torch.arange(start, start + 3) * 10})
    assert buffer.rows["x"].tolist() == [4, 5, 6, 7, 8] and buffer.rows["y"].tolist() == [40, 50, 60, 70, 80]
    torch.manual_seed(0)
    drawn = buffer.draw(5)
    assert sorted(drawn["x"].tolist()) == [4, 5, 6, 7, 8] and torch.equal(drawn["y"], drawn["x"] * 10)
    assert len(buffer.draw(12)["x"]) == 12  # more than it holds: with replacement
    with pytest.raises(ValueError, match="the buffer holds"):
        buffer.push({"x": torch.arange(2)})
    with pytest.raises(ValueError, match="holds 5 rows, this run's 4"):
        ReplayBuffer(4).load_state_dict(buffer.state_dict())
    with pytest.raises(ValueError, match="empty replay buffer"):
        ReplayBuffer(2).draw(1)


# -- kill and resume ---------------------------------------------------------------------------


def _run_config(pipeline: str, data: Path, out: Path, max_steps: int, **extra: Any) -> TrainConfig:
    # a buffer larger than a micro-batch (replays), two draws per rollout, a sync every 3 steps (so
    # checkpoints hold the lagged weights at some steps and not at others) and an EMA
    return config(
        pipeline, data, out, caption_dropout=0.3, max_steps=max_steps, checkpoint_every=2,
        keep_checkpoints=10, gradient_accumulation_steps=2, log_every=3, ema_decay=0.9, batch_size=2,
        optim=OptimConfig(lr=1e-3, schedule="constant"),
        method_options={"buffer_size": 5, "refresh_every": 2, "sync_every": 3}, **extra,
    )  # fmt: skip


def _final(method: Any, out: Path, step: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    export = out / "checkpoints" / f"checkpoint-{step}" / "export" / "unet"
    return {
        **{f"policy.{k}": v for k, v in method.policy.unet.state_dict().items()},
        **{f"lagged.{k}": v for k, v in method.lagged.policy.unet.state_dict().items()},
        **{f"ema.{k}": v for k, v in load_file(next(export.glob("*.safetensors"))).items()},
        **{f"buffer.{k}": v for k, v in method.buffer.rows.items()},
    }


def test_a_killed_run_resumes_bit_identical(tiny_pipelines, tmp_path: Path) -> None:
    """SIGKILL after a random optimiser step, then resume from the last checkpoint: policy, EMA
    export, lagged copy, replay buffer and logged losses equal the uninterrupted run's."""
    from diffalign.training.loop import run_training

    data = experts(tmp_path / "d")
    full = get_method("dro")(_run_config(tiny_pipelines["sd"], data, tmp_path / "full", 8))
    run_training(full)
    kill_at = random.choice([3, 5, 7])
    out = tmp_path / "killed"
    command = [sys.executable, str(WORKER), tiny_pipelines["sd"], str(data), str(out), "8", str(kill_at)]
    killed = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    latest = (kill_at - 1) // 2 * 2
    state = load_state(out / "checkpoints" / f"checkpoint-{latest}" / "method_state_0.safetensors")
    assert len(state["buffer"]["rows"]["x0"]) == min(5, 2 * latest)  # the checkpoint holds the buffer
    assert (state["lagged_policy"]["unet"] is None) == (latest % 3 == 0)
    resumed = get_method("dro")(_run_config(tiny_pipelines["sd"], data, out, 8, resume_from="latest"))
    assert run_training(resumed).global_step == 8
    a, b = _final(resumed, out, 8), _final(full, tmp_path / "full", 8)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), (key, kill_at)
    # logged every 3 steps, checkpointed every 2: a log window straddles the resume, and still
    # averages what the uninterrupted run's did
    logs = [
        [{k: v for k, v in json.loads(line).items() if k != "samples_per_second"} for line in lines]
        for lines in (
            (tmp_path / name / "metrics.jsonl").read_text().splitlines() for name in ("full", "killed")
        )
    ]
    assert [m["step"] for m in logs[0]] == [3, 6, 8] and logs[0] == logs[1]
    trained = json.loads((out / "config.json").read_text())["method_options"]
    assert trained["sync_every"] == 3 and trained["rollout_sampler"] == "dpmsolver++"  # defaults included


def test_a_resume_with_rollouts_of_another_shape_is_refused_before_anything_changes(
    tiny_pipelines, tmp_path: Path
) -> None:
    from diffalign.training.loop import run_training

    data, out = experts(tmp_path / "d"), tmp_path / "run"
    run_training(get_method("dro")(_run_config(tiny_pipelines["sd"], data, out, 4)))
    metrics = (out / "metrics.jsonl").read_text()
    cfg = _run_config(tiny_pipelines["sd"], data, out, 6, resume_from="latest")
    cfg.method_options["rollout_steps"] = 4
    with pytest.raises(ValueError, match=r"method_options\.rollout_steps=3 \(now 4\)"):
        run_training(get_method("dro")(cfg))
    assert (out / "metrics.jsonl").read_text() == metrics


def test_a_lagged_copy_in_another_precision_feeds_the_step(tiny_pipelines, tmp_path: Path) -> None:
    """Under mixed precision the lagged copy samples (and encodes prompts) in bfloat16 while the
    trained UNet is float32: the buffer's rows reach it in its own dtype."""
    method = get_method("dro")(config(tiny_pipelines["sd"], experts(tmp_path / "d"), tmp_path / "out"))
    method.setup(torch.device("cpu"), torch.bfloat16)
    batch = batch_of(method)
    method.buffer.push(method.rollout(batch["prompts"], batch["images"]))
    drawn = method.buffer.draw(4)
    assert drawn["cond.encoder_hidden_states"].dtype == torch.bfloat16
    loss, _ = method.step(drawn)
    assert torch.isfinite(loss)


def _worker(argv: list[str]) -> None:
    """Train until the hook of optimiser step KILL_AT, then SIGKILL this process."""
    pipeline, data, out, max_steps, kill_at = argv
    from diffalign.methods.dro import DiffusionDRO
    from diffalign.training.loop import run_training

    class Killed(DiffusionDRO):
        def on_optimizer_step(self, step: int) -> None:
            super().on_optimizer_step(step)
            if step == int(kill_at):
                os.kill(os.getpid(), signal.SIGKILL)

    run_training(Killed(_run_config(pipeline, Path(data), Path(out), int(max_steps))))


# -- bad input ---------------------------------------------------------------------------------


def test_a_buffer_the_run_cannot_fill_or_that_drops_samples_is_refused_before_loading(tmp_path: Path) -> None:
    data = experts(tmp_path / "d")
    # 10 steps x 1 micro-batch x 4 rows = 40 samples per process; the pipeline path does not exist,
    # so the error comes before any model loads
    cfg = config(
        "/nonexistent/pipeline", data, tmp_path / "o", max_steps=10, method_options={"buffer_size": 41}
    )
    with pytest.raises(ConfigError, match=r"buffer_size: 41 rows, but the run samples only 40 per process"):
        get_method("dro")(cfg)
    cfg = config(
        "/nonexistent/pipeline", data, tmp_path / "o", max_steps=10, method_options={"buffer_size": 3}
    )
    with pytest.raises(ConfigError, match="less than a micro-batch"):
        get_method("dro")(cfg)
    # 2 experts for a batch of 4: each rollout samples 2, so 2 steps fill 4 rows, not 8
    few = experts(tmp_path / "few", n=2)
    cfg = config("/nonexistent/pipeline", few, tmp_path / "o", max_steps=2, method_options={"buffer_size": 8})
    with pytest.raises(ConfigError, match=r"samples only 4 per process \(2 rollouts of 2 prompts"):
        get_method("dro")(cfg)


def test_experts_without_prompts_or_usable_images_are_refused(tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    Image.new("RGB", (32, 32)).save(folder / "a.png")
    (folder / "a.txt").write_text("a red square")
    Image.new("RGB", (32, 32)).save(folder / "b.png")  # no b.txt, no caption.txt
    with pytest.raises(ValueError, match=r"b\.png"):
        get_method("dro")(config("/nonexistent/pipeline", folder, tmp_path / "o1", max_steps=10))

    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("x", "y"):
        (broken / f"{name}.png").write_bytes(b"not an image")
    rows = [{"prompt": "a red square", "image": f"{n}.png"} for n in ("x", "y")]
    (broken / "experts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = config("/nonexistent/pipeline", broken / "experts.jsonl", tmp_path / "o2", max_steps=10)
    with pytest.raises(ValueError, match=r"x\.png"):  # data.on_bad_sample=error: the first broken image
        get_method("dro")(cfg)
    cfg.data.on_bad_sample = "skip"
    with pytest.raises(ValueError, match="no usable image"):
        get_method("dro")(cfg)


@pytest.mark.parametrize(
    ("objective", "message"), [("nca", "pick a pairwise one"), ("mappo", "chosen_rewards")]
)
def test_objectives_that_cannot_rank_an_expert_above_a_sample_are_refused(
    tmp_path: Path, objective: str, message: str
) -> None:
    cfg = config("/nonexistent/pipeline", experts(tmp_path / "d"), tmp_path / "o", max_steps=10)
    cfg.objective = {"name": objective}
    with pytest.raises(ValueError, match=message):
        get_method("dro")(cfg)


if __name__ == "__main__":
    _worker(sys.argv[1:])
