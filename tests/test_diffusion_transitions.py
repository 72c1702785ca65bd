"""Sampler transitions: means and stds equal diffusers' step; the log-density is a Gaussian's."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor

from diffalign.diffusion.sampling import step_logprob, transition_stats

CONFIG = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1}


def inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("eta", [0.3, 1.0])
@pytest.mark.parametrize("clip_sample", [False, True])
def test_ddim_mean_and_std_equal_diffusers(prediction_type: str, eta: float, clip_sample: bool) -> None:
    sch = DDIMScheduler(
        **CONFIG, prediction_type=prediction_type, clip_sample=clip_sample, set_alpha_to_one=False
    )
    sch.set_timesteps(10)
    sample, out = inputs()
    for t in sch.timesteps:
        zero = torch.zeros_like(sample)
        expected_mean = sch.step(out, t, sample, eta=eta, variance_noise=zero).prev_sample
        prev_t = int(t) - sch.config.num_train_timesteps // sch.num_inference_steps
        expected_std = eta * sch._get_variance(t, torch.tensor(prev_t)) ** 0.5
        mean, std = transition_stats(sch, out, t, sample, eta=eta)
        torch.testing.assert_close(mean, expected_mean, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(std.flatten(), expected_std.float().reshape(1), atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_small_log", "fixed_large"])
def test_ddpm_mean_and_std_equal_diffusers(prediction_type: str, variance_type: str) -> None:
    sch = DDPMScheduler(
        **CONFIG, prediction_type=prediction_type, variance_type=variance_type, clip_sample=True
    )
    sch.set_timesteps(8)
    sample, out = inputs(1)
    for t in sch.timesteps:
        prev = sch.step(out, t, sample, generator=torch.Generator().manual_seed(3)).prev_sample
        noise = randn_tensor(sample.shape, generator=torch.Generator().manual_seed(3))
        mean, std = transition_stats(sch, out, t, sample)
        # the scheduler's sample is mean + std * noise for the noise its generator drew
        torch.testing.assert_close(mean + std * noise, prev, atol=1e-6, rtol=1e-5)


def test_log_density_is_the_mean_of_normal_log_probs() -> None:
    sch = DDIMScheduler(**CONFIG, clip_sample=False, set_alpha_to_one=False)
    sch.set_timesteps(10)
    sample, out = inputs(2)
    t = sch.timesteps[3]
    prev = sch.step(out, t, sample, eta=1.0, generator=torch.Generator().manual_seed(0)).prev_sample
    mean, std = transition_stats(sch, out, t, sample, eta=1.0)
    expected = torch.distributions.Normal(mean, std).log_prob(prev).mean(dim=(1, 2, 3))
    torch.testing.assert_close(step_logprob(sch, out, t, sample, prev, eta=1.0), expected)


def test_per_sample_timesteps() -> None:
    sch = DDIMScheduler(**CONFIG, clip_sample=False, set_alpha_to_one=False)
    sch.set_timesteps(10)
    sample, out = inputs(3)
    ts = sch.timesteps[[0, 4, 9]]
    prev = torch.randn_like(sample)
    together = step_logprob(sch, out, ts, sample, prev)
    apart = torch.cat(
        [step_logprob(sch, out[i : i + 1], ts[i], sample[i : i + 1], prev[i : i + 1]) for i in range(3)]
    )
    torch.testing.assert_close(together, apart)


def test_gradient_flows_through_the_mean_only() -> None:
    sch = DDIMScheduler(**CONFIG, clip_sample=False, set_alpha_to_one=False)
    sch.set_timesteps(10)
    sample, out = inputs(4)
    out.requires_grad_()
    prev = torch.randn_like(sample).requires_grad_()
    step_logprob(sch, out, sch.timesteps[2], sample, prev).sum().backward()
    assert out.grad is not None and bool(out.grad.abs().sum() > 0)
    assert prev.grad is None


def test_deterministic_transitions_have_no_log_density() -> None:
    sch = DDIMScheduler(**CONFIG, clip_sample=False, set_alpha_to_one=False)
    sch.set_timesteps(10)
    sample, out = inputs(5)
    with pytest.raises(ValueError, match=r"deterministic.*eta > 0"):
        step_logprob(sch, out, sch.timesteps[0], sample, sample, eta=0.0)
    with pytest.raises(ValueError, match="shape mismatch"):
        step_logprob(sch, out, sch.timesteps[0], sample, sample[:, :2])
    with pytest.raises(ValueError, match="set_timesteps"):
        transition_stats(DDIMScheduler(**CONFIG), out, 10, sample)
