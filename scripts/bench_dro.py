"""Where a Diffusion-DRO training step spends its time: the lagged policy's rollout (sampling the
negatives) against the training forward and backward, next to a Diffusion-DPO step on as many
UNet rows, measured in one run.

    python scripts/bench_dro.py [--model tiny|sd15] [--device cpu|cuda] [--output outputs/bench_dro.json]

One DRO step with the official buffer (as many rows as a micro-batch, refreshed every
micro-batch) is a rollout of ``--batch`` prompts (``--rollout-steps`` DPM-Solver++ steps, guidance
1, shifted schedules: the batch's UNet forwards under no-grad) and a training step on ``--batch``
experts and as many samples (policy forward and backward, reference forward over 2 x batch
rows); the Diffusion-DPO step trains on ``--batch`` pairs, the same 2 x batch rows. The first
``--warmup`` steps are not timed; the three parts are interleaved, and the report gives each
one's median, min and max, the rollout's share of a DRO step and the DRO step's ratio to DPO's.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch
from bench_common import (
    add_model_arguments,
    first_batch,
    method,
    pairs,
    pipeline,
    seconds,
    summary,
    train_step,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--batch", type=int, default=4, help="experts (and DPO pairs) per step")
    parser.add_argument("--rollout-steps", type=int, default=20)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--output", type=Path, default=Path("outputs/bench_dro.json"))
    args = parser.parse_args()
    if min(args.batch, args.steps, args.rollout_steps) < 1 or args.warmup < 0:
        parser.error("--batch, --steps and --rollout-steps must be >= 1, --warmup >= 0")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pipe = pipeline(args, root / "pipe")
        data = pairs(
            root / "data", args.batch, args.resolution
        )  # unscored: the chosen images are the experts
        dro = method("dro", pipe, data, args, buffer_size=args.batch, rollout_steps=args.rollout_steps)
        dpo = method("diffusion_dpo", pipe, data, args)
        experts, pair_batch = first_batch(dro, args.batch), first_batch(dpo, args.batch)
        times: dict[str, list[float]] = {"dro_rollout": [], "dro_training": [], "diffusion_dpo": []}
        for i in range(args.warmup + args.steps):  # interleaved: a drift in speed touches all alike
            torch.manual_seed(i)
            took, rows = seconds(lambda: dro.rollout(experts["prompts"], experts["images"]), args.device)
            times["dro_rollout"].append(took)
            dro.buffer.push(rows)
            drawn = dro.buffer.draw(args.batch)
            times["dro_training"].append(seconds(lambda d=drawn: train_step(dro, d), args.device)[0])
            times["diffusion_dpo"].append(seconds(lambda: train_step(dpo, pair_batch), args.device)[0])
    results = {key: summary(t, args.warmup) for key, t in times.items()}
    dro_step = results["dro_rollout"]["median"] + results["dro_training"]["median"]
    report = {
        "model": args.model, "device": args.device, "batch": args.batch, "resolution": args.resolution,
        "rollout_steps": args.rollout_steps, "timed_steps": args.steps, "torch": torch.__version__,
        "machine": platform.platform(), "seconds": results,
        "dro_step_median": dro_step,
        "rollout_share_of_dro_step": results["dro_rollout"]["median"] / dro_step,
        "dro_step_ratio_to_diffusion_dpo": dro_step / results["diffusion_dpo"]["median"],
    }  # fmt: skip
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
