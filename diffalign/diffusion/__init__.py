"""Likelihoods of diffusion models: the estimators every diffusion method builds on.

Everything public is importable from here (``from diffalign.diffusion import DiffusionPolicy,
denoising_logp, sample_with_trajectory, ...``). Importing it loads torch only: diffusers,
transformers and peft are imported inside the functions that use them.
"""

from diffalign.diffusion.inversion import Inversion, ddim_invert, renoise_invert
from diffalign.diffusion.likelihood import DenoisingLogp, denoising_logp, denoising_logp_at, denoising_target
from diffalign.diffusion.policy import (
    Conditioning,
    DiffusionPolicy,
    InpaintInputs,
    attention_backend_available,
)
from diffalign.diffusion.sampling import (
    Trajectory,
    Transitions,
    check_sampling,
    gaussian_logp,
    make_scheduler,
    perturbed_timesteps,
    sample_with_trajectory,
    step_logprob,
    trajectory_logps,
    trajectory_transitions,
    transition_stats,
)
from diffalign.diffusion.schedule import predicted_x0_eps, require_finite, require_sampleable
from diffalign.diffusion.tiny import SD15_UNET_CONFIG, build_tiny_pipeline, tiny_text_encoder, tiny_tokenizer

__all__ = [
    "SD15_UNET_CONFIG",
    "Conditioning",
    "DenoisingLogp",
    "DiffusionPolicy",
    "InpaintInputs",
    "Inversion",
    "Trajectory",
    "Transitions",
    "attention_backend_available",
    "build_tiny_pipeline",
    "check_sampling",
    "ddim_invert",
    "denoising_logp",
    "denoising_logp_at",
    "denoising_target",
    "gaussian_logp",
    "make_scheduler",
    "perturbed_timesteps",
    "predicted_x0_eps",
    "renoise_invert",
    "require_finite",
    "require_sampleable",
    "sample_with_trajectory",
    "step_logprob",
    "tiny_text_encoder",
    "tiny_tokenizer",
    "trajectory_logps",
    "trajectory_transitions",
    "transition_stats",
]
