"""Recovering the trajectory of a given image: DDIM inversion and ReNoise.

A DDIM step from timestep ``s`` down to ``p`` (eta = 0) is affine in the noise estimate
``e = eps_theta(x_s, s)``:
``x_p = phi x_s + psi e`` with ``phi = sqrt(a_p / a_s)``, ``psi = sqrt(1 - a_p) - phi sqrt(1 - a_s)``.
Inverting it for ``x_s`` needs ``e`` at the unknown ``x_s``:

- DDIM inversion evaluates it at the known ``x_p`` instead (``eps_theta(x_p, s)``);
- ReNoise (Garibi et al. 2024, Algorithm 1) iterates the fixed point
  ``x_s^(k) = (x_p - psi eps_theta(x_s^(k-1), s)) / phi`` from ``x_s^(0) = x_p`` for K renoise
  iterations, and averages the noise estimates over a configurable range of iterations (the
  step is affine, so averaging estimates is averaging the ``x_s^(k)``). With K = 1 and both
  estimates averaged this is what SmPO's training code does.

Both solve for ``x_s`` in a form that stays finite when ``a_s = 0`` (zero-terminal-SNR
schedules), where the step's limit is ``x_T = e``. Stochastic samplers add ``sigma z`` to each
step; given the noises ``z`` of a recorded run (``step_noises``), the same inversion subtracts
them (``x_p - sigma z - psi e``) with the eta-dependent ``psi``. Both functions use the DDIM
timesteps of ``num_inference_steps``, so that denoising the last latent with ``DDIMScheduler``
(same steps, eta 0) walks the inverted trajectory back. They return latents from ``x_0`` to
``x_T``: (N, T + 1, C, h, w).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from diffalign.diffusion.policy import Conditioning, DiffusionPolicy, InpaintInputs
from diffalign.diffusion.sampling import make_scheduler
from diffalign.diffusion.schedule import predicted_x0_eps, require_finite

__all__ = ["Inversion", "ddim_invert", "renoise_invert"]


@dataclass
class Inversion:
    latents: Tensor  # (N, T + 1, C, h, w): x_0, then increasingly noisy, the last is x_T
    timesteps: Tensor  # (T,) ascending: the timestep of latents[:, 1:]
    unet_calls: int  # UNet evaluations per sample (per guidance branch)


@torch.no_grad()
def renoise_invert(
    policy: DiffusionPolicy,
    latents: Tensor,
    cond: Conditioning,
    *,
    num_inference_steps: int = 50,
    renoise_steps: int = 1,
    average_range: tuple[int, int] | None = None,
    guidance_scale: float = 1.0,
    uncond: Conditioning | None = None,
    inpaint: InpaintInputs | None = None,
    eta: float = 0.0,
    step_noises: Tensor | None = None,
    below: int | None = None,
) -> Inversion:
    """ReNoise inversion of clean ``latents`` (N, C, h, w) into a trajectory up to x_T, or, with
    ``below``, only through the timesteps under ``below`` (SmPO inverts up to its sampled ``t``;
    none is then an empty trajectory: ``latents[:, 0]`` alone).

    ``renoise_steps`` K >= 0 (K = 0 is DDIM inversion). The noise estimates of iterations
    ``average_range = (first, last)`` (inclusive, within 0..K; default all) are averaged for the
    final inverse step. ``step_noises`` (N, T, C, h, w): the noise each forward step added, in
    sampling order, for stochastic samplers (``eta > 0``).
    """
    first, last = _checked_arguments(policy, latents, num_inference_steps, renoise_steps, average_range)
    if eta > 0 and step_noises is None:  # the sampler's own noise cannot be estimated
        raise ValueError("inverting a stochastic sampler (eta > 0) needs the `step_noises` of its run")
    scheduler = make_scheduler(policy, "ddim")
    scheduler.set_timesteps(num_inference_steps, device=latents.device)
    down = scheduler.timesteps  # sampling order: high to low
    if step_noises is not None and step_noises.shape[:2] != (latents.shape[0], len(down)):
        raise ValueError(f"step_noises must be (N, {len(down)}, ...), got {tuple(step_noises.shape)}")
    acp = scheduler.alphas_cumprod.to(latents.device, torch.float32)
    stride = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    x = latents.float()
    states = [x]
    calls = 0
    for i in reversed(range(len(down))):  # from the last sampling step (lowest t) upwards
        s = down[i]
        if below is not None and int(s) >= below:
            break
        p = int(s) - stride
        a_s = acp[s]
        a_p = acp[p] if p >= 0 else torch.as_tensor(float(scheduler.final_alpha_cumprod))
        sigma = eta * ((1 - a_p) / (1 - a_s) * (1 - a_s / a_p)).sqrt()
        known = x - (sigma * step_noises[:, i].float() if step_noises is not None else 0.0)
        estimate = x  # x_s^(0) = x_p
        noise_estimates = []
        for _ in range(renoise_steps + 1):
            e = _epsilon(policy, estimate, s, cond, uncond, guidance_scale, inpaint)
            calls += 1
            noise_estimates.append(e)
            estimate = _solve_for_x_s(known, e, a_s, a_p, sigma)
        x = _solve_for_x_s(known, torch.stack(noise_estimates[first : last + 1]).mean(0), a_s, a_p, sigma)
        states.append(x)
    trajectory = torch.stack(states, 1)
    timesteps = down.flip(0)[: len(states) - 1]
    require_finite(trajectory[:, 1:], "the inverted latents", timesteps)
    return Inversion(trajectory.to(latents.dtype), timesteps, calls)


def _checked_arguments(
    policy: DiffusionPolicy,
    latents: Tensor,
    num_inference_steps: int,
    renoise_steps: int,
    average_range: tuple[int, int] | None,
) -> tuple[int, int]:
    """The iterations to average, ``(first, last)``, once the arguments are checked.

    Raises:
        ValueError: naming the argument out of range (a step count below 1 would invert nothing).
    """
    if latents.dim() != 4 or latents.shape[1] != policy.latent_channels:
        raise ValueError(
            f"latents must be (N, {policy.latent_channels}, h, w), got shape {tuple(latents.shape)}"
        )
    if num_inference_steps < 1 or renoise_steps < 0:
        raise ValueError(
            f"num_inference_steps must be >= 1 and renoise_steps >= 0, got {num_inference_steps} "
            f"and {renoise_steps}"
        )
    first, last = average_range if average_range is not None else (0, renoise_steps)
    if not 0 <= first <= last <= renoise_steps:
        raise ValueError(
            f"average_range must satisfy 0 <= first <= last <= {renoise_steps}, got {average_range}"
        )
    return first, last


def ddim_invert(
    policy: DiffusionPolicy,
    latents: Tensor,
    cond: Conditioning,
    *,
    num_inference_steps: int = 50,
    guidance_scale: float = 1.0,
    uncond: Conditioning | None = None,
    inpaint: InpaintInputs | None = None,
) -> Inversion:
    """Plain DDIM inversion: ReNoise with no renoise iterations."""
    return renoise_invert(
        policy, latents, cond, num_inference_steps=num_inference_steps, renoise_steps=0,
        guidance_scale=guidance_scale, uncond=uncond, inpaint=inpaint,
    )  # fmt: skip


def _solve_for_x_s(known: Tensor, e: Tensor, a_s: Tensor, a_p: Tensor, sigma: Tensor) -> Tensor:
    """``x_s`` from ``known = x_p - sigma z = phi x_s + psi e``, as
    ``sqrt(a_s / a_p) (known - sqrt(1 - a_p - sigma^2) e) + sqrt(1 - a_s) e``: the same value as
    ``(known - psi e) / phi``, but a_s = 0 (a zero-terminal-SNR x_T) gives its limit ``x_s = e``
    instead of inf / inf."""
    return (a_s / a_p).sqrt() * (known - (1 - a_p - sigma**2).clamp(min=0).sqrt() * e) + (1 - a_s).sqrt() * e


def _epsilon(
    policy: DiffusionPolicy,
    x: Tensor,
    t: Tensor,
    cond: Conditioning,
    uncond: Conditioning | None,
    guidance_scale: float,
    inpaint: InpaintInputs | None,
) -> Tensor:
    """The (guided) noise estimate at (x, t), whatever the model predicts."""
    out = policy.guided_prediction(x.to(policy.dtype), t, cond, uncond, guidance_scale, inpaint).float()
    alpha = policy.scheduler.alphas_cumprod.to(x.device, torch.float32)[t]
    return predicted_x0_eps(policy.prediction_type, out, x, alpha)[1]
