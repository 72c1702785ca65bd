"""The estimators other methods build on: a frozen policy copy, the denoising log-likelihood at
given noisy latents, and per-step log-probs of a recorded trajectory with gradients."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from diffalign.diffusion import (
    DiffusionPolicy,
    denoising_logp,
    denoising_logp_at,
    make_scheduler,
    sample_with_trajectory,
    step_logprob,
    trajectory_logps,
)

PROMPTS = ["a red cat", "two blue dogs"]


def inputs(policy: DiffusionPolicy, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, object]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([20, 700]), policy.encode_prompts(PROMPTS)


# -- frozen copies -------------------------------------------------------------------------


@pytest.mark.parametrize("lora", [False, True])
def test_frozen_copy_keeps_its_weights_until_synced(tiny_pipelines, lora: bool) -> None:
    live = DiffusionPolicy.from_pretrained(tiny_pipelines["sd"])
    base_out = live.unet_forward(*inputs(live)).detach()
    if lora:
        live.add_lora(rank=4)
        with torch.no_grad():  # adapters away from their zero init, so that they change the output
            for name, p in live.unet.named_parameters():
                if "lora_B" in name:
                    p.add_(0.05 * torch.randn_like(p))
    frozen = live.frozen_copy()
    assert frozen.vae is live.vae and frozen.scheduler is live.scheduler
    assert all(a is b for a, b in zip(frozen.text_encoders, live.text_encoders, strict=True))
    assert (
        frozen.tokenizers == live.tokenizers and frozen.train_unet is None and frozen.reference_unet is None
    )
    live_storage = {p.data_ptr() for p in live.unet.parameters()}
    assert not live_storage & {p.data_ptr() for p in frozen.unet.parameters()}
    assert not any(p.requires_grad for p in frozen.unet.parameters()) and not frozen.unet.training

    x, t, cond = inputs(live)
    at_copy = frozen.unet_forward(x, t, cond)
    torch.testing.assert_close(at_copy, live.unet_forward(x, t, cond).detach(), atol=0, rtol=0)
    assert lora == (not torch.allclose(at_copy, base_out))  # LoRA's effective weights came along

    trainable = [p for p in live.unet.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=10.0)
    latents = torch.randn(2, 2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    denoising_logp(live, latents, cond, with_reference=False).policy.sum().neg().backward()
    optimizer.step()
    moved = live.unet_forward(x, t, cond).detach()
    assert (moved - at_copy).abs().max() > 1e-3  # the step changed the live UNet...
    assert torch.equal(frozen.unet_forward(x, t, cond), at_copy)  # ...and not the copy

    frozen.load_unet_from(live)
    torch.testing.assert_close(frozen.unet_forward(x, t, cond), moved, atol=0, rtol=0)
    assert not any(p.requires_grad for p in frozen.unet.parameters())
    with pytest.raises(ValueError, match="own UNet"):
        frozen.load_unet_from(frozen)


def test_sampling_through_a_frozen_copy_never_runs_the_live_unet(tiny_pipelines) -> None:
    live = DiffusionPolicy.from_pretrained(tiny_pipelines["sd"])
    calls: list[str] = []
    original = live.unet.forward
    # as accelerate's mixed precision may leave it: an instance-level forward over the live method
    live.unet.forward = lambda *a, **k: (calls.append("live forward"), original(*a, **k))[1]
    frozen = live.frozen_copy()

    class Wrapper(torch.nn.Module):  # stands in for the DDP module the training loop prepared
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            calls.append("train_unet")
            return self.module(*args, **kwargs)

    live.train_unet = Wrapper(live.unet)
    common = {"num_inference_steps": 3, "guidance_scale": 3.0, "eta": 1.0}
    traj = sample_with_trajectory(frozen, PROMPTS, generator=torch.Generator().manual_seed(0), **common)
    assert calls == []
    expected = sample_with_trajectory(live, PROMPTS, generator=torch.Generator().manual_seed(0), **common)
    assert calls[:2] == ["train_unet", "live forward"]  # the spies see the live policy's calls
    torch.testing.assert_close(traj.latents, expected.latents, atol=0, rtol=0)
    # the live policy's log-probs of the copy's samples: PPO's ratio numerator, 1 at sync
    torch.testing.assert_close(
        trajectory_logps(live, traj, [1]).detach(), traj.log_probs[:, [1]], atol=1e-5, rtol=1e-5
    )


# -- denoising_logp at given noisy latents -------------------------------------------------


@pytest.mark.parametrize("kind", ["sd", "sd_v"])
def test_denoising_logp_at_forward_noised_latents_equals_denoising_logp(tiny_pipelines, kind: str) -> None:
    policy = DiffusionPolicy.from_pretrained(tiny_pipelines[kind])
    policy.make_reference("copy")
    with torch.no_grad():  # the policy differs from its reference
        for p in policy.unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 2, 4, 16, 16, generator=g)
    eps = torch.randn(3, 4, 16, 16, generator=g)
    t = torch.tensor([3, 480, 990])
    cond = policy.encode_prompts(["a", "b c", "d"])
    expected = denoising_logp(policy, latents, cond, timesteps=t, noise=eps, weighting="min_snr")

    x0, eps_k, t_k = latents.flatten(0, 1), eps.repeat_interleave(2, 0), t.repeat_interleave(2)
    noisy = policy.scheduler.add_noise(x0, eps_k, t_k).reshape(latents.shape)
    target = eps_k if kind == "sd" else policy.scheduler.get_velocity(x0, eps_k, t_k)
    got = denoising_logp_at(policy, noisy, target.reshape(latents.shape), t, cond, weighting="min_snr")
    for field in ("policy", "reference", "policy_mse", "reference_mse"):
        assert torch.equal(getattr(got, field), getattr(expected, field)), field
    assert got.noise is None and torch.equal(got.timesteps, t)
    assert not torch.allclose(got.policy, got.reference)  # two models, not one twice

    # the given target is the one scored: SmPO's inverted latents come with their own
    shifted = denoising_logp_at(
        policy, noisy, target.reshape(latents.shape) + 0.1, t, cond, with_reference=False
    )
    assert not torch.allclose(shifted.policy, got.policy) and shifted.reference is None
    shifted.policy.sum().backward()
    assert policy.unet.conv_in.weight.grad is not None and policy.unet.conv_in.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="targets must be shaped like noisy_latents"):
        denoising_logp_at(policy, noisy, target, t, cond)
    with pytest.raises(ValueError, match=r"noisy_latents must be \(B, K, C, h, w\)"):
        denoising_logp_at(policy, noisy[:, 0], target, t, cond)


# -- per-step log-probs of a recorded trajectory ----------------------------------------------


@pytest.mark.parametrize(
    ("kind", "sampler", "guidance", "steps"),
    [("sd", "ddim", 3.0, [0, 2, 3]), ("sd", "ddpm", 3.0, [0, 2]), ("inpaint", "ddim", 1.0, [1, 3])],
)
def test_trajectory_logps_are_the_recorded_transitions_with_gradients(
    tiny_pipelines, kind: str, sampler: str, guidance: float, steps: list[int]
) -> None:
    policy = DiffusionPolicy.from_pretrained(tiny_pipelines[kind])
    g = torch.Generator().manual_seed(5)
    extra = {"image": torch.rand(2, 3, 32, 32, generator=g), "mask": torch.zeros(2, 1, 32, 32)}
    extra["mask"][..., 8:24, 4:20] = 1
    traj = sample_with_trajectory(
        policy, PROMPTS, num_inference_steps=4, guidance_scale=guidance, sampler=sampler, eta=0.7,
        generator=torch.Generator().manual_seed(0), **(extra if kind == "inpaint" else {}),
    )  # fmt: skip
    logps = trajectory_logps(policy, traj, steps)
    assert logps.shape == (2, len(steps)) and logps.requires_grad
    torch.testing.assert_close(logps.detach(), traj.log_probs[:, steps], atol=1e-5, rtol=1e-5)

    # step_logprob on the same inputs, with the guided prediction written out branch by branch
    scheduler = make_scheduler(policy, sampler)
    scheduler.set_timesteps(4)
    for j, s in enumerate(steps):
        x, t = traj.latents[:, s], traj.timesteps[s]
        pred = policy.unet_forward(x, t, traj.conditioning, traj.inpaint)
        if guidance > 1:
            uncond = policy.unet_forward(x, t, traj.unconditional, traj.inpaint)
            pred = uncond + guidance * (pred - uncond)
        expected = step_logprob(scheduler, pred, t, x, traj.latents[:, s + 1], eta=0.7)
        torch.testing.assert_close(logps[:, j], expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(expected, traj.log_probs[:, s - 1 if s else s + 1])  # steps differ

    logps.sum().backward()
    grads = [p.grad for p in policy.unet.parameters()]
    assert all(grad is not None for grad in grads) and sum(float(grad.abs().sum()) for grad in grads) > 0


def test_trajectory_logps_per_sample_steps_and_errors(tiny_pipelines) -> None:
    policy = DiffusionPolicy.from_pretrained(tiny_pipelines["sd"])
    traj = sample_with_trajectory(
        policy, PROMPTS, num_inference_steps=4, guidance_scale=2.0, generator=torch.Generator().manual_seed(1)
    )
    per_sample = torch.tensor([[3, 0], [1, 2]])  # each sample its own steps, as DDPO draws them
    with torch.no_grad():
        got = trajectory_logps(policy, traj, per_sample)
    torch.testing.assert_close(got, traj.log_probs.gather(1, per_sample), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"steps must lie in \[0, 4\)"):
        trajectory_logps(policy, traj, [4])
    with pytest.raises(ValueError, match=r"steps must be \(S,\) or \(2, S\)"):
        trajectory_logps(policy, traj, torch.zeros(3, 1, dtype=torch.long))
    deterministic = sample_with_trajectory(policy, PROMPTS, num_inference_steps=2, eta=0.0)
    with pytest.raises(ValueError, match="deterministic"):
        trajectory_logps(policy, deterministic)
    dpm = sample_with_trajectory(policy, PROMPTS, num_inference_steps=2, sampler="dpmsolver++", decode=False)
    with pytest.raises(ValueError, match="'dpmsolver\\+\\+' trajectory has no per-step log-probs"):
        trajectory_logps(policy, dpm)


def test_the_package_exports_the_estimators_and_imports_no_model_library() -> None:
    code = (
        "import sys; from diffalign.diffusion import DiffusionPolicy, denoising_logp, renoise_invert, "
        "sample_with_trajectory, step_logprob, trajectory_logps; "
        "print(sorted(m for m in ('diffusers', 'transformers', 'peft') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
