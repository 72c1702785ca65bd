"""Seconds per training step of SmPO next to Diffusion-DPO, same model, pairs, batch and seed,
measured in one run: SmPO inverting with the current policy (the paper), and with the frozen
reference whose inversions are cached per image (cold: the first step, which fills the cache;
warm: the steps after it).

    python scripts/bench_smpo.py [--model tiny|sd15] [--device cpu|cuda] [--output outputs/bench_smpo.json]

A step is the method's ``step`` (encode, invert, policy and reference forwards, loss) and the
backward, on one batch of ``--batch`` pairs at ``--resolution`` px; the first ``--warmup`` steps
are not timed; the variants' steps are interleaved, and the report gives each one's median, min
and max. SmPO draws one timestep per step, and its cost depends on how many of its
``--inversion-steps`` lie below it: every method runs the same seeds, so the same timesteps.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def _pairs(folder: Path, n: int, size: int) -> Path:
    from PIL import Image

    (folder / "img").mkdir(parents=True)
    rows = []
    for i in range(n):
        for side in "cr":
            pixels = torch.rand(size, size, 3, generator=torch.Generator().manual_seed(2 * i + (side == "r")))
            Image.fromarray((pixels * 255).to(torch.uint8).numpy()).save(folder / "img" / f"{i}{side}.png")
        rows.append({
            "prompt": "a red square", "chosen": f"img/{i}c.png", "rejected": f"img/{i}r.png",
            "chosen_reward": 0.5 + 0.4 * (i % 2), "rejected_reward": 0.3,
        })  # fmt: skip
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _method(name: str, pipeline: Path, data: Path, args: argparse.Namespace, **options: Any) -> Any:
    from diffalign.methods import get_method
    from diffalign.training.config import DataConfig, ModelConfig, TrainConfig

    cfg = TrainConfig(
        method=name, model=ModelConfig(pretrained=str(pipeline)),
        data=DataConfig(path=data, resolution=args.resolution, caption_dropout=0.0, hflip=False),
        method_options=options, output_dir=data.parent / "out", report_to=[],
    )  # fmt: skip
    method = get_method(name)(cfg)
    method.setup(torch.device(args.device), torch.float32)
    return method


def _step_seconds(method: Any, batch: dict, seed: int, device: str) -> float:
    """Wall seconds of one step and its backward (the device synchronised around it)."""
    torch.manual_seed(seed)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    loss, _ = method.step(batch)
    loss.backward()
    method.policy.unet.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _summary(times: list[float], warmup: int) -> dict[str, float]:
    timed = times[warmup:]
    return {
        "first_step": times[0], "median": statistics.median(timed), "min": min(timed), "max": max(timed),
        "mean": statistics.fmean(timed),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "sd15"], default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=4, help="pairs per step")
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="px (default: 32 tiny, 128 sd15: the tiny VAE halves, so SD1.5's 64x64 latents)",
    )
    parser.add_argument("--inversion-steps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--output", type=Path, default=Path("outputs/bench_smpo.json"))
    args = parser.parse_args()
    if min(args.batch, args.steps, args.inversion_steps) < 1 or args.warmup < 0:
        parser.error("--batch, --steps and --inversion-steps must be >= 1, --warmup >= 0")
    args.resolution = args.resolution or (32 if args.model == "tiny" else 128)
    from diffalign.diffusion.tiny import SD15_UNET_CONFIG, build_tiny_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        unet = dict(SD15_UNET_CONFIG, sample_size=args.resolution // 2) if args.model == "sd15" else None
        pipeline = build_tiny_pipeline(root / "pipe", unet_config=unet, sample_size=args.resolution // 2)
        data = _pairs(root / "data", args.batch, args.resolution)
        variants = {
            "diffusion_dpo": ("diffusion_dpo", {}),
            "smpo_policy_inversion": ("smpo", {"inversion_steps": args.inversion_steps}),
            "smpo_reference_inversion_cached": (
                "smpo", {"inversion_steps": args.inversion_steps, "invert_with": "reference"}
            ),
        }  # fmt: skip
        methods, batches = {}, {}
        for key, (name, options) in variants.items():
            methods[key] = _method(name, pipeline, data, args, **options)
            dataset, collate = methods[key].dataset()
            batches[key] = collate([dataset[i] for i in range(args.batch)])
        # interleaved: step i of every variant runs before step i + 1 of any, so a drift in the
        # machine's speed touches all alike
        times: dict[str, list[float]] = {key: [] for key in variants}
        for i in range(args.warmup + args.steps):
            for key, method in methods.items():
                times[key].append(_step_seconds(method, batches[key], i, args.device))
        results = {key: _summary(t, args.warmup) for key, t in times.items()}
    base = results["diffusion_dpo"]["median"]
    for r in results.values():
        r["ratio_to_diffusion_dpo"] = r["median"] / base
    report = {
        "model": args.model, "device": args.device, "batch_pairs": args.batch, "resolution": args.resolution,
        "inversion_steps": args.inversion_steps, "timed_steps": args.steps, "torch": torch.__version__,
        "machine": platform.platform(), "seconds_per_step": results,
    }  # fmt: skip
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
