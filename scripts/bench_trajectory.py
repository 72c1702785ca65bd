"""Benchmark: the cost of recording a trajectory, and of DDIM vs ReNoise inversion.

Writes JSON (stdout and ``--output``):
- ``sampling``: images/s of a plain ``StableDiffusionPipeline`` call and of
  ``sample_with_trajectory`` at the same steps, sampler (DDIM, eta 1), guidance and seed,
  interleaved in ``--repeats`` rounds of windows of at least ``--min-seconds`` and
  ``--min-steps`` calls (``bench_common.interleaved``), and ``overhead`` = pipeline's rate over
  the trajectory's - 1, round by round (median, min, max; target: median <= 0.05);
- ``inversion``: seconds, UNet calls and reconstruction error of DDIM inversion and ReNoise
  (K = 1) at the same number of steps, and of DDIM inversion at the same number of UNet calls.

``--model tiny`` (default) uses the tiny test pipeline; ``--model sd15`` an SD1.5-sized UNet
(random weights from SD1.5's config, 64x64 latents) with a small text encoder and VAE, meant for
a GPU (``--device cuda``).

    python scripts/bench_trajectory.py --output outputs/bench_trajectory.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import bench_common as bench
import torch


def timed(fn, repeats: int, sync) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "sd15"], default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-seconds", type=float, default=10.0)
    parser.add_argument("--min-steps", type=int, default=50, help="sampling calls per window at least")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()

    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    from diffalign.diffusion.inversion import renoise_invert
    from diffalign.diffusion.policy import DiffusionPolicy
    from diffalign.diffusion.sampling import make_scheduler, sample_with_trajectory
    from diffalign.diffusion.tiny import SD15_UNET_CONFIG, build_tiny_pipeline

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    torch.set_grad_enabled(False)
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    folder = Path(tempfile.mkdtemp())
    unet_config = SD15_UNET_CONFIG if args.model == "sd15" else None
    build_tiny_pipeline(folder, unet_config=unet_config)
    policy = DiffusionPolicy.from_pretrained(folder, torch_dtype=dtype, device=device)
    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler(policy, "ddim")
    prompts = [f"a red cat number {i}" for i in range(args.batch)]
    common = {"num_inference_steps": args.steps, "guidance_scale": 5.0}

    def run_pipeline() -> None:
        pipe(prompts, eta=1.0, generator=torch.Generator(device).manual_seed(0), output_type="pt", **common)

    def run_trajectory() -> None:
        sample_with_trajectory(
            policy, prompts, eta=1.0, generator=torch.Generator(device).manual_seed(0), **common
        )

    rates = bench.interleaved(
        {"pipeline": run_pipeline, "sample_with_trajectory": run_trajectory},
        dict.fromkeys(("pipeline", "sample_with_trajectory"), args.batch),
        device.type, args.repeats, args.min_seconds, args.min_steps, warmup=1,
    )  # fmt: skip
    slowdown = bench.ratio(rates, "pipeline", "sample_with_trajectory")

    traj = sample_with_trajectory(
        policy,
        prompts,
        eta=0.0,
        generator=torch.Generator(device).manual_seed(1),
        **{**common, "guidance_scale": 1.0},
    )
    x0, cond = traj.latents[:, -1], traj.conditioning

    def reconstruction_error(latents_T: torch.Tensor, steps: int) -> float:
        """Denoise the inverted x_T with DDIM (eta 0) at the inversion's steps; MSE to x_0."""
        sch = make_scheduler(policy, "ddim")
        sch.set_timesteps(steps, device=device)
        x = latents_T
        for t in sch.timesteps:
            x = sch.step(policy.unet_forward(x, t, cond), t, x).prev_sample
        return float((x.float() - x0.float()).pow(2).mean())

    inversion = {}
    for name, steps, renoise in (
        ("ddim_same_steps", args.steps, 0),
        ("renoise_k1_same_steps", args.steps, 1),
        ("ddim_same_unet_calls", 2 * args.steps, 0),
    ):

        def invert(steps: int = steps, renoise: int = renoise):  # type: ignore[no-untyped-def]
            return renoise_invert(policy, x0, cond, num_inference_steps=steps, renoise_steps=renoise)

        result = invert()
        inversion[name] = {
            "seconds": timed(invert, args.repeats, sync),
            "steps": steps,
            "unet_calls": result.unet_calls,
            "reconstruction_mse": reconstruction_error(result.latents[:, -1], steps),
        }
    report = {
        "model": args.model,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "dtype": args.dtype,
        "unet_parameters": sum(p.numel() for p in policy.unet.parameters()),
        "batch": args.batch,
        "steps": args.steps,
        "sampling": {
            "images_per_second": rates,
            "overhead": {k: slowdown[k] - 1 for k in ("median", "min", "max")},
            "target_overhead": 0.05,
        },
        "inversion": inversion,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)


if __name__ == "__main__":
    main()
