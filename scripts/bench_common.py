"""What the method benchmarks share: a tiny or SD1.5-sized pipeline, pairs to train on, a method
built on them, wall-clock timing with the device synchronised, the summary of timed steps, and
``interleaved``: the comparison of several sides that a noisy, shared machine cannot fool."""

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


def method(
    name: str, pipeline: Path, data: Path, args: argparse.Namespace, model: dict | None = None,
    weight_dtype: torch.dtype = torch.float32, data_options: dict | None = None, **options: Any,
) -> Any:  # fmt: skip
    """The method ``name`` on ``pipeline`` and ``data`` (``model``, ``data_options``: more
    ``model.*`` and ``data.*`` settings; the latter default to no caption dropout and no flips),
    set up on ``args.device`` with its frozen parts in ``weight_dtype``, forwards through the
    trained UNet as the loop runs them (``use_prepared``: compiled under ``model.compile``)."""
    from diffalign.config import build
    from diffalign.methods import get_method
    from diffalign.training.config import DataConfig, ModelConfig, TrainConfig

    cfg = TrainConfig(
        method=name, model=build(ModelConfig, {"pretrained": str(pipeline), **(model or {})}),
        data=build(DataConfig, {
            "path": str(data), "resolution": args.resolution,
            **({"caption_dropout": 0.0, "hflip": False} if data_options is None else data_options),
        }),
        method_options=options, output_dir=data.parent / "out", report_to=[], batch_size=args.batch,
    )  # fmt: skip
    built = get_method(name)(cfg)
    built.setup(torch.device(args.device), weight_dtype)
    built.use_prepared(built.trainable_module())
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


def interleaved(
    sides: dict[str, Callable[[], Any]],
    units_per_step: dict[str, float],
    device: str,
    repeats: int = 5,
    min_seconds: float = 10.0,
    min_steps: int = 50,
    warmup: int = 2,
) -> dict[str, dict[str, Any]]:
    """Throughput of each side (a callable running one step), measured in ``repeats`` rounds; in each
    round every side runs in turn (A B C A B C ...) for a window of at least ``min_seconds`` and
    ``min_steps`` steps, after ``warmup`` untimed steps in the first round. A load that drifts
    during the run then touches every side alike.

    Returns, per side, ``units_per_second`` (the windows' median, min, max and all of them) in the
    side's ``units_per_step`` (pairs, tokens, images).
    """
    for step in sides.values():
        for _ in range(warmup):
            seconds(step, device)
    windows: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(repeats):
        for name, step in sides.items():
            elapsed, steps = 0.0, 0
            while elapsed < min_seconds or steps < min_steps:
                elapsed += seconds(step, device)[0]
                steps += 1
            windows[name].append(steps * units_per_step[name] / elapsed)
    return {name: {"units_per_second": _spread(w), "windows": w} for name, w in windows.items()}


def ratio(results: dict[str, dict[str, Any]], side: str, baseline: str) -> dict[str, Any]:
    """``side``'s throughput over ``baseline``'s, round by round (median, min, max), and whether it
    is a speed-up (``faster``) or a slow-down (``slower``) that the two sides' ranges do not
    blur: only where ``side``'s slowest window beats ``baseline``'s fastest (or the reverse)."""
    a, b = results[side]["windows"], results[baseline]["windows"]
    per_round = [x / y for x, y in zip(a, b, strict=True)]
    return {
        **_spread(per_round),
        "faster": min(a) > max(b),
        "slower": max(a) < min(b),
    }


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}
