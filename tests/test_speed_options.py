"""The speed options keep the method's numerics: Diffusion-DPO's loss and gradients with a
channels-last UNet equal the official recipe's loop (``scripts/bench_dpo.py``'s baseline) on equal
inputs, and ``model.compile`` compiles the UNet the loop trains through."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch
from script_loader import SCRIPTS, load_script

from diffalign.config import build
from diffalign.diffusion.likelihood import denoising_logp
from diffalign.methods import get_method
from diffalign.objectives import get_objective
from diffalign.training.config import DataConfig, ModelConfig, TrainConfig


def _method(pipeline: str, data: Path, tmp_path: Path, **model: object) -> object:
    cfg = TrainConfig(
        method="diffusion_dpo", model=build(ModelConfig, {"pretrained": pipeline, **model}),
        data=DataConfig(path=data, resolution=32, caption_dropout=0.0, hflip=False),
        output_dir=tmp_path / "out", report_to=[], batch_size=2,
    )  # fmt: skip
    built = get_method("diffusion_dpo")(cfg)
    built.setup(torch.device("cpu"), torch.float32)
    built.use_prepared(built.trainable_module())
    return built


def test_diffusion_dpo_equals_the_official_loop_with_and_without_channels_last(
    tiny_pipelines, tmp_path: Path
) -> None:
    """In float64, where rounding cannot hide a difference: in float32 beta 5000 multiplies the
    rounding of the error differences by 2500 (in float32 the official loop's loss and ours differ
    by 4e-4 relative on these inputs; the objective computes its logits in float64)."""
    sys.path.insert(0, str(SCRIPTS))  # bench_dpo imports bench_common beside it
    bench_dpo = load_script("bench_dpo")
    data = load_script("make_tiny_assets").make_pairs(tmp_path / "pairs", n_pairs=3)
    baseline, plain = (_method(tiny_pipelines["sd"], data, tmp_path) for _ in range(2))
    fast = _method(tiny_pipelines["sd"], data, tmp_path, channels_last=True)
    assert fast.policy.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    for built in (baseline, plain, fast):  # the same step away from the reference on each
        for unet in (
            built.policy.unet,
            built.policy.reference_unet,
            built.policy.vae,
            *built.policy.text_encoders,
        ):
            unet.double()
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in built.policy.unet.parameters():
                p += 1e-2 * torch.randn(p.shape, generator=g, dtype=p.dtype)
    dataset, collate = plain.dataset()
    batch = collate([dataset[i] for i in range(3)])
    images = torch.cat([batch["chosen"], batch["rejected"]]).double()
    latents = plain.policy.encode_images(images, sample=False)
    cond = plain.policy.encode_prompts(batch["prompts"])
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(latents[:3].shape, generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (3,), generator=g)
    both = noise.repeat(2, 1, 1, 1)  # [chosen; rejected] share a pair's noise and timestep
    official = bench_dpo.official_loss(
        baseline.policy.unet, baseline.policy.reference_unet,
        plain.policy.scheduler.add_noise(latents, both, t.repeat(2)), both, t.repeat(2),
        cond.encoder_hidden_states.repeat(2, 1, 1), contextlib.nullcontext,
    )  # fmt: skip
    official.backward()
    assert abs(float(official) - 0.6931) > 1e-2  # policy and reference differ: the loss is not log 2

    def ours(built: object) -> torch.Tensor:
        out = denoising_logp(built.policy, torch.stack(latents.chunk(2), 1), cond, timesteps=t, noise=noise)
        loss = get_objective("dpo", beta=5000.0)(
            policy_chosen_logps=out.policy[:, 0], policy_rejected_logps=out.policy[:, 1],
            reference_chosen_logps=out.reference[:, 0], reference_rejected_logps=out.reference[:, 1],
        ).loss  # fmt: skip
        loss.backward()
        return loss.float()

    for built, rtol in ((plain, 1e-6), (fast, 1e-3)):
        torch.testing.assert_close(ours(built), official, rtol=rtol, atol=0)
        for (name, a), b in zip(
            built.policy.unet.named_parameters(), baseline.policy.unet.parameters(), strict=True
        ):
            torch.testing.assert_close(a.grad, b.grad, rtol=100 * rtol, atol=1e-6, msg=name)


def test_compile_wraps_the_trained_unet(tiny_pipelines, tmp_path: Path) -> None:
    data = load_script("make_tiny_assets").make_pairs(tmp_path / "pairs", n_pairs=2)
    built = _method(tiny_pipelines["sd"], data, tmp_path, compile=True)
    assert isinstance(built.policy.train_unet, torch._dynamo.eval_frame.OptimizedModule)
    assert built.policy.train_unet._orig_mod is built.policy.unet
    assert _method(tiny_pipelines["sd"], data, tmp_path).policy.train_unet is not None
