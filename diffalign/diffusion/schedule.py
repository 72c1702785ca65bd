"""Noise-schedule arithmetic shared by the sampler transitions, the likelihood and the inversion,
and the two checks that keep non-finite values from leaving the trajectory module.

Notation as diffusers' ``DDIMScheduler``: ``a_t = alphas_cumprod[t]`` (the DDIM paper's alpha_t),
``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps``, ``SNR(t) = a_t / (1 - a_t)``.

Zero-terminal-SNR schedules (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps
are Flawed"; diffusers' ``rescale_betas_zero_snr=True``) set ``a_T = 0``: x_T is pure noise. An
epsilon model then has no estimate of x_0 at T (``(x_T - eps) / 0``); v- and sample-prediction
models do. :func:`require_sampleable` turns that case into an error before any UNet call.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["predicted_x0_eps", "require_finite", "require_sampleable"]


def predicted_x0_eps(
    prediction_type: str, model_output: Tensor, sample: Tensor, alpha_t: Tensor
) -> tuple[Tensor, Tensor]:
    """``(x_0, eps)`` implied by a model output at ``sample = x_t`` with ``alpha_t = a_t``
    (broadcastable), for ``epsilon``, ``sample`` and ``v_prediction`` models (DDIM paper Eq. 12's
    x_0; ``v = sqrt(a) eps - sqrt(1 - a) x_0``, Salimans & Ho 2022)."""
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (sample - (1 - alpha_t).sqrt() * eps) / alpha_t.sqrt()
    elif prediction_type == "sample":
        x0 = model_output
        eps = (sample - alpha_t.sqrt() * x0) / (1 - alpha_t).sqrt()
    elif prediction_type == "v_prediction":
        x0 = alpha_t.sqrt() * sample - (1 - alpha_t).sqrt() * model_output
        eps = alpha_t.sqrt() * model_output + (1 - alpha_t).sqrt() * sample
    else:
        raise ValueError(f"unsupported prediction_type '{prediction_type}'")
    return x0, eps


def require_sampleable(scheduler, timesteps: Tensor, training_alphas: Tensor | None = None) -> None:
    """Raise ``ValueError`` if a timestep lies outside the schedule (diffusers' "leading" spacing
    with ``steps_offset=1`` reaches T at T sampling steps), or if an epsilon model would be asked
    for x_0 at a timestep with ``a_t = 0``, which is undefined. ``training_alphas``: the training
    schedule's ``alphas_cumprod`` when ``scheduler``'s own differ (DPM-Solver replaces ``a_T = 0``
    by 2**-24, which only turns the division by zero into a division by 2**-12)."""
    config = scheduler.config
    alphas = scheduler.alphas_cumprod if training_alphas is None else training_alphas
    t = timesteps.reshape(-1).long().to(alphas.device)
    if len(t) and not 0 <= int(t.min()) <= int(t.max()) < len(alphas):
        outside = int(t.max()) if int(t.max()) >= len(alphas) else int(t.min())
        spacing, offset = getattr(config, "timestep_spacing", None), getattr(config, "steps_offset", 0)
        raise ValueError(
            f"the sampler's timesteps reach {outside}, outside the schedule's [0, {len(alphas)}) "
            f"(timestep_spacing={spacing!r}, steps_offset={offset}): use fewer sampling steps"
        )
    if config.prediction_type != "epsilon":
        return
    zero = t[alphas[t] == 0]
    if len(zero):
        raise ValueError(
            f"an epsilon-prediction model cannot sample at timestep {int(zero[0])}, where alphas_cumprod "
            f"is 0 (rescale_betas_zero_snr={getattr(config, 'rescale_betas_zero_snr', None)}, "
            f"timestep_spacing={getattr(config, 'timestep_spacing', None)!r}): x_0 = (x_t - eps) / 0 is "
            "undefined there. Zero-terminal-SNR schedules are for v-prediction models; for this one set "
            "rescale_betas_zero_snr=False, or a timestep_spacing that does not start at the last "
            "timestep ('leading')"
        )


def require_finite(values: Tensor, what: str, steps: Tensor | None = None) -> None:
    """Raise ``FloatingPointError`` naming ``what`` if ``values`` has a NaN or inf. With ``steps``
    (one label per index of dim 1, e.g. the timesteps of a trajectory) the message names the
    first step where one appears. One device synchronisation."""
    finite = values.isfinite()
    if bool(finite.all()):
        return
    where = ""
    if steps is not None:
        bad_step = (~finite).flatten(2).any(2).any(0) if values.dim() > 2 else (~finite).any(0)
        first = int(bad_step.nonzero()[0])
        where = f" from step {first} (timestep {int(steps[first])}) on"
    kind = "NaN" if bool(values.isnan().any()) else "inf"
    raise FloatingPointError(
        f"{what} contains {kind}{where}: the model's output or the noise schedule is not finite there "
        "(fp16 overflow, a diverged model, or a schedule with alphas_cumprod = 0 or 1)"
    )
