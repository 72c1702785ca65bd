"""``denoising_logp``: the denoising-error (ELBO) proxy for an image's log-likelihood.
``denoising_logp_at`` scores the same proxy at noisy latents and targets the caller made.

For K candidate images of each of B prompts, one timestep ``t`` and one noise ``eps`` are drawn
per prompt and shared by its K candidates and by the policy and the reference (Diffusion-DPO
requires this: the comparison is between candidates, not between noise draws). All B*K
candidates go through the UNet in one forward. The per-candidate error is the per-element MEAN
squared error between the prediction and its target (``eps`` for epsilon, the velocity for
v-prediction, ``x_0`` for sample prediction), as the official Diffusion-DPO code computes it.

Scale: ``logp = -0.5 * w(t) * mse``. With the constant weighting, ``w = 1``, the ``dpo``
objective at Diffusion-DPO's beta (5000 for SD1.5) then reproduces the official loss
``-logsigmoid(-0.5 * beta * ((mse_w - mse_l) - (ref_w - ref_l)))`` exactly, because the DPO
bracket ``(logp_w - ref_logp_w) - (logp_l - ref_logp_l)`` equals ``-0.5 * (model_diff - ref_diff)``
(the paper's Eq. 14 with T folded into beta; its supplement derives the 1/2).
``weighting="min_snr"`` multiplies by Min-SNR-gamma weights (Hang et al. 2023), normalised per
prediction type so that the weight is ``min(SNR, gamma) / SNR`` for epsilon, ``/(SNR + 1)`` for
v-prediction and ``min(SNR, gamma)`` for sample prediction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from diffalign import rng
from diffalign.diffusion.policy import Conditioning, DiffusionPolicy, InpaintInputs
from diffalign.diffusion.schedule import require_finite
from diffalign.rng import Generators

__all__ = ["DenoisingLogp", "denoising_logp", "denoising_logp_at", "denoising_target"]


@dataclass
class DenoisingLogp:
    policy: Tensor  # (B, K), differentiable
    reference: Tensor | None  # (B, K), no grad
    policy_mse: Tensor  # (B, K)
    reference_mse: Tensor | None
    timesteps: Tensor  # (B,)
    noise: Tensor | None  # (B, C, h, w), shared by each prompt's K candidates; None from denoising_logp_at


def denoising_target(policy: DiffusionPolicy, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """What the UNet is trained to predict at ``x_t = add_noise(latents, noise, t)``."""
    kind = policy.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return policy.scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise ValueError(f"unsupported prediction_type '{kind}'")


def _weights(policy: DiffusionPolicy, timesteps: Tensor, weighting: str, gamma: float) -> Tensor:
    if weighting == "constant":
        return torch.ones(timesteps.shape, device=timesteps.device)
    if weighting != "min_snr":
        raise ValueError(f"unknown weighting '{weighting}' (choose constant or min_snr)")
    acp = policy.scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = acp / (1 - acp)
    clipped = snr.clamp(max=gamma)
    kind = policy.prediction_type
    if kind == "epsilon":  # min(SNR, gamma) / SNR, written so that SNR = 0 gives its limit 1
        return torch.where(snr < gamma, torch.ones_like(snr), gamma / snr)
    return {"v_prediction": clipped / (snr + 1), "sample": clipped}[kind]


def _check_candidates(policy: DiffusionPolicy, latents: Tensor, name: str) -> None:
    if latents.dim() != 5:
        raise ValueError(f"{name} must be (B, K, C, h, w), got shape {tuple(latents.shape)}")
    if latents.shape[2] != policy.latent_channels:
        raise ValueError(
            f"{name} have {latents.shape[2]} channels, the UNet predicts {policy.latent_channels}"
        )


def denoising_logp(
    policy: DiffusionPolicy,
    latents: Tensor,
    cond: Conditioning,
    *,
    with_reference: bool = True,
    timesteps: Tensor | None = None,
    noise: Tensor | None = None,
    generator: Generators = None,
    weighting: Literal["constant", "min_snr"] = "constant",
    snr_gamma: float = 5.0,
    inpaint: InpaintInputs | None = None,
) -> DenoisingLogp:
    """Log-likelihood proxies of K candidates per prompt, at forward-noised latents.

    ``latents``: (B, K, C, h, w) scaled VAE latents; ``cond``: B rows (one per prompt);
    ``inpaint``: B rows. ``timesteps`` (B,) and ``noise`` (B, C, h, w) are drawn from
    ``generator`` when not given (uniform over the training timesteps, standard normal; one
    generator, one per prompt, or None: torch's global one).
    ``x_t = add_noise(x_0, noise, t)`` and the target of the prediction type are scored by
    :func:`denoising_logp_at`. Raises ``ValueError`` on shapes that do not fit, or without a
    reference when ``with_reference``.
    """
    _check_candidates(policy, latents, "latents")
    if with_reference:
        policy.require_reference()  # before any random draw or UNet call
    b, k = latents.shape[:2]
    device = latents.device
    if timesteps is None:
        timesteps = rng.randint(policy.scheduler.config.num_train_timesteps, b, generator, device)
    if noise is None:
        noise = rng.randn(latents[:, 0].shape, generator, device, latents.dtype)
    if timesteps.shape != (b,) or noise.shape != latents[:, 0].shape:
        raise ValueError(
            f"timesteps must be ({b},) and noise {tuple(latents[:, 0].shape)}, got "
            f"{tuple(timesteps.shape)} and {tuple(noise.shape)}"
        )
    flat, t_flat = latents.flatten(0, 1), timesteps.repeat_interleave(k)
    noise_flat = noise.repeat_interleave(k, dim=0)
    noisy = policy.scheduler.add_noise(flat, noise_flat, t_flat).reshape(latents.shape)
    target = denoising_target(policy, flat, noise_flat, t_flat).reshape(latents.shape)
    out = denoising_logp_at(
        policy, noisy, target, timesteps, cond, with_reference=with_reference, weighting=weighting,
        snr_gamma=snr_gamma, inpaint=inpaint,
    )  # fmt: skip
    out.noise = noise
    return out


def denoising_logp_at(
    policy: DiffusionPolicy,
    noisy_latents: Tensor,
    targets: Tensor,
    timesteps: Tensor,
    cond: Conditioning,
    *,
    with_reference: bool = True,
    weighting: Literal["constant", "min_snr"] = "constant",
    snr_gamma: float = 5.0,
    inpaint: InpaintInputs | None = None,
) -> DenoisingLogp:
    """Log-likelihood proxies at given noisy latents and targets, as :func:`denoising_logp` scores.

    For methods whose ``x_t`` is not a forward-noised ``x_0``: SmPO inverts ``x_0`` with ReNoise
    to ``z`` and trains towards ``(z - sqrt(a_t) x_0) / sqrt(1 - a_t)`` at ``(z, t)`` (official
    ``JaydenLyh/SmPO`` ``train.py``). ``noisy_latents`` and ``targets``: (B, K, C, h, w) (the
    target in the policy's prediction type); ``timesteps``: (B,), one per prompt, shared by its
    K candidates; ``cond`` and ``inpaint``: B rows. ``logp = -0.5 * w(t) * mse`` (per-element
    mean); the reference, under no-grad, sees the same inputs. The result's ``noise`` is None.
    Raises ``ValueError`` on shapes that do not fit, or without a reference when
    ``with_reference``; ``FloatingPointError`` naming the timestep if a log-prob is not finite.
    """
    _check_candidates(policy, noisy_latents, "noisy_latents")
    b, k = noisy_latents.shape[:2]
    if targets.shape != noisy_latents.shape or timesteps.shape != (b,):
        raise ValueError(
            f"targets must be shaped like noisy_latents {tuple(noisy_latents.shape)} and timesteps "
            f"({b},), got {tuple(targets.shape)} and {tuple(timesteps.shape)}"
        )
    if len(cond) != b:
        raise ValueError(f"conditioning has {len(cond)} rows for {b} prompts")
    if with_reference:
        policy.require_reference()  # before the policy's forward, not after it
    # candidate-major, as the official code's [winners; losers]: the same batch layout makes the
    # UNet's float arithmetic identical, so beta 5000 does not amplify layout-dependent rounding
    noisy = noisy_latents.transpose(0, 1).flatten(0, 1)
    target = targets.transpose(0, 1).flatten(0, 1).float()
    t_flat = timesteps.repeat(k)
    cond_flat = Conditioning.cat([cond] * k)
    inpaint_flat = inpaint.repeat(k) if inpaint is not None else None
    weight = _weights(policy, timesteps, weighting, snr_gamma)[:, None]

    def logp_of(prediction: Tensor) -> tuple[Tensor, Tensor]:
        mse = ((prediction.float() - target) ** 2).mean(dim=(1, 2, 3)).reshape(k, b).T
        return -0.5 * weight * mse, mse

    policy_logp, policy_mse = logp_of(policy.unet_forward(noisy, t_flat, cond_flat, inpaint_flat))
    ref_logp = ref_mse = None
    if with_reference:
        ref_logp, ref_mse = logp_of(
            policy.unet_forward(noisy, t_flat, cond_flat, inpaint_flat, reference=True)
        )
    both = policy_logp.detach() if ref_logp is None else torch.cat([policy_logp.detach(), ref_logp], 1)
    require_finite(both.T, "denoising_logp", timesteps)  # names the prompt's timestep
    return DenoisingLogp(policy_logp, ref_logp, policy_mse, ref_mse, timesteps, None)
