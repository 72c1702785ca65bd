"""What the method benchmarks share: a tiny or SD1.5-sized pipeline, pairs to train on, a method
built on them, wall-clock timing with the device synchronised, and the summary of timed steps."""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch


def add_arguments(parser: argparse.ArgumentParser, name: str, batch_help: str) -> None:
    """The arguments every method benchmark takes: model, device, resolution, batch, timed and
    warm-up steps, and the JSON report's path (default ``outputs/bench_<name>.json``)."""
    parser.add_argument("--model", choices=["tiny", "sd15"], default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="px (default: 32 tiny, 128 sd15: the tiny VAE halves, so SD1.5's 64x64 latents)",
    )
    parser.add_argument("--batch", type=int, default=4, help=batch_help)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--output", type=Path, default=Path(f"outputs/bench_{name}.json"))


def parse(parser: argparse.ArgumentParser, *positive: str) -> argparse.Namespace:
    """The parsed arguments; ``--warmup`` must be >= 0, ``--batch``, ``--steps`` and those named
    in ``positive`` (their dest names) >= 1, else the parser's usage error."""
    args = parser.parse_args()
    names = ("batch", "steps", *positive)
    if min(getattr(args, n) for n in names) < 1 or args.warmup < 0:
        parser.error(f"{', '.join('--' + n.replace('_', '-') for n in names)} must be >= 1, --warmup >= 0")
    return args


def pipeline(args: argparse.Namespace, folder: Path) -> Path:
    """A diffusers pipeline at ``folder``: the tiny one, or one with SD1.5's UNet (``--model sd15``).
    Sets ``args.resolution`` when it is unset."""
    from diffalign.diffusion.tiny import SD15_UNET_CONFIG, build_tiny_pipeline

    args.resolution = args.resolution or (32 if args.model == "tiny" else 128)
    unet = dict(SD15_UNET_CONFIG, sample_size=args.resolution // 2) if args.model == "sd15" else None
    return build_tiny_pipeline(folder, unet_config=unet, sample_size=args.resolution // 2)


@contextlib.contextmanager
def workspace(args: argparse.Namespace) -> Iterator[tuple[Path, Path]]:
    """A pipeline for ``args.model`` and ``args.batch`` pairs at ``args.resolution`` in a temporary
    folder, removed on exit: ``(pipeline, pairs.jsonl)``."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pipe = pipeline(args, root / "pipe")
        yield pipe, pairs(root / "data", args.batch, args.resolution)


def write_report(args: argparse.Namespace, report: dict[str, Any]) -> None:
    """``report`` with the model, device and machine, to ``args.output`` (JSON) and stdout."""
    report = {
        "model": args.model, "device": args.device, "resolution": args.resolution, "batch": args.batch,
        "timed_steps": args.steps, "torch": torch.__version__, "machine": platform.platform(), **report,
    }  # fmt: skip
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


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
