"""Benchmark: one Diffusion-DPO optimiser step, diffalign's next to the loops it replaces.

Sides, each one whole step on the same pairs (encode images and prompts, forward chosen and
rejected in one batch, reference forward, DPO loss at beta 5000, backward, optimiser step):

- ``official_full``: the official recipe's loop (SalesforceAIResearch/DiffusionDPO ``train.py``):
  fp32 policy weights under autocast, a separate reference UNet in the autocast dtype, torch
  AdamW with its defaults;
- ``diffusers_lora``: diffusers' ``train_diffusion_dpo.py``: LoRA rank 8 on the attention
  projections, the base weights in the autocast dtype, the reference = adapters disabled;
- ``diffalign_full`` / ``diffalign_lora``: ``DiffusionDPO.step`` with the config's speed options
  (``--channels-last``, ``--compile``) and the loop's optimiser (``make_optimizer``).

``--methods`` adds one optimiser step of SmPO (ReNoise inversion with the policy, 5 steps),
Diffusion-DRO (the lagged policy's rollout of as many samples as experts, then training) and the
RL core (DDPO: a rollout of ``--pairs`` prompts x 2 samples, 10 DDIM steps, then every
micro-batch of it), each relative to diffalign's Diffusion-DPO step on as many pairs (images per
second for DDPO).

The sides run interleaved (``bench_common.interleaved``: A B C D A B C D ..., ``--repeats``
rounds, each window at least ``--min-seconds`` and ``--min-steps``); the report gives, per side,
pairs/s (median, min, max), FLOPs per step (``torch.utils.flop_counter``), MFU against a matmul
ceiling measured in the same run (bf16 on a GPU, fp32 on the CPU), and on a GPU the peak memory
and the largest number of pairs per step that fits; and diffalign's ratio to its baseline, a
speed-up claimed only where the two ranges do not overlap. Autocast (bf16) runs on a GPU only; on
the CPU every side runs in fp32.

    python scripts/bench_dpo.py --device cuda --model sd15 --pairs 8          # the GPU run
    python scripts/bench_dpo.py --model medium                                # the CPU run
    python scripts/bench_dpo.py --smoke                                       # CI: the JSON only
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bench_common as bench
import torch
import torch.nn.functional as F

BETA = 5000.0
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
MEDIUM_UNET = {
    "sample_size": 16, "in_channels": 4, "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (64, 128, 256), "layers_per_block": 1, "cross_attention_dim": 128,
    "attention_head_dim": 8, "norm_num_groups": 32,
}  # fmt: skip
"""A CPU-sized UNet: SD1.5's block layout at a fifth of its width, one layer per block."""


def official_loss(
    unet: Any, reference: Any, noisy: Any, noise: Any, t: Any, hidden: Any, autocast: Any
) -> Any:
    """The official ``train.py``'s DPO loss on [chosen; rejected] rows (epsilon prediction)."""
    with autocast():
        pred = unet(noisy, t, hidden).sample
    losses = (pred.float() - noise.float()).pow(2).mean(dim=[1, 2, 3])
    model_diff = losses.chunk(2)[0] - losses.chunk(2)[1]
    with torch.no_grad(), autocast():
        ref = reference(noisy.to(reference.dtype), t, hidden.to(reference.dtype)).sample
        ref_losses = (ref.float() - noise.float()).pow(2).mean(dim=[1, 2, 3])
        ref_diff = ref_losses.chunk(2)[0] - ref_losses.chunk(2)[1]
    return -F.logsigmoid(-0.5 * BETA * (model_diff - ref_diff)).mean()


def _inputs(policy: Any, batch: dict) -> tuple[Any, Any, Any, Any]:
    """Noisy latents, noise, timesteps and text states of [chosen; rejected], as the official loop
    draws them (one noise and timestep per pair, repeated for both images)."""
    with torch.no_grad():
        latents = policy.encode_images(torch.cat([batch["chosen"], batch["rejected"]]))
        hidden = policy.encode_prompts(batch["prompts"]).encoder_hidden_states.repeat(2, 1, 1)
    b = len(batch["prompts"])
    noise = torch.randn_like(latents[:b]).repeat(2, 1, 1, 1)
    t = torch.randint(0, policy.scheduler.config.num_train_timesteps, (b,), device=latents.device).repeat(2)
    return policy.scheduler.add_noise(latents, noise, t), noise, t, hidden


Step = Callable[[dict], None]


def official_full(policy: Any, autocast: Any, dtype: torch.dtype) -> Step:
    unet = policy.unet
    reference = copy.deepcopy(unet).requires_grad_(False).to(dtype)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-8)

    def step(batch: dict) -> None:
        loss = official_loss(unet, reference, *_inputs(policy, batch), autocast)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def diffusers_lora(policy: Any, autocast: Any, dtype: torch.dtype) -> Step:
    from peft import LoraConfig

    unet = policy.unet.requires_grad_(False).to(dtype)
    unet.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    lora = [p for p in unet.parameters() if p.requires_grad]
    for p in lora:  # diffusers' cast_training_params: the trained weights stay fp32
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(lora, lr=1e-8)

    class Reference:  # the adapters disabled around the reference forward, as the script does
        dtype = unet.dtype

        def __call__(self, *args: Any) -> Any:
            unet.disable_adapters()
            try:
                return unet(*args)
            finally:
                unet.enable_adapters()

    def step(batch: dict) -> None:
        loss = official_loss(unet, Reference(), *_inputs(policy, batch), autocast)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def diffalign_step(built: Any, autocast: Any) -> Step:
    from diffalign.training.loop import make_optimizer

    params = [p for p in built.trainable_module().parameters() if p.requires_grad]
    optimizer = make_optimizer(built.cfg.optim, params, 1e-8)

    def step(batch: dict) -> None:
        with autocast():
            loss, _ = built.step(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def flops_per_step(step: Callable[[], None]) -> int:
    """FLOPs of one call of ``step`` (forward, backward and optimiser), as torch counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def matmul_ceiling(device: str, dtype: torch.dtype, seconds: float = 2.0) -> float:
    """FLOP/s of a square matmul (4096 on a GPU, 1024 on the CPU) in ``dtype``, the MFU denominator."""
    n = 4096 if device == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    (a @ b).sum().item()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        calls += 1
        if device == "cuda":
            torch.cuda.synchronize()
    return 2 * n**3 * calls / (time.perf_counter() - start)


def build_sides(args: argparse.Namespace, pipe: Path, data: Path) -> tuple[dict[str, Step], dict]:
    """The four sides, each on its own copy of the pipeline, and the batch of pairs they share."""
    from diffalign.diffusion.policy import DiffusionPolicy

    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32

    def autocast() -> Any:
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    def baseline_policy() -> Any:
        policy = DiffusionPolicy.from_pretrained(pipe, device=torch.device(args.device))
        for module in (policy.vae, *policy.text_encoders):
            module.to(dtype)
        return policy

    speed = {"channels_last": args.channels_last, "compile": args.compile}
    full = bench.method("diffusion_dpo", pipe, data, args, model=speed, weight_dtype=dtype)
    lora = bench.method(
        "diffusion_dpo", pipe, data, args, model={**speed, "lora": {"rank": 8}}, weight_dtype=dtype
    )
    sides = {
        "official_full": official_full(baseline_policy(), autocast, dtype),
        "diffusers_lora": diffusers_lora(baseline_policy(), autocast, dtype),
        "diffalign_full": diffalign_step(full, autocast),
        "diffalign_lora": diffalign_step(lora, autocast),
    }
    return sides, bench.first_batch(full, args.pairs)


def method_steps(args: argparse.Namespace, pipe: Path, data: Path) -> dict[str, Callable[[], None]]:
    """One optimiser step of SmPO, Diffusion-DRO and DDPO (``--methods``), on the CPU in fp32 or
    the GPU under bf16 autocast, as ``diffalign_full`` runs."""
    from diffalign.training.loop import make_optimizer

    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    prompts = data.parent / "prompts.txt"
    prompts.write_text("".join(f"a red square number {i}\n" for i in range(args.pairs)))
    built = {
        "smpo": bench.method("smpo", pipe, data, args, weight_dtype=dtype, inversion_steps=5),
        "dro": bench.method(
            "dro", pipe, data, args, weight_dtype=dtype, buffer_size=args.pairs, rollout_steps=10
        ),
        "ddpo": bench.method(
            "ddpo", pipe, prompts, args, weight_dtype=dtype, data_options={}, reward="jpeg_compressibility",
            samples_per_prompt=2, rollout_steps=10, train_timesteps=2,
        ),
    }  # fmt: skip

    def stepper(name: str) -> Callable[[], None]:
        method = built[name]
        params = [p for p in method.trainable_module().parameters() if p.requires_grad]
        optimizer, batch = (
            make_optimizer(method.cfg.optim, params, 1e-8),
            bench.first_batch(method, args.pairs),
        )

        def step() -> None:
            with autocast():
                for micro in method.micro_batches(batch, 0):
                    loss, _ = method.step(micro)
                    loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    return {name: stepper(name) for name in built}


def method_comparison(
    args: argparse.Namespace, pipe: Path, data: Path, dpo: Step, batch: dict
) -> dict[str, Any]:
    """Each method's optimiser steps per second over Diffusion-DPO's, in interleaved windows."""
    sides = {"diffusion_dpo": lambda: dpo(batch), **method_steps(args, pipe, data)}
    rates = bench.interleaved(
        sides, dict.fromkeys(sides, 1.0), args.device, args.repeats, args.min_seconds, args.min_steps
    )
    return {
        "unit": "optimiser steps per second", "steps_per_second": rates,
        **{name: bench.ratio(rates, name, "diffusion_dpo") for name in sides if name != "diffusion_dpo"},
    }  # fmt: skip


def resized(batch: dict, n: int) -> dict:
    """``batch`` with ``n`` pairs: its rows repeated (tensors and lists alike) and cut to ``n``."""

    def rows(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.repeat(-(-n // len(value)), *[1] * (value.dim() - 1))[:n]
        if isinstance(value, list):
            return (value * -(-n // len(value)))[:n]
        return value

    return {key: rows(value) for key, value in batch.items()}


def step_memory(step: Step, batch: dict) -> dict[str, float]:
    """GiB allocated at the step's peak, and above what was allocated before it (CUDA)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step(batch)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return {"peak_gib": peak / 2**30, "step_gib": (peak - before) / 2**30}


def largest_pairs(step: Step, batch: dict, limit: int = 512) -> int:
    """The most pairs per step that run without running out of GPU memory (doubling, then bisecting)."""
    fits, failed, size = 0, None, 1
    while size <= limit and size != fits and size != failed:
        try:
            step(resized(batch, size))
            fits = size
        except torch.cuda.OutOfMemoryError:
            failed = size
        torch.cuda.empty_cache()
        size = size * 2 if failed is None else (fits + failed) // 2
    return fits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "medium", "sd15"], default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--pairs", type=int, default=8, help="pairs per optimiser step")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-seconds", type=float, default=10.0)
    parser.add_argument("--min-steps", type=int, default=50)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--methods", action="store_true", help="SmPO, DRO and DDPO steps next to DPO's")
    parser.add_argument("--smoke", action="store_true", help="tiny UNet, a few steps: checks the JSON only")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    if args.smoke:
        args.model, args.repeats, args.min_seconds, args.min_steps, args.pairs = "tiny", 2, 0.0, 2, 2
        args.methods = True
    args.model = args.model or ("sd15" if args.device == "cuda" else "medium")
    args.output = args.output or Path(f"benchmarks/results/bench_dpo_{args.model}_{args.device}.json")
    args.batch, args.resolution = args.pairs, {"tiny": 32, "medium": 32, "sd15": 128}[args.model]
    args.steps = args.min_steps  # the report's timed_steps: the least a window runs
    run(args)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The four sides' report, written as soon as it is measured, then again with ``--methods``."""
    from diffalign.diffusion.tiny import SD15_UNET_CONFIG, build_tiny_pipeline

    unet = {"tiny": None, "medium": MEDIUM_UNET, "sd15": dict(SD15_UNET_CONFIG, sample_size=64)}[args.model]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pipe = build_tiny_pipeline(root / "pipe", unet_config=unet, sample_size=args.resolution // 2)
        data = bench.pairs(root / "data", args.pairs, args.resolution)
        sides, batch = build_sides(args, pipe, data)
        cuda = args.device == "cuda"
        flops = {name: flops_per_step(lambda s=step: s(batch)) for name, step in sides.items()}
        memory = {name: step_memory(step, batch) for name, step in sides.items()} if cuda else {}
        results = bench.interleaved(
            {name: lambda s=step: s(batch) for name, step in sides.items()},
            dict.fromkeys(sides, args.pairs), args.device, args.repeats, args.min_seconds, args.min_steps,
        )  # fmt: skip
        fits = {name: largest_pairs(step, batch) for name, step in sides.items()} if cuda else {}
        ceiling = matmul_ceiling(args.device, torch.bfloat16 if cuda else torch.float32)
        for name, result in results.items():
            rate = result["units_per_second"]["median"]
            result.update(flops_per_step=flops[name], mfu=flops[name] * rate / args.pairs / ceiling)
            result["memory"] = memory.get(name, "not measured on the CPU")
            result["largest_pairs_per_step"] = fits.get(name, "not measured on the CPU")
        report = {
            "unit": "pairs per second", "precision": "bf16 autocast" if cuda else "fp32",
            "matmul_ceiling_flops": ceiling, "repeats": args.repeats, "min_seconds": args.min_seconds,
            "min_steps": args.min_steps,
            "options": {"channels_last": args.channels_last, "compile": args.compile},
            "sides": results,
            "full_over_official": bench.ratio(results, "diffalign_full", "official_full"),
            "lora_over_diffusers": bench.ratio(results, "diffalign_lora", "diffusers_lora"),
        }  # fmt: skip
        bench.write_report(args, report)  # the methods' windows are long: keep what is measured
        if args.methods:
            report["methods_over_diffusion_dpo"] = method_comparison(
                args, pipe, data, sides["diffalign_full"], batch
            )
            bench.write_report(args, report)
    return report


if __name__ == "__main__":
    main()
