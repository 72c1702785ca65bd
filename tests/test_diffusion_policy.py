"""DiffusionPolicy, sample_with_trajectory, denoising_logp and inversion on tiny pipelines."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

from diffalign.diffusion.inversion import ddim_invert, renoise_invert
from diffalign.diffusion.likelihood import denoising_logp
from diffalign.diffusion.policy import DiffusionPolicy
from diffalign.diffusion.sampling import Trajectory, make_scheduler, sample_with_trajectory
from diffalign.objectives import get_objective

PROMPTS = ["a red cat", "two blue dogs"]
PIPELINES = {
    "sd": StableDiffusionPipeline,
    "sdxl": StableDiffusionXLPipeline,
    "inpaint": StableDiffusionInpaintPipeline,
}


def unguided_sample(policy: DiffusionPolicy, steps: int, eta: float, seed: int) -> Trajectory:
    generator = torch.Generator().manual_seed(seed)
    return sample_with_trajectory(
        policy, PROMPTS, num_inference_steps=steps, guidance_scale=1.0, eta=eta, generator=generator
    )


def inpaint_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return {
        "image": torch.rand(2, 3, 32, 32, generator=g),
        "mask": (torch.rand(2, 1, 32, 32, generator=g) > 0.5).float(),
    }


@pytest.mark.parametrize("kind", ["sd", "sdxl", "inpaint"])
@pytest.mark.parametrize(("sampler", "extra"), [("ddim", {"eta": 1.0}), ("ddpm", {}), ("dpmsolver++", {})])
def test_sample_with_trajectory_reproduces_the_pipeline(
    tiny_pipelines, kind: str, sampler: str, extra: dict
) -> None:
    policy = DiffusionPolicy.from_pretrained(tiny_pipelines[kind])
    pipe = PIPELINES[kind].from_pretrained(tiny_pipelines[kind])
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler(policy, sampler)
    inp = inpaint_inputs() if kind == "inpaint" else {}
    pipe_inp = {"image": inp["image"], "mask_image": inp["mask"]} if inp else {}
    common = {"num_inference_steps": 4, "guidance_scale": 3.0, "height": 32, "width": 32}
    expected = pipe(
        PROMPTS, output_type="pt", generator=torch.Generator().manual_seed(0), **common, **pipe_inp, **extra
    ).images
    traj = sample_with_trajectory(
        policy, PROMPTS, sampler=sampler, generator=torch.Generator().manual_seed(0), **common, **inp, **extra
    )
    torch.testing.assert_close(traj.images, expected, atol=1e-6, rtol=0)
    assert traj.latents.shape == (2, 5, 4, 16, 16)
    assert traj.predictions.shape == (2, 4, 4, 16, 16)
    assert traj.timesteps.shape == (4,)
    assert (traj.log_probs is None) == (sampler == "dpmsolver++")
    torch.testing.assert_close(policy.decode_latents(traj.latents[:, -1]), traj.images)


def test_trajectory_log_probs_are_the_recorded_transitions(tiny_pipelines) -> None:
    from diffalign.diffusion.sampling import step_logprob

    policy = DiffusionPolicy.from_pretrained(tiny_pipelines["sd"])
    traj = unguided_sample(policy, steps=3, eta=1.0, seed=1)
    sch = make_scheduler(policy, "ddim")
    sch.set_timesteps(3)
    for j, t in enumerate(traj.timesteps):
        recomputed = step_logprob(
            sch,
            policy.unet_forward(traj.latents[:, j], t, traj.conditioning),
            t,
            traj.latents[:, j],
            traj.latents[:, j + 1],
        )
        torch.testing.assert_close(recomputed, traj.log_probs[:, j], atol=1e-5, rtol=1e-5)
    again = unguided_sample(policy, steps=3, eta=1.0, seed=1)
    assert torch.equal(again.latents, traj.latents)  # deterministic under a seed


@pytest.mark.parametrize("kind", ["sd", "sd_v"])
def test_dpo_on_denoising_logp_equals_the_official_diffusion_dpo_loss(tiny_pipelines, kind: str) -> None:
    """-logsigmoid(-0.5 beta ((mse_w - mse_l) - (ref_w - ref_l))), per-element MSE means."""
    policy = DiffusionPolicy.from_pretrained(tiny_pipelines[kind])
    reference = DiffusionPolicy.from_pretrained(tiny_pipelines[kind])
    with torch.no_grad():  # make the policy differ from its reference
        for p in policy.unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    policy.reference_unet = reference.unet.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 2, 4, 16, 16, generator=g)
    cond = policy.encode_prompts(["a", "b c", "d"])
    out = denoising_logp(policy, latents, cond, generator=torch.Generator().manual_seed(1))
    loss = get_objective("dpo", beta=5000.0)(
        policy_chosen_logps=out.policy[:, 0], policy_rejected_logps=out.policy[:, 1],
        reference_chosen_logps=out.reference[:, 0], reference_rejected_logps=out.reference[:, 1],
    ).loss  # fmt: skip

    # the official computation, written out: [winners; losers] with shared noise and timestep
    t, noise = out.timesteps, out.noise
    x0 = torch.cat([latents[:, 0], latents[:, 1]])
    tt, nn = t.repeat(2), noise.repeat(2, 1, 1, 1)
    noisy = policy.scheduler.add_noise(x0, nn, tt)
    target = nn if kind == "sd" else policy.scheduler.get_velocity(x0, nn, tt)
    states = cond.encoder_hidden_states.repeat(2, 1, 1)
    mse = (policy.unet(noisy, tt, states).sample - target).pow(2).mean(dim=[1, 2, 3])
    with torch.no_grad():
        ref = (reference.unet(noisy, tt, states).sample - target).pow(2).mean(dim=[1, 2, 3])
    # the same batch layout gives bit-identical errors; the formula is evaluated exactly (float64)
    torch.testing.assert_close(torch.cat([out.policy_mse[:, 0], out.policy_mse[:, 1]]), mse, atol=0, rtol=0)
    mse, ref = mse.double(), ref.double()
    model_diff = mse[:3] - mse[3:]
    ref_diff = ref[:3] - ref[3:]
    official = -F.logsigmoid(-0.5 * 5000.0 * (model_diff - ref_diff)).mean()
    torch.testing.assert_close(loss.detach(), official, atol=1e-6, rtol=0)


def test_denoising_logp_shares_noise_and_timestep_and_uses_one_forward(tiny_pipelines) -> None:
    policy = DiffusionPolicy.from_pretrained(tiny_pipelines["sd"])
    policy.make_reference("copy")
    calls = []
    policy.unet.register_forward_hook(lambda m, args, kwargs_out: calls.append(args[0].shape[0]))
    latents = torch.randn(2, 3, 4, 16, 16)
    same = latents[:, :1].expand(2, 3, 4, 16, 16).contiguous()  # three identical candidates
    cond = policy.encode_prompts(["a", "b"])
    out = denoising_logp(policy, same, cond, generator=torch.Generator().manual_seed(0))
    assert calls == [6]  # all B*K candidates in one policy forward
    # identical candidates with shared (t, noise) get identical errors; the reference matches the policy
    torch.testing.assert_close(out.policy_mse, out.policy_mse[:, :1].expand(2, 3))
    torch.testing.assert_close(out.reference, out.policy.detach())
    assert out.timesteps.shape == (2,) and out.noise.shape == (2, 4, 16, 16)
    # with different candidates, the errors differ
    other = denoising_logp(
        policy, latents, cond, timesteps=out.timesteps, noise=out.noise, with_reference=False
    )
    assert not torch.allclose(other.policy_mse[:, 0], other.policy_mse[:, 1])
    assert other.reference is None
    weighted = denoising_logp(
        policy,
        latents,
        cond,
        timesteps=out.timesteps,
        noise=out.noise,
        with_reference=False,
        weighting="min_snr",
    )
    assert not torch.allclose(weighted.policy, other.policy)


def test_lora_reference_with_disabled_adapters_equals_the_base_model(tiny_pipelines) -> None:
    policy = DiffusionPolicy.from_pretrained(tiny_pipelines["sd"])
    base = DiffusionPolicy.from_pretrained(tiny_pipelines["sd"])
    policy.add_lora(rank=4)
    with torch.no_grad():  # move the adapters away from their init so that they matter
        for name, p in policy.unet.named_parameters():
            if "lora_B" in name:
                p.add_(0.1)
    policy.make_reference("adapters")
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([10, 500])
    cond = policy.encode_prompts(["a", "b"])
    ref = policy.unet_forward(x, t, cond, reference=True)
    assert torch.equal(ref, base.unet_forward(x, t, cond).detach())
    assert not torch.allclose(policy.unet_forward(x, t, cond), ref)  # adapters are back on
    trainable = [n for n, p in policy.unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)


def test_renoise_beats_ddim_inversion_at_equal_unet_calls(tiny_pipelines) -> None:
    policy = DiffusionPolicy.from_pretrained(tiny_pipelines["sd"])
    traj = unguided_sample(policy, steps=10, eta=0.0, seed=0)
    x0, cond = traj.latents[:, -1], traj.conditioning

    def reconstruction_error(inv, steps: int) -> float:
        sch = make_scheduler(policy, "ddim")
        sch.set_timesteps(steps)
        x = inv.latents[:, -1]
        with torch.no_grad():
            for t in sch.timesteps:
                x = sch.step(policy.unet_forward(x, t, cond), t, x).prev_sample
        return float((x - x0).pow(2).mean())

    ddim = ddim_invert(policy, x0, cond, num_inference_steps=20)
    renoise = renoise_invert(policy, x0, cond, num_inference_steps=10, renoise_steps=1)
    assert ddim.unet_calls == renoise.unet_calls == 20
    assert ddim.latents.shape == (2, 21, 4, 16, 16) and renoise.latents.shape == (2, 11, 4, 16, 16)
    assert torch.equal(renoise.latents[:, 0], x0)
    assert reconstruction_error(renoise, 10) < 0.5 * reconstruction_error(ddim, 20)
    # the recovered x_T approaches the sampler's true starting noise as K grows
    errors = [
        float(
            (
                renoise_invert(policy, x0, cond, num_inference_steps=10, renoise_steps=k).latents[:, -1]
                - traj.latents[:, 0]
            )
            .pow(2)
            .mean()
        )
        for k in (0, 1, 4)
    ]
    assert errors[0] > errors[1] > errors[2]


def test_inversion_with_recorded_noise_inverts_a_stochastic_run(tiny_pipelines) -> None:
    policy = DiffusionPolicy.from_pretrained(tiny_pipelines["sd"])
    traj = unguided_sample(policy, steps=6, eta=1.0, seed=2)
    sch = make_scheduler(policy, "ddim")
    sch.set_timesteps(6)
    # recover the noise each step added: x_{t-1} = mean + std z
    from diffalign.diffusion.sampling import transition_stats

    noises = []
    for j, t in enumerate(traj.timesteps):
        mean, std = transition_stats(sch, traj.predictions[:, j], t, traj.latents[:, j], eta=1.0)
        noises.append((traj.latents[:, j + 1] - mean) / std)
    inv = renoise_invert(
        policy,
        traj.latents[:, -1],
        traj.conditioning,
        num_inference_steps=6,
        renoise_steps=8,
        eta=1.0,
        step_noises=torch.stack(noises, 1),
    )
    plain = ddim_invert(policy, traj.latents[:, -1], traj.conditioning, num_inference_steps=6)
    err = float((inv.latents[:, -1] - traj.latents[:, 0]).pow(2).mean())
    assert err < 1e-3 < float((plain.latents[:, -1] - traj.latents[:, 0]).pow(2).mean())


def test_attention_backends(tiny_pipelines) -> None:
    policy = DiffusionPolicy.from_pretrained(tiny_pipelines["sd"])
    assert set(policy.attention_processors()) == {"AttnProcessor2_0"}  # SDPA is the default
    policy.set_attention_backend("classic")
    assert set(policy.attention_processors()) == {"AttnProcessor"}
    policy.set_attention_backend("sdpa")
    assert set(policy.attention_processors()) == {"AttnProcessor2_0"}
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="xformers"):
            policy.set_attention_backend("xformers")
    with pytest.raises(RuntimeError, match="unknown attention backend"):
        policy.set_attention_backend("flash")  # type: ignore[arg-type]


def test_gradient_checkpointing_keeps_gradients(tiny_pipelines) -> None:
    policy = DiffusionPolicy.from_pretrained(tiny_pipelines["sd"])
    policy.enable_gradient_checkpointing()
    policy.unet.train()
    out = denoising_logp(
        policy, torch.randn(1, 2, 4, 16, 16), policy.encode_prompts(["a"]), with_reference=False
    )
    out.policy.sum().backward()
    assert all(p.grad is not None for p in policy.unet.parameters() if p.requires_grad)


def test_sdxl_conditioning(tiny_pipelines) -> None:
    policy = DiffusionPolicy.from_pretrained(tiny_pipelines["sdxl"])
    assert policy.is_sdxl and not policy.is_inpainting
    cond = policy.encode_prompts(PROMPTS, image_size=(32, 48))
    assert cond.encoder_hidden_states.shape == (2, 16, 32)  # two 16-d encoders concatenated
    assert cond.added_cond_kwargs["text_embeds"].shape == (2, 16)
    assert cond.added_cond_kwargs["time_ids"].tolist() == [[32, 48, 0, 0, 32, 48]] * 2
    uncond = policy.unconditional(2)
    assert torch.count_nonzero(uncond.encoder_hidden_states) == 0  # force_zeros_for_empty_prompt


def test_caption_dropout_replaces_prompts_with_empty(tiny_pipelines) -> None:
    policy = DiffusionPolicy.from_pretrained(tiny_pipelines["sd"])
    dropped = policy.encode_prompts(PROMPTS, dropout=1.0)
    torch.testing.assert_close(
        dropped.encoder_hidden_states, policy.encode_prompts(["", ""]).encoder_hidden_states
    )
    kept = policy.encode_prompts(PROMPTS, dropout=0.0)
    assert not torch.allclose(kept.encoder_hidden_states, dropped.encoder_hidden_states)


def test_images_round_trip_through_the_vae(tiny_pipelines) -> None:
    policy = DiffusionPolicy.from_pretrained(tiny_pipelines["sd"])
    images = torch.rand(2, 3, 32, 32)
    latents = policy.encode_images(images, sample=False)
    assert latents.shape == (2, 4, 16, 16)
    decoded = policy.decode_latents(latents)
    assert decoded.shape == images.shape and float(decoded.min()) >= 0 and float(decoded.max()) <= 1


def test_bad_input(tiny_pipelines, tmp_path) -> None:
    sd = DiffusionPolicy.from_pretrained(tiny_pipelines["sd"])
    cond = sd.encode_prompts(["a"])
    with pytest.raises(ValueError, match=r"latents must be \(B, K, C, h, w\)"):
        denoising_logp(sd, torch.randn(1, 4, 16, 16), cond)
    with pytest.raises(ValueError, match="latents have 3 channels"):
        denoising_logp(sd, torch.randn(1, 2, 3, 16, 16), cond)
    forward = sd.unet.forward
    sd.unet.forward = None  # no UNet call before a missing reference is noticed
    with pytest.raises(ValueError, match=r"no reference model: call make_reference\('copy'\)"):
        denoising_logp(sd, torch.randn(1, 2, 4, 16, 16), cond)
    sd.unet.forward = forward
    with pytest.raises(ValueError, match=r"latents must have shape \(1, 4, 16, 16\)"):
        sample_with_trajectory(sd, ["a"], num_inference_steps=2, latents=torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match="inpainting needs 9"):
        sample_with_trajectory(
            sd, ["a"], num_inference_steps=2, **{k: v[:1] for k, v in inpaint_inputs().items()}
        )
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        sample_with_trajectory(sd, ["a"], num_inference_steps=2, sampler="euler")  # type: ignore[arg-type]
    inpaint = DiffusionPolicy.from_pretrained(tiny_pipelines["inpaint"])
    with pytest.raises(ValueError, match="inpainting UNet: pass `image` and `mask`"):
        sample_with_trajectory(inpaint, ["a"], num_inference_steps=2)
    with pytest.raises(ValueError, match=r"UNet expects 9 input channels, got 4 \(pass `inpaint` inputs\)"):
        inpaint.unet_forward(torch.randn(1, 4, 16, 16), torch.tensor(5), inpaint.encode_prompts(["a"]))
    with pytest.raises(ValueError, match="needs the `step_noises`"):
        renoise_invert(sd, torch.randn(1, 4, 16, 16), cond, num_inference_steps=2, eta=1.0)
    with pytest.raises(ValueError, match="average_range"):
        renoise_invert(
            sd, torch.randn(1, 4, 16, 16), cond, num_inference_steps=2, renoise_steps=1, average_range=(0, 2)
        )
    with pytest.raises(ValueError, match="reference 'adapters' needs LoRA"):
        sd.make_reference("adapters")


def test_loading_errors_name_the_path_and_the_fix(tmp_path, monkeypatch) -> None:
    import huggingface_hub.constants

    # the hub library reads HF_HUB_OFFLINE at import: switch the live flag (no network is tried)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match=r"no model_index\.json"):
        DiffusionPolicy.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"'someone/not-here'.*--local-dir DIR.*pass DIR"):
        DiffusionPolicy.from_pretrained("someone/not-here")
