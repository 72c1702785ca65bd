"""Sampler transitions as Gaussians, and sampling that records its trajectory.

``transition_stats`` gives the mean and standard deviation of ``p(x_{t-1} | x_t)`` under a
DDIM (eta > 0) or DDPM step, computed as diffusers' ``DDIMScheduler.step`` /
``DDPMScheduler.step`` compute them; ``step_logprob`` is the Gaussian log-density of a given
``x_{t-1}`` under it. ``sample_with_trajectory`` runs the sampler (the diffusers scheduler's own
``step`` does every update, so images equal the pipeline's under the same seed) and records the
latents, timesteps, guided predictions and per-step log-probabilities, on the sampler's own schedule
or on custom ones, one per sample if wanted (``perturbed_timesteps``: Diffusion-DRO's shifted
schedules); ``trajectory_logps`` recomputes chosen steps' log-probabilities with gradients (DDPO/PPO's
``log pi_theta``).

The log-density is the MEAN over latent dimensions, not the sum (as DDPO's code): a sum over
~16k dimensions turns per-dimension differences of 1e-3 into log-ratios of 16, whose exp
overflows PPO's importance ratios. Gradients flow through the mean only (``x_{t-1}`` is
detached): the density is a function of the policy's prediction at a fixed sample.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from diffalign.diffusion.policy import Conditioning, DiffusionPolicy, InpaintInputs
from diffalign.diffusion.schedule import predicted_x0_eps, require_finite, require_sampleable
from diffalign.rng import Generators

__all__ = [
    "Trajectory",
    "Transitions",
    "check_sampling",
    "gaussian_logp",
    "make_scheduler",
    "perturbed_timesteps",
    "sample_with_trajectory",
    "step_logprob",
    "trajectory_logps",
    "trajectory_transitions",
    "transition_stats",
]

SamplerName = Literal["ddim", "ddpm", "dpmsolver++"]


def make_scheduler(policy_or_config: DiffusionPolicy | dict, sampler: SamplerName):
    """A diffusers scheduler of the given kind on the policy's noise schedule."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    config = (
        policy_or_config.scheduler.config
        if isinstance(policy_or_config, DiffusionPolicy)
        else policy_or_config
    )
    if sampler == "ddim":
        return DDIMScheduler.from_config(config)
    if sampler == "ddpm":
        return DDPMScheduler.from_config(config)
    if sampler == "dpmsolver++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
    raise ValueError(f"unknown sampler '{sampler}' (choose ddim, ddpm or dpmsolver++)")


def _broadcast(values: Tensor, like: Tensor) -> Tensor:
    """(B,) or scalar values shaped to broadcast against ``like`` (B, C, H, W), in float32."""
    return values.to(like.device, torch.float32).reshape(-1, *([1] * (like.dim() - 1)))


def _clip_x0(scheduler, x0: Tensor) -> Tensor:
    if getattr(scheduler.config, "thresholding", False):
        return scheduler._threshold_sample(x0)
    if getattr(scheduler.config, "clip_sample", False):
        r = scheduler.config.clip_sample_range
        return x0.clamp(-r, r)
    return x0


def transition_stats(
    scheduler, model_output: Tensor, timestep: int | Tensor, sample: Tensor, eta: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Mean and std of ``x_{t-1} | x_t`` for a DDIM (with ``eta``) or DDPM scheduler.

    ``timestep`` is an int or a (B,) tensor; ``std`` broadcasts against ``sample``, 0 where the
    step is deterministic (DDPM's last step, DDIM with eta 0).
    """
    from diffusers import DDIMScheduler, DDPMScheduler

    if scheduler.num_inference_steps is None:
        raise ValueError("call scheduler.set_timesteps(...) before computing transitions")
    x = sample.float()
    out = model_output.float()
    acp = scheduler.alphas_cumprod
    t = torch.as_tensor(timestep, device=acp.device).long().reshape(-1)
    require_sampleable(scheduler, t)
    alpha_t = _broadcast(acp[t], x)
    if isinstance(scheduler, DDIMScheduler):
        prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        final = torch.as_tensor(float(scheduler.final_alpha_cumprod))
        alpha_prev = _broadcast(torch.where(prev_t >= 0, acp[prev_t.clamp(min=0)], final), x)
        x0, eps = predicted_x0_eps(scheduler.config.prediction_type, out, x, alpha_t)
        x0 = _clip_x0(scheduler, x0)
        variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
        std = eta * variance.sqrt()
        mean = alpha_prev.sqrt() * x0 + (1 - alpha_prev - std**2).clamp(min=0).sqrt() * eps
        return mean, std
    if isinstance(scheduler, DDPMScheduler):
        if scheduler.config.variance_type not in ("fixed_small", "fixed_small_log", "fixed_large"):
            raise ValueError(f"DDPM variance_type '{scheduler.config.variance_type}' is not supported")
        prev_t = torch.stack([torch.as_tensor(scheduler.previous_timestep(int(ti))) for ti in t]).to(
            acp.device
        )
        alpha_prev = _broadcast(torch.where(prev_t >= 0, acp[prev_t.clamp(min=0)], torch.ones(())), x)
        current_alpha = alpha_t / alpha_prev
        current_beta = 1 - current_alpha
        x0, _ = predicted_x0_eps(scheduler.config.prediction_type, out, x, alpha_t)
        x0 = _clip_x0(scheduler, x0)
        mean = (alpha_prev.sqrt() * current_beta / (1 - alpha_t)) * x0 + (
            current_alpha.sqrt() * (1 - alpha_prev) / (1 - alpha_t)
        ) * x
        if scheduler.config.variance_type == "fixed_large":
            variance = current_beta
        else:
            variance = ((1 - alpha_prev) / (1 - alpha_t) * current_beta).clamp(min=1e-20)
        std = torch.where(_broadcast(t, x) > 0, variance.sqrt(), 0.0)  # t = 0 adds no noise
        return mean, std
    raise ValueError(
        f"log-probs need a DDIM or DDPM scheduler, got {type(scheduler).__name__} "
        "(DPM-Solver++ is available for sampling without log-probs)"
    )


def step_logprob(
    scheduler,
    model_output: Tensor,
    timestep: int | Tensor,
    sample: Tensor,
    prev_sample: Tensor,
    eta: float = 1.0,
) -> Tensor:
    """Log-density of ``prev_sample`` under the sampler's Gaussian step from ``sample``: (B,),
    the mean over latent dimensions. Needs a stochastic step (DDIM eta > 0, DDPM with t > 0)."""
    if prev_sample.shape != sample.shape or model_output.shape != sample.shape:
        raise ValueError(
            f"shape mismatch: sample {tuple(sample.shape)}, prev_sample {tuple(prev_sample.shape)}, "
            f"model_output {tuple(model_output.shape)}"
        )
    mean, std = transition_stats(scheduler, model_output, timestep, sample, eta=eta)
    if not bool((std > 0).all()):
        raise ValueError(
            "this transition is deterministic (DDIM with eta = 0, or DDPM's last step): it has no "
            "log-density; use eta > 0"
        )
    logp = gaussian_logp(prev_sample, mean, std)
    require_finite(logp, "step_logprob")
    return logp


def gaussian_logp(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Mean over non-batch dims of log N(x; mean, std^2), with ``x`` detached: (B,)."""
    x = x.detach().float()
    logp = -((x - mean) ** 2) / (2 * std**2) - std.log() - 0.5 * math.log(2 * math.pi)
    return logp.mean(dim=tuple(range(1, logp.dim())))


def check_sampling(
    policy: DiffusionPolicy, sampler: SamplerName = "ddim", num_inference_steps: int = 50
) -> None:
    """Raise ``ValueError`` now if sampling with these settings is undefined (an epsilon model from a
    zero-terminal-SNR timestep), so that a run fails when it is built, not at its first samples."""
    scheduler = make_scheduler(policy, sampler)
    scheduler.set_timesteps(num_inference_steps)
    require_sampleable(scheduler, scheduler.timesteps, training_alphas=policy.scheduler.alphas_cumprod)


def perturbed_timesteps(
    num_train_timesteps: int,
    num_inference_steps: int,
    n: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Diffusion-DRO's per-sample shifted sampling schedules: (n, T) long, T = ``num_inference_steps``.

    With ``stride = num_train_timesteps // T`` and ``base = (T - 1, ..., 1, 0) * stride`` (950, 900, ..., 0
    for T = 20 and 1000 training steps), row i is ``base + offset_i`` with one offset per row drawn by
    ``torch.randint(0, stride, (n,), generator=generator)`` (on the generator's device; CPU without one):
    each row is strictly decreasing within [0, num_train_timesteps), and over many rows every training
    timestep is visited. Pass it as ``sample_with_trajectory(..., timesteps=...)``.

    Source: basiclab/DiffusionDRO ``train.py`` (``--buffer_perturb_timesteps``, on by default:
    ``step_ratio = num_train_timesteps // buffer_num_inference_steps``,
    ``perturb = torch.randint(0, step_ratio, (1, B))``), whose tensor is this one transposed, (T, B).

    Raises:
        ValueError: ``num_inference_steps`` < 1 or > ``num_train_timesteps``, or ``n`` < 1.
    """
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(
            f"num_inference_steps must lie in [1, num_train_timesteps = {num_train_timesteps}], "
            f"got {num_inference_steps}"
        )
    if n < 1:
        raise ValueError(f"n (the number of schedules) must be >= 1, got {n}")
    device = generator.device if generator is not None else torch.device("cpu")
    stride = num_train_timesteps // num_inference_steps
    base = torch.arange(num_inference_steps, device=device).flip(0) * stride
    offset = torch.randint(0, stride, (n,), generator=generator, device=device)
    return base + offset[:, None]


def _sampler_step(scheduler, pred: Tensor, t: Tensor, latents: Tensor, step_kwargs: dict) -> Tensor:
    """``scheduler.step``, except for a stochastic DDIM step from ``a_t = 0`` (zero terminal SNR):
    there diffusers takes ``sqrt(1 - a_prev - std^2)`` of a rounding error below 0 and returns NaN.
    That step is taken from ``transition_stats`` (which clamps it at 0) with the noise drawn as
    diffusers draws it, so the random stream, and every other step, stay the pipeline's."""
    from diffusers import DDIMScheduler
    from diffusers.utils.torch_utils import randn_tensor

    eta = step_kwargs.get("eta", 0.0)
    at_zero_snr = isinstance(scheduler, DDIMScheduler) and float(scheduler.alphas_cumprod[int(t)]) == 0
    if not (at_zero_snr and eta > 0):
        return scheduler.step(pred, t, latents, **step_kwargs, return_dict=False)[0]
    noise = randn_tensor(pred.shape, generator=step_kwargs["generator"], device=pred.device, dtype=pred.dtype)
    mean, std = transition_stats(scheduler, pred, t, latents, eta=eta)
    return (mean + std * noise).to(latents.dtype)


@dataclass
class Trajectory:
    """A recorded sampling run. ``latents[:, 0]`` is x_T, ``latents[:, -1]`` the final x_0. It keeps
    what :func:`trajectory_logps` needs to recompute each step: both conditionings, the guidance
    scale, the sampler and its eta. ``timesteps`` is (T,) when every sample ran one schedule (the
    sampler's own, or a custom (T,) one) and (N, T) when custom schedules were passed per sample
    (row i: sample i's timesteps, e.g. :func:`perturbed_timesteps`)."""

    images: Tensor  # (N, 3, H, W) in [0, 1]
    latents: Tensor  # (N, T + 1, C, h, w)
    timesteps: Tensor  # (T,) shared by every sample, or (N, T) per sample; long
    predictions: Tensor  # (N, T, C, h, w): the guided model outputs used by each step
    log_probs: Tensor | None  # (N, T), None for samplers without a Gaussian step
    conditioning: Conditioning
    unconditional: Conditioning | None  # guidance's negative branch; None when guidance_scale <= 1
    guidance_scale: float
    sampler: SamplerName
    eta: float  # DDIM's; DDPM's steps do not use it
    inpaint: InpaintInputs | None = None

    def select(self, rows: Tensor) -> Trajectory:
        """The trajectories of ``rows`` (R,) (indices into the batch), with their conditionings and
        inpainting inputs: what a PPO micro-batch recomputes."""
        rows = torch.as_tensor(rows).long()

        def take(x: Tensor) -> Tensor:
            return x[rows.to(x.device)]

        return Trajectory(
            images=take(self.images) if len(self.images) else self.images,
            latents=take(self.latents), predictions=take(self.predictions),
            timesteps=take(self.timesteps) if self.timesteps.dim() == 2 else self.timesteps,
            log_probs=None if self.log_probs is None else take(self.log_probs),
            conditioning=self.conditioning.map(take),
            unconditional=None if self.unconditional is None else self.unconditional.map(take),
            guidance_scale=self.guidance_scale, sampler=self.sampler, eta=self.eta,
            inpaint=None if self.inpaint is None else InpaintInputs(
                take(self.inpaint.mask), take(self.inpaint.masked_image_latents)
            ),
        )  # fmt: skip


@torch.no_grad()
def sample_with_trajectory(
    policy: DiffusionPolicy,
    prompts: list[str],
    *,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    sampler: SamplerName = "ddim",
    eta: float = 1.0,
    generator: Generators = None,
    latents: Tensor | None = None,
    height: int | None = None,
    width: int | None = None,
    image: Tensor | None = None,
    mask: Tensor | None = None,
    decode: bool = True,
    timesteps: Tensor | None = None,
) -> Trajectory:
    """Sample like ``StableDiffusion(XL|Inpaint)Pipeline.__call__`` and record the trajectory.

    The random draws happen in the pipeline's order (initial latents, then the masked image's
    VAE posterior sample for inpainting, then each stochastic step's noise), so the same
    ``generator`` seed gives the same images as the pipeline with the same scheduler class;
    ``generator`` may be a list with one per sample, as the pipelines take it.
    ``log_probs`` are recorded for DDIM with ``eta > 0`` and DDPM (0 for a deterministic step: DDPM's
    last, DDIM's from t = 0 without ``set_alpha_to_one``); DPM-Solver++ records none. ``latents``: x_T
    (N, C, h, w), drawn when not given; ``image`` (N, 3, H, W) in [0, 1] and ``mask`` (N, 1, H, W),
    1 = repaint, for inpainting UNets.

    ``timesteps``: custom schedules instead of the sampler's own: (T,) for every sample or (N, T), one
    per sample (Diffusion-DRO's shifted schedules, :func:`perturbed_timesteps`); integers, each row
    strictly decreasing within [0, num_train_timesteps), T = ``num_inference_steps``. DDIM steps from t
    to t - num_train_timesteps // T, so its rows must be spaced by exactly that stride (any offset is
    fine). Each step runs the UNet once on the batch, one timestep per row; then one scheduler per
    distinct schedule steps its rows, drawing its own noise (off the pipeline's random stream).
    ``Trajectory.timesteps`` is the (T,) or (N, T) passed, else the sampler's (T,).
    Raises ``ValueError`` on inputs that do not fit the model or a malformed ``timesteps`` (naming
    what is wrong), ``FloatingPointError`` if a latent or log-prob is not finite (naming the step).
    """
    if sampler == "ddim" and eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    groups, schedule = _schedule_groups(policy, sampler, num_inference_steps, timesteps, len(prompts))
    size = (
        height or policy.unet.config.sample_size * policy.vae_scale_factor,
        width or policy.unet.config.sample_size * policy.vae_scale_factor,
    )
    cond = policy.encode_prompts(prompts, image_size=size)
    uncond = policy.unconditional(len(prompts), image_size=size) if guidance_scale > 1.0 else None
    x_T = _initial_latents(policy, groups[0].scheduler, len(prompts), size, latents, generator)
    inpaint = _inpaint_inputs(policy, image, mask, generator)
    guide = (cond, uncond, guidance_scale, inpaint)
    per_row = schedule if len(groups) > 1 else None
    states, predictions, log_probs = _run_steps(policy, groups, x_T, guide, eta, generator, per_row)
    _require_finite_steps(states[:, 1:], "the sampled latents", schedule)
    if log_probs is not None:
        _require_finite_steps(log_probs, "the step log-probs", schedule)
    return Trajectory(
        images=policy.decode_latents(states[:, -1]) if decode else torch.empty(0),
        latents=states, timesteps=schedule, predictions=predictions, log_probs=log_probs,
        conditioning=cond, unconditional=uncond, guidance_scale=guidance_scale, sampler=sampler, eta=eta,
        inpaint=inpaint,
    )  # fmt: skip


@dataclass
class _Group:
    """Rows of a batch that share one timestep schedule, and the scheduler that steps them."""

    scheduler: Any
    rows: Tensor | None  # (R,) row indices on the sampling device; None: every row


def _schedule_groups(
    policy: DiffusionPolicy,
    sampler: SamplerName,
    num_inference_steps: int,
    timesteps: Tensor | None,
    n: int,
) -> tuple[list[_Group], Tensor]:
    """One scheduler per distinct schedule, each checked with ``require_sampleable``, and the schedule
    to record: the sampler's own (T,) when ``timesteps`` is None, else ``timesteps`` as passed, (T,) or
    (N, T), long on the policy's device. A single schedule is one group with ``rows = None``."""
    device = policy.device
    if timesteps is None:
        scheduler = make_scheduler(policy, sampler)
        scheduler.set_timesteps(num_inference_steps, device=device)
        groups, schedule = [_Group(scheduler, None)], scheduler.timesteps.clone()
    else:
        num_train = policy.scheduler.config.num_train_timesteps
        checked = _check_timesteps(timesteps, n, num_inference_steps, num_train, sampler)
        rows_of: dict[tuple[int, ...], list[int]] = {}
        for i, row in enumerate(checked.expand(n, -1).tolist()):
            rows_of.setdefault(tuple(row), []).append(i)
        groups = []
        for row, rows in rows_of.items():
            scheduler = make_scheduler(policy, sampler)
            _set_schedule(scheduler, list(row), device)
            shared = len(rows_of) == 1
            groups.append(_Group(scheduler, None if shared else torch.tensor(rows, device=device)))
        schedule = checked.to(device)
    for group in groups:
        require_sampleable(
            group.scheduler, group.scheduler.timesteps, training_alphas=policy.scheduler.alphas_cumprod
        )
    return groups, schedule


def _check_timesteps(
    timesteps: Tensor, n: int, num_inference_steps: int, num_train: int, sampler: SamplerName
) -> Tensor:
    """``timesteps`` as a CPU long tensor, (T,) or (N, T), after checking it; ``ValueError`` naming
    what is wrong: dtype, shape, length, range, order, or (DDIM) the spacing."""
    ts = torch.as_tensor(timesteps).detach().cpu()
    if ts.is_floating_point() or ts.is_complex() or ts.dtype == torch.bool:
        raise ValueError(f"timesteps must be an integer tensor, got dtype {ts.dtype}")
    if ts.dim() not in (1, 2) or (ts.dim() == 2 and ts.shape[0] != n):
        raise ValueError(
            f"timesteps must have shape (T,) or ({n}, T) (one row per prompt), got {tuple(ts.shape)}"
        )
    if ts.shape[-1] != num_inference_steps:
        raise ValueError(
            f"timesteps have T = {ts.shape[-1]} steps per row, "
            f"but num_inference_steps = {num_inference_steps}"
        )
    ts = ts.long()
    if bool(((ts < 0) | (ts >= num_train)).any()):
        raise ValueError(
            f"timesteps must lie in [0, {num_train}) (num_train_timesteps), got values from "
            f"{int(ts.min())} to {int(ts.max())}"
        )
    steps = ts.diff(dim=-1)
    if bool((steps >= 0).any()):
        rows = ts.reshape(-1, ts.shape[-1])
        bad = rows[(rows.diff(dim=-1) >= 0).any(1)][0]
        raise ValueError(f"timesteps must be strictly decreasing along each row, got {bad.tolist()}")
    stride = num_train // num_inference_steps
    if sampler == "ddim" and bool((steps != -stride).any()):
        got = sorted(set((-steps).flatten().tolist()))
        raise ValueError(
            f"DDIM steps from t to t - num_train_timesteps // num_inference_steps = t - {stride}: its "
            f"timesteps must be spaced by exactly {stride}, got steps of {got}"
        )
    return ts


def _set_schedule(scheduler, schedule: list[int], device: torch.device) -> None:
    """Give a fresh scheduler the custom ``schedule`` (strictly decreasing, checked)."""
    from diffusers import DDIMScheduler

    if isinstance(scheduler, DDIMScheduler):  # takes a count only; its step uses num_train // count
        scheduler.set_timesteps(len(schedule), device=device)
        scheduler.timesteps = torch.tensor(schedule, dtype=torch.long, device=device)
    else:  # DDPM, DPM-Solver++: a list, without num_inference_steps
        scheduler.set_timesteps(timesteps=schedule, device=device)
        scheduler.num_inference_steps = len(schedule)  # DDPM leaves it None; transition_stats needs it


def _inpaint_inputs(
    policy: DiffusionPolicy, image: Tensor | None, mask: Tensor | None, generator: Generators
) -> InpaintInputs | None:
    """The inpainting inputs (their VAE sample drawn from ``generator``), None for a text-to-image UNet."""
    if image is not None or mask is not None:
        if image is None or mask is None:
            raise ValueError("inpainting needs both `image` and `mask`")
        return policy.prepare_inpaint(image, mask, generator=generator)
    if policy.is_inpainting:
        raise ValueError("this is an inpainting UNet: pass `image` and `mask`")
    return None


def _require_finite_steps(values: Tensor, what: str, schedule: Tensor) -> None:
    """``require_finite`` labelled by timestep: ``schedule`` (T,), or (N, T) per row (the message then
    names the first row with a non-finite value, and that row's step)."""
    if schedule.dim() == 2:
        bad = ~values.isfinite().reshape(len(values), -1).all(1)
        if bool(bad.any()):
            row = int(bad.nonzero()[0])
            values, schedule, what = values[row : row + 1], schedule[row], f"{what} (sample {row})"
    require_finite(values, what, schedule)


def _initial_latents(
    policy: DiffusionPolicy,
    scheduler,
    n: int,
    size: tuple[int, int],
    latents: Tensor | None,
    generator: Generators,
) -> Tensor:
    """x_T as the pipelines draw it (``randn_tensor``), scaled by ``init_noise_sigma``."""
    from diffusers.utils.torch_utils import randn_tensor

    scale = policy.vae_scale_factor
    shape = (n, policy.latent_channels, size[0] // scale, size[1] // scale)
    if latents is None:
        latents = randn_tensor(shape, generator=generator, device=policy.device, dtype=policy.dtype)
    elif tuple(latents.shape) != shape:
        raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
    return latents.to(policy.device, policy.dtype) * scheduler.init_noise_sigma


def _run_steps(
    policy: DiffusionPolicy,
    groups: list[_Group],
    latents: Tensor,
    guide: tuple[Conditioning, Conditioning | None, float, InpaintInputs | None],
    eta: float,
    generator: Generators,
    per_row: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Denoise x_T (N, C, h, w) through the T timesteps of the groups' schedulers. ``guide``: the
    conditioning, its negative, the guidance scale and inpainting inputs. ``per_row``: the (N, T)
    schedule when there are several groups (the UNet then gets one timestep per row), else None (it
    gets the scalar timestep). Returns the latents (N, T + 1, C, h, w), the guided predictions
    (N, T, C, h, w) and, for Gaussian steps, the log-probs (N, T)."""
    from diffusers import DDIMScheduler, DDPMScheduler

    first = groups[0].scheduler
    is_ddim = isinstance(first, DDIMScheduler)
    step_kwargs = {"generator": generator, **({"eta": eta} if is_ddim else {})}
    record_logp = isinstance(first, DDPMScheduler) or (is_ddim and eta > 0)

    def scale(scheduler, t: Tensor, x: Tensor) -> Tensor:
        return scheduler.scale_model_input(x, t)

    def step(scheduler, t: Tensor, pred: Tensor, x: Tensor) -> Tensor:
        return _sampler_step(scheduler, pred, t, x, step_kwargs)

    def logp(scheduler, t: Tensor, pred: Tensor, x: Tensor, new: Tensor) -> Tensor:
        return _recorded_logp(scheduler, pred, t, x, new, eta)

    states, predictions, log_probs = [latents], [], []
    for j in range(len(first.timesteps)):
        model_input = _by_group(groups, j, scale, latents)
        t = first.timesteps[j] if per_row is None else per_row[:, j]
        pred = policy.guided_prediction(model_input, t, *guide)
        new_latents = _by_group(groups, j, step, pred, latents)
        if record_logp:
            log_probs.append(_by_group(groups, j, logp, pred, latents, new_latents))
        latents = new_latents
        states.append(latents)
        predictions.append(pred)
    recorded = torch.stack(log_probs, 1) if record_logp else None
    return torch.stack(states, 1), torch.stack(predictions, 1), recorded


def _by_group(groups: list[_Group], j: int, fn, *tensors: Tensor) -> Tensor:
    """``fn(scheduler, t, *parts)`` for each group at step ``j`` (``t``: its scheduler's j-th timestep,
    ``parts``: the group's rows of each (N, ...) tensor), put back in row order: (N, ...). A single
    group with ``rows = None`` gets the whole tensors."""
    if groups[0].rows is None:
        return fn(groups[0].scheduler, groups[0].scheduler.timesteps[j], *tensors)
    out = None
    for group in groups:
        part = fn(group.scheduler, group.scheduler.timesteps[j], *(x[group.rows] for x in tensors))
        if out is None:
            out = part.new_empty((len(tensors[0]), *part.shape[1:]))
        out[group.rows] = part
    return out


def _recorded_logp(
    scheduler, pred: Tensor, t: Tensor, latents: Tensor, new_latents: Tensor, eta: float
) -> Tensor:
    """The log-prob (B,) of one recorded step, 0 where it is deterministic (DDPM's last step, DDIM's
    from t = 0 to ``final_alpha_cumprod = alphas_cumprod[0]``)."""
    mean, std = transition_stats(scheduler, pred, t, latents, eta=eta)
    if not bool((std > 0).all()):
        return torch.zeros(len(latents), device=latents.device)
    return gaussian_logp(new_latents, mean, std)


@dataclass
class Transitions:
    """Chosen steps of a recorded trajectory recomputed under a policy (:func:`trajectory_transitions`),
    each (N, S, ...) in float32: row i, column k is sample i's k-th chosen step."""

    logps: Tensor  # (N, S): log p(x_{t-1} | x_t), the per-dimension mean; with gradients
    means: Tensor  # (N, S, C, h, w): the policy's transition means; with gradients
    recorded_means: (
        Tensor  # (N, S, C, h, w): the means of the steps as sampled (from the recorded predictions)
    )
    stds: Tensor  # (N, S): the transition standard deviations (the same for all three means)
    reference_means: Tensor | None = None  # (N, S, C, h, w): the reference model's, when asked for


def trajectory_logps(
    policy: DiffusionPolicy, trajectory: Trajectory, steps: Sequence[int] | Tensor | None = None
) -> Tensor:
    """``log p(x_{t-1} | x_t)`` of chosen steps of a recorded trajectory under ``policy``, with
    gradients to its UNet: (N, S) float32, the per-dimension mean as :func:`step_logprob`; the
    ``logps`` of :func:`trajectory_transitions`, which documents the arguments and errors."""
    return trajectory_transitions(policy, trajectory, steps).logps


def trajectory_transitions(
    policy: DiffusionPolicy,
    trajectory: Trajectory,
    steps: Sequence[int] | Tensor | None = None,
    reference: bool = False,
) -> Transitions:
    """Chosen steps of a recorded trajectory under ``policy``: their log-probs and transition means
    (with gradients to its UNet), and the means the sampler used (PPO's old policy's, from the
    recorded predictions; a KL or L1 term to them is a trust region).

    Step ``j`` recomputes the guided prediction at ``trajectory.latents[:, j]`` as sampling did
    (the trajectory's conditionings, guidance scale and inpainting inputs; a scheduler of its
    sampler with its T steps and eta) and scores the recorded ``latents[:, j + 1]``. With the
    policy that sampled, the log-probs equal ``trajectory.log_probs`` to float rounding; with another
    (PPO's trained policy on the old policy's samples) they are the importance ratio's numerator
    (DDPO, kvablack/ddpo-pytorch ``scripts/train.py``: ``ddim_step_with_logprob`` on the stored
    latents and next latents). ``steps``: indices into ``trajectory.timesteps``, (S,) for every
    sample or (N, S) per sample (DDPO trains each sample on its own random steps); default all T.
    All N*S transitions go through the UNet as one batch (twice the rows with guidance): pass
    fewer steps per call to bound memory. Call under grad; the recorded latents are constants.
    ``reference``: also the reference model's means at the same inputs (no grad; a KL to them keeps
    the policy near where it started, DPOK's regulariser).
    DDPM's last step from t = 1 (SD's ``steps_offset=1``) has std 1e-10 (diffusers' variance
    floor): its log-prob is finite but any change of the mean makes its ratio overflow; leave it out.

    Raises:
        ValueError: the trajectory's sampler has no Gaussian step (DPM-Solver++), a chosen step
            is deterministic (DDIM with eta 0, DDPM's last), ``steps`` is out of range or
            misshapen, ``policy``'s schedule gives other timesteps than the trajectory's, or the
            trajectory was sampled on per-sample (N, T) schedules (not supported here).
    """
    scheduler = _trajectory_scheduler(policy, trajectory)
    n, total = trajectory.latents.shape[0], len(trajectory.timesteps)
    device = trajectory.latents.device
    idx = _step_indices(steps, n, total).to(device)
    s = idx.shape[1]
    rows, cols = torch.arange(n, device=device).expand(s, n), idx.T  # step-major (S, N), as cat below
    x = trajectory.latents[rows, cols].flatten(0, 1)
    prev = trajectory.latents[rows, cols + 1].flatten(0, 1)
    t = trajectory.timesteps.to(device)[cols].flatten()
    uncond = trajectory.unconditional
    inputs = (
        scheduler.scale_model_input(x, t),
        t,
        Conditioning.cat([trajectory.conditioning] * s),
        None if uncond is None else Conditioning.cat([uncond] * s),
        trajectory.guidance_scale,
        None if trajectory.inpaint is None else trajectory.inpaint.repeat(s),
    )
    pred = policy.guided_prediction(*inputs)
    logps = step_logprob(scheduler, pred, t, x, prev, eta=trajectory.eta)
    mean, std = transition_stats(scheduler, pred, t, x, eta=trajectory.eta)
    recorded, _ = transition_stats(
        scheduler, trajectory.predictions[rows, cols].flatten(0, 1), t, x, eta=trajectory.eta
    )

    def by_sample(v: Tensor) -> Tensor:  # step-major rows back to (N, S, ...)
        return v.reshape(s, n, *v.shape[1:]).transpose(0, 1)

    anchor = None
    if reference:
        ref_mean, _ = transition_stats(
            scheduler, policy.guided_prediction(*inputs, reference=True), t, x, eta=trajectory.eta
        )
        anchor = by_sample(ref_mean)
    return Transitions(
        logps=by_sample(logps), means=by_sample(mean), recorded_means=by_sample(recorded.detach()),
        stds=by_sample(std.expand(len(x), *std.shape[1:]).flatten(1)[:, 0]), reference_means=anchor,
    )  # fmt: skip


def _trajectory_scheduler(policy: DiffusionPolicy, trajectory: Trajectory):
    """A scheduler of the trajectory's sampler on its (T,) schedule; ``ValueError`` as
    :func:`trajectory_transitions` says."""
    if trajectory.timesteps.dim() != 1:
        raise ValueError(
            f"trajectory_logps does not support per-sample schedules: this trajectory's timesteps are "
            f"{tuple(trajectory.timesteps.shape)} (N, T), one row per sample; it needs the sampler's own "
            "(T,) schedule"
        )
    if trajectory.sampler not in ("ddim", "ddpm"):
        raise ValueError(f"a '{trajectory.sampler}' trajectory has no per-step log-probs (use ddim or ddpm)")
    total = len(trajectory.timesteps)
    scheduler = make_scheduler(policy, trajectory.sampler)
    scheduler.set_timesteps(total, device=trajectory.latents.device)
    if not torch.equal(scheduler.timesteps.cpu(), trajectory.timesteps.cpu()):
        raise ValueError(
            f"the policy's {trajectory.sampler} schedule with {total} steps has timesteps "
            f"{scheduler.timesteps.tolist()[:3]}..., the trajectory {trajectory.timesteps.tolist()[:3]}..."
        )
    return scheduler


def _step_indices(steps: Sequence[int] | Tensor | None, n: int, total: int) -> Tensor:
    """``steps`` as an (N, S) long tensor of indices in [0, total); ``ValueError`` otherwise."""
    idx = torch.arange(total) if steps is None else torch.as_tensor(steps).cpu()
    if idx.is_floating_point() or idx.dim() not in (1, 2):
        raise ValueError(
            f"steps must be integer indices, (S,) or ({n}, S), got {idx.dtype} {tuple(idx.shape)}"
        )
    idx = idx.long().expand(n, -1) if idx.dim() == 1 else idx.long()
    if idx.shape[0] != n or idx.shape[1] == 0:
        raise ValueError(f"steps must be (S,) or ({n}, S) with S >= 1, got {tuple(idx.shape)}")
    if bool(((idx < 0) | (idx >= total)).any()):
        raise ValueError(
            f"steps must lie in [0, {total}) (the trajectory's steps), got {idx.unique().tolist()}"
        )
    return idx
