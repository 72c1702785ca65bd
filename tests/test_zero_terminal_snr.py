"""Zero-terminal-SNR schedules (`rescale_betas_zero_snr=True`, `timestep_spacing="trailing"`, so
`alphas_cumprod[999] = 0`): every value the trajectory module returns is finite and right, or the
call is an error before any UNet call; and no NaN leaves the module without an error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffalign.diffusion.inversion import ddim_invert, renoise_invert
from diffalign.diffusion.likelihood import denoising_logp
from diffalign.diffusion.policy import DiffusionPolicy
from diffalign.diffusion.sampling import make_scheduler, sample_with_trajectory, transition_stats
from diffalign.diffusion.tiny import build_tiny_pipeline

ZERO_SNR = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
SAMPLERS = [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 1.0), ("dpmsolver++", 0.0)]


@pytest.fixture(scope="module")
def zero_snr(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("zero_snr")
    return {
        kind: build_tiny_pipeline(root / kind, prediction_type=kind, scheduler_options=ZERO_SNR)
        for kind in ("epsilon", "v_prediction")
    }


def load(zero_snr: dict[str, Path], kind: str) -> DiffusionPolicy:
    policy = DiffusionPolicy.from_pretrained(zero_snr[kind])
    assert float(policy.scheduler.alphas_cumprod[999]) == 0.0
    return policy


def counting_unet(policy: DiffusionPolicy, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    forward = policy.unet_forward

    def count(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls[0] += 1
        return forward(*args, **kwargs)

    monkeypatch.setattr(policy, "unet_forward", count)
    return calls


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_min_snr_weight_takes_its_limit_at_zero_snr(zero_snr, kind: str) -> None:
    policy = load(zero_snr, kind)
    cond = policy.encode_prompts(["a", "b"])
    latents = torch.randn(2, 2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([999, 999])
    out = denoising_logp(policy, latents, cond, with_reference=False, timesteps=t, weighting="min_snr")
    assert bool(out.policy.isfinite().all())
    # epsilon: min(SNR, 5) / SNR -> 1 as SNR -> 0; v-prediction: min(SNR, 5) / (SNR + 1) = 0
    expected = -0.5 * out.policy_mse if kind == "epsilon" else torch.zeros_like(out.policy)
    torch.testing.assert_close(out.policy.detach(), expected.detach())


@pytest.mark.parametrize(("sampler", "eta"), SAMPLERS)
def test_epsilon_sampling_from_zero_snr_is_an_error_before_any_unet_call(
    zero_snr, sampler: str, eta: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = load(zero_snr, "epsilon")
    calls = counting_unet(policy, monkeypatch)
    with pytest.raises(ValueError, match=r"cannot sample at timestep 999.*rescale_betas_zero_snr=True"):
        sample_with_trajectory(policy, ["a"], num_inference_steps=4, sampler=sampler, eta=eta)
    assert calls[0] == 0
    scheduler = make_scheduler(policy, "ddim")
    scheduler.set_timesteps(4)
    x = torch.randn(1, 4, 16, 16)
    with pytest.raises(ValueError, match="cannot sample at timestep 999"):
        transition_stats(scheduler, x, 999, x, eta=1.0)


@pytest.mark.parametrize(("sampler", "eta", "steps"), [(s, e, 4) for s, e in SAMPLERS] + [("ddim", 1.0, 50)])
def test_v_prediction_samples_from_zero_snr(zero_snr, sampler: str, eta: float, steps: int) -> None:
    """diffusers' own DDIM step from a_T = 0 with eta > 0 is NaN at most step counts (50 among them):
    sqrt(1 - a_prev - std^2) of a rounding error below 0."""
    policy = load(zero_snr, "v_prediction")
    traj = sample_with_trajectory(
        policy, ["a", "b"], num_inference_steps=steps, sampler=sampler, eta=eta, guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert int(traj.timesteps[0]) == 999
    assert bool(traj.latents.isfinite().all()) and bool(traj.images.isfinite().all())
    if traj.log_probs is not None:
        assert bool(traj.log_probs.isfinite().all())


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_inversion_into_zero_snr_is_the_noise_estimate(zero_snr, kind: str) -> None:
    """The last DDIM-inversion step into a_T = 0 has the limit x_T = eps_hat(x_749, 999)."""
    policy = load(zero_snr, kind)
    cond = policy.encode_prompts(["a", "b"])
    x0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    inv = ddim_invert(policy, x0, cond, num_inference_steps=4)
    assert inv.timesteps.tolist() == [249, 499, 749, 999]
    assert bool(inv.latents.isfinite().all())
    x_p = inv.latents[:, -2]
    with torch.no_grad():
        out = policy.unet_forward(x_p, torch.tensor(999), cond)
    eps_hat = out if kind == "epsilon" else x_p  # v: eps = sqrt(0) v + sqrt(1) x = x
    torch.testing.assert_close(inv.latents[:, -1], eps_hat, atol=1e-5, rtol=1e-5)
    renoised = renoise_invert(policy, x0, cond, num_inference_steps=4, renoise_steps=2)
    assert bool(renoised.latents.isfinite().all())


def test_a_nan_from_the_model_is_an_error_naming_the_step(
    tiny_pipelines, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = DiffusionPolicy.from_pretrained(tiny_pipelines["sd"])
    forward, calls = policy.unet_forward, [0]

    def diverging(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls[0] += 1
        out = forward(*args, **kwargs)
        return out * float("nan") if calls[0] >= 3 else out

    monkeypatch.setattr(policy, "unet_forward", diverging)
    with pytest.raises(FloatingPointError, match=r"sampled latents contains NaN from step 2 \(timestep"):
        sample_with_trajectory(policy, ["a"], num_inference_steps=4, guidance_scale=1.0)
    cond = policy.encode_prompts(["a"])
    with pytest.raises(FloatingPointError, match="denoising_logp contains NaN"):
        denoising_logp(policy, torch.randn(1, 2, 4, 16, 16), cond, with_reference=False)
    with pytest.raises(FloatingPointError, match="inverted latents contains NaN"):
        ddim_invert(policy, torch.randn(1, 4, 16, 16), cond, num_inference_steps=4)


def test_a_run_that_could_not_draw_its_validation_samples_is_refused_when_built(
    zero_snr, tmp_path: Path
) -> None:
    from script_loader import load_script

    from diffalign.config import load_config
    from diffalign.methods import get_method
    from diffalign.training.config import TrainConfig

    pairs = load_script("make_tiny_assets").make_pairs(tmp_path, n_pairs=2)
    args = ["method=diffusion_dpo", f"model.pretrained={zero_snr['epsilon']}", f"data.path={pairs}",
            "data.resolution=32", "validation_every=100", "validation_prompts=[a cat]"]  # fmt: skip
    with pytest.raises(ValueError, match=r"validation_every: the validation samples cannot be drawn: .*999"):
        get_method("diffusion_dpo")(load_config(TrainConfig, None, args))
    get_method("diffusion_dpo")(load_config(TrainConfig, None, args[:-2]))  # training itself is defined


@pytest.mark.parametrize(("sampler", "steps"), [("ddim", 1000), ("dpmsolver++", 999)])
def test_sampling_steps_whose_timesteps_leave_the_schedule_are_an_error(
    tiny_pipelines, sampler: str, steps: int
) -> None:
    """diffusers' "leading" spacing with steps_offset=1 (SD's) reaches timestep T = 1000 at 1000
    steps: named before any UNet call, not an IndexError from inside the schedule (a tester's find,
    through Diffusion-DRO's rollout_steps and the validation grids' validation_steps alike)."""
    from diffalign.diffusion.sampling import check_sampling

    policy = DiffusionPolicy.from_pretrained(tiny_pipelines["sd"])
    assert policy.scheduler.config.steps_offset == 1
    with pytest.raises(ValueError, match=r"timesteps reach 1000, outside the schedule's \[0, 1000\)"):
        check_sampling(policy, sampler, steps)
    check_sampling(policy, sampler, 500)  # within the schedule
