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

import bench_common as bench
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench.add_arguments(parser, "dro", "experts (and DPO pairs) per step")
    parser.add_argument("--rollout-steps", type=int, default=20)
    args = bench.parse(parser, "rollout_steps")
    with bench.workspace(args) as (pipe, data):  # the DRO experts: the pairs' chosen images
        dro = bench.method("dro", pipe, data, args, buffer_size=args.batch, rollout_steps=args.rollout_steps)
        dpo = bench.method("diffusion_dpo", pipe, data, args)
        experts, pair_batch = bench.first_batch(dro, args.batch), bench.first_batch(dpo, args.batch)
        times: dict[str, list[float]] = {"dro_rollout": [], "dro_training": [], "diffusion_dpo": []}
        for i in range(args.warmup + args.steps):  # interleaved: a drift in speed touches all alike
            torch.manual_seed(i)
            took, rows = bench.seconds(
                lambda: dro.rollout(experts["prompts"], experts["images"]), args.device
            )
            times["dro_rollout"].append(took)
            dro.buffer.push(rows)
            drawn = dro.buffer.draw(args.batch)
            times["dro_training"].append(
                bench.seconds(lambda d=drawn: bench.train_step(dro, d), args.device)[0]
            )
            times["diffusion_dpo"].append(
                bench.seconds(lambda: bench.train_step(dpo, pair_batch), args.device)[0]
            )
    results = {key: bench.summary(t, args.warmup) for key, t in times.items()}
    dro_step = results["dro_rollout"]["median"] + results["dro_training"]["median"]
    report = {
        "rollout_steps": args.rollout_steps, "seconds": results, "dro_step_median": dro_step,
        "rollout_share_of_dro_step": results["dro_rollout"]["median"] / dro_step,
        "dro_step_ratio_to_diffusion_dpo": dro_step / results["diffusion_dpo"]["median"],
    }  # fmt: skip
    bench.write_report(args, report)


if __name__ == "__main__":
    main()
