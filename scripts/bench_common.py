"""What the method benchmarks share: a tiny or SD1.5-sized pipeline, pairs to train on, a method
built on them, wall-clock timing with the device synchronised, and the summary of timed steps."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=["tiny", "sd15"], default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="px (default: 32 tiny, 128 sd15: the tiny VAE halves, so SD1.5's 64x64 latents)",
    )


def pipeline(args: argparse.Namespace, folder: Path) -> Path:
    """A diffusers pipeline at ``folder``: the tiny one, or one with SD1.5's UNet (``--model sd15``).
    Sets ``args.resolution`` when it is unset."""
    from diffalign.diffusion.tiny import SD15_UNET_CONFIG, build_tiny_pipeline

    args.resolution = args.resolution or (32 if args.model == "tiny" else 128)
    unet = dict(SD15_UNET_CONFIG, sample_size=args.resolution // 2) if args.model == "sd15" else None
    return build_tiny_pipeline(folder, unet_config=unet, sample_size=args.resolution // 2)


def pairs(folder: Path, n: int, size: int) -> Path:
    """A JSONL of ``n`` pairs of noise images with reward scores (chosen_reward, rejected_reward)."""
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


def method(name: str, pipeline: Path, data: Path, args: argparse.Namespace, **options: Any) -> Any:
    """The method ``name`` on ``pipeline`` and ``data``, set up on ``args.device`` in float32."""
    from diffalign.methods import get_method
    from diffalign.training.config import DataConfig, ModelConfig, TrainConfig

    cfg = TrainConfig(
        method=name, model=ModelConfig(pretrained=str(pipeline)),
        data=DataConfig(path=data, resolution=args.resolution, caption_dropout=0.0, hflip=False),
        method_options=options, output_dir=data.parent / "out", report_to=[], batch_size=args.batch,
    )  # fmt: skip
    built = get_method(name)(cfg)
    built.setup(torch.device(args.device), torch.float32)
    return built


def first_batch(built: Any, n: int) -> Any:
    dataset, collate = built.dataset()
    return collate([dataset[i] for i in range(n)])


def seconds(fn: Callable[[], Any], device: str) -> tuple[float, Any]:
    """Wall seconds of ``fn()`` (the device synchronised around it) and what it returned."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def train_step(built: Any, batch: Any) -> None:
    """The method's ``step`` and the backward of its loss."""
    loss, _ = built.step(batch)
    loss.backward()
    built.policy.unet.zero_grad(set_to_none=True)


def summary(times: list[float], warmup: int) -> dict[str, float]:
    timed = times[warmup:]
    return {
        "first_step": times[0], "median": statistics.median(timed), "min": min(timed), "max": max(timed),
        "mean": statistics.fmean(timed),
    }  # fmt: skip
