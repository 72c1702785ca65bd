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

import bench_common as bench
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench.add_arguments(parser, "smpo", "pairs per step")
    parser.add_argument("--inversion-steps", type=int, default=5)
    args = bench.parse(parser, "inversion_steps")
    with bench.workspace(args) as (pipe, data):
        variants = {
            "diffusion_dpo": ("diffusion_dpo", {}),
            "smpo_policy_inversion": ("smpo", {"inversion_steps": args.inversion_steps}),
            "smpo_reference_inversion_cached": (
                "smpo", {"inversion_steps": args.inversion_steps, "invert_with": "reference"}
            ),
        }  # fmt: skip
        methods, batches = {}, {}
        for key, (name, options) in variants.items():
            methods[key] = bench.method(name, pipe, data, args, **options)
            batches[key] = bench.first_batch(methods[key], args.batch)
        # interleaved: step i of every variant runs before step i + 1 of any, so a drift in the
        # machine's speed touches all alike
        times: dict[str, list[float]] = {key: [] for key in variants}
        for i in range(args.warmup + args.steps):
            for key, built in methods.items():
                torch.manual_seed(i)
                times[key].append(
                    bench.seconds(lambda b=built, k=key: bench.train_step(b, batches[k]), args.device)[0]
                )
        results = {key: bench.summary(t, args.warmup) for key, t in times.items()}
    base = results["diffusion_dpo"]["median"]
    for r in results.values():
        r["ratio_to_diffusion_dpo"] = r["median"] / base
    bench.write_report(args, {"inversion_steps": args.inversion_steps, "seconds_per_step": results})


if __name__ == "__main__":
    main()
