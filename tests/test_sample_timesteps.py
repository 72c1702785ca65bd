"""Custom and per-sample timestep schedules in ``sample_with_trajectory`` (Diffusion-DRO's shifted
schedules, basiclab/DiffusionDRO train.py ``--buffer_perturb_timesteps``) and ``perturbed_timesteps``."""

from __future__ import annotations

import pytest
import torch

import diffalign.diffusion as diffusion
from diffalign.diffusion.policy import DiffusionPolicy
from diffalign.diffusion.sampling import (
    Trajectory,
    make_scheduler,
    perturbed_timesteps,
    sample_with_trajectory,
    step_logprob,
    trajectory_logps,
)
from diffalign.diffusion.tiny import build_tiny_pipeline

STEPS = 4
STRIDE = 1000 // STEPS
BASE = torch.arange(STEPS).flip(0) * STRIDE  # 750, 500, 250, 0
PROMPTS = ["a red cat", "two blue dogs", "a green bird"]


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> DiffusionPolicy:
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    return DiffusionPolicy.from_pretrained(build_tiny_pipeline(tmp_path_factory.mktemp("timesteps") / "sd"))


def initial_latents(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 4, 16, 16, generator=torch.Generator().manual_seed(0))


def sample(policy: DiffusionPolicy, prompts: list[str], latents: torch.Tensor, **kwargs) -> Trajectory:
    return sample_with_trajectory(
        policy,
        prompts,
        num_inference_steps=STEPS,
        guidance_scale=3.0,
        latents=latents,
        decode=False,
        **kwargs,
    )


def record_timesteps(policy: DiffusionPolicy, monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """The timestep argument of every ``guided_prediction`` call."""
    seen: list[torch.Tensor] = []
    guided = policy.guided_prediction

    def record(latents, t, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(t.clone())
        return guided(latents, t, *args, **kwargs)

    monkeypatch.setattr(policy, "guided_prediction", record)
    return seen


def sampler_kwargs(sampler: str, eta: float = 0.0, seed: int = 1) -> dict:
    return {"sampler": sampler, "eta": eta, "generator": torch.Generator().manual_seed(seed)}


@pytest.mark.parametrize("sampler", ["dpmsolver++", "ddim", "ddpm"])
def test_the_samplers_own_schedule_passed_explicitly_is_bit_identical(
    policy: DiffusionPolicy, sampler: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    own = make_scheduler(policy, sampler)  # type: ignore[arg-type]
    own.set_timesteps(STEPS)
    default = sample(policy, PROMPTS, initial_latents(), **sampler_kwargs(sampler))
    seen = record_timesteps(policy, monkeypatch)
    custom = sample(
        policy, PROMPTS, initial_latents(), **sampler_kwargs(sampler), timesteps=own.timesteps.clone()
    )
    assert torch.equal(custom.latents, default.latents)
    assert torch.equal(custom.predictions, default.predictions)
    assert torch.equal(custom.timesteps, default.timesteps) and custom.timesteps.shape == (STEPS,)
    if sampler == "ddpm":  # stochastic: the same noise draws, the same log-probs
        assert custom.log_probs is not None and torch.equal(custom.log_probs, default.log_probs)
    assert [t.dim() for t in seen] == [0] * STEPS  # one schedule: the scalar timestep, as before


@pytest.mark.parametrize("sampler", ["dpmsolver++", "ddim"])
@pytest.mark.parametrize("offsets", [(0, 17, 249), (17, 249, 17)])
def test_per_sample_schedules_equal_sampling_each_row_alone(
    policy: DiffusionPolicy, sampler: str, offsets: tuple[int, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    schedules = BASE + torch.tensor(offsets)[:, None]
    x_T = initial_latents()
    seen = record_timesteps(policy, monkeypatch)
    traj = sample(policy, PROMPTS, x_T, sampler=sampler, eta=0.0, timesteps=schedules)
    assert torch.equal(traj.timesteps.cpu(), schedules) and traj.timesteps.shape == (3, STEPS)
    # one guided prediction per step for the whole batch, with one timestep per row
    assert len(seen) == STEPS
    for j, t in enumerate(seen):
        assert torch.equal(t.cpu(), schedules[:, j])
    monkeypatch.undo()
    for i in range(3):
        alone = sample(
            policy, PROMPTS[i : i + 1], x_T[i : i + 1], sampler=sampler, eta=0.0, timesteps=schedules[i]
        )
        # batch-size rounding only (~2e-6 in the predictions); the untrained UNet's latents grow to
        # |x| ~ 60, so they are compared relative to each step's largest |x| (a wrong schedule: ~2e-2)
        scale = alone.latents[0].abs().amax(dim=(1, 2, 3), keepdim=True).clamp(min=1)
        torch.testing.assert_close(traj.latents[i] / scale, alone.latents[0] / scale, atol=1e-5, rtol=0)
        torch.testing.assert_close(traj.predictions[i], alone.predictions[0], atol=1e-5, rtol=0)
    # the rows did run their own schedules: sampling every row on row 0's gives other latents
    shared = sample(policy, PROMPTS, x_T, sampler=sampler, eta=0.0, timesteps=schedules[0])
    for i in range(3):
        differs = not torch.allclose(traj.latents[i], shared.latents[i], atol=1e-4)
        assert differs == (offsets[i] != offsets[0])


def test_identical_rows_are_one_schedule(policy: DiffusionPolicy, monkeypatch: pytest.MonkeyPatch) -> None:
    row = BASE + 17
    one = sample(policy, PROMPTS, initial_latents(), sampler="dpmsolver++", timesteps=row)
    seen = record_timesteps(policy, monkeypatch)
    rows = sample(policy, PROMPTS, initial_latents(), sampler="dpmsolver++", timesteps=row.expand(3, -1))
    assert torch.equal(rows.latents, one.latents)
    assert rows.timesteps.shape == (3, STEPS) and one.timesteps.shape == (STEPS,)
    assert [t.dim() for t in seen] == [0] * STEPS


def test_stochastic_ddim_per_sample_records_its_log_probs(policy: DiffusionPolicy) -> None:
    schedules = BASE + torch.tensor([[0], [17], [249]])
    traj = sample(policy, PROMPTS, initial_latents(), **sampler_kwargs("ddim", eta=1.0), timesteps=schedules)
    assert traj.log_probs is not None and traj.log_probs.shape == (3, STEPS)
    assert bool(traj.log_probs.isfinite().all())
    # row 0's last step, from t = 0 to alphas_cumprod[0] (set_alpha_to_one=False), has std 0: its
    # log-prob is recorded as 0, as DDPM's last step; the other rows' last steps are stochastic
    assert float(traj.log_probs[0, -1]) == 0.0 and bool((traj.log_probs[1:, -1] != 0).all())
    # each other one is the DDIM transition density on that row's own schedule
    for i in range(3):
        sch = make_scheduler(policy, "ddim")
        sch.set_timesteps(STEPS)
        sch.timesteps = schedules[i]
        for j in range(STEPS - 1 if i == 0 else STEPS):
            expected = step_logprob(
                sch,
                traj.predictions[i : i + 1, j],
                schedules[i, j],
                traj.latents[i : i + 1, j],
                traj.latents[i : i + 1, j + 1],
                eta=1.0,
            )
            torch.testing.assert_close(traj.log_probs[i : i + 1, j], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("sampler", "timesteps", "message"),
    [
        ("dpmsolver++", torch.stack([BASE, BASE]), r"shape \(T,\) or \(3, T\).*\(2, 4\)"),
        ("dpmsolver++", BASE[None, None].expand(3, 1, -1), r"shape \(T,\) or \(3, T\).*\(3, 1, 4\)"),
        ("dpmsolver++", torch.arange(5).flip(0) * 200, r"T = 5 steps per row.*num_inference_steps = 4"),
        ("dpmsolver++", torch.tensor([750, 500, 500, 0]), r"strictly decreasing.*\[750, 500, 500, 0\]"),
        ("ddpm", torch.tensor([0, 250, 500, 750]), "strictly decreasing"),
        ("dpmsolver++", torch.tensor([750, 500, 250, -1]), r"\[0, 1000\).*from -1 to 750"),
        ("ddpm", torch.tensor([1000, 750, 500, 250]), r"\[0, 1000\).*from 250 to 1000"),
        ("dpmsolver++", BASE.float(), "integer tensor, got dtype torch.float32"),
        ("ddim", torch.tensor([800, 500, 250, 0]), r"DDIM.*spaced by exactly 250, got steps of \[250, 300\]"),
    ],
)
def test_bad_timesteps_are_refused_before_any_unet_call(
    policy: DiffusionPolicy,
    sampler: str,
    timesteps: torch.Tensor,
    message: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen = record_timesteps(policy, monkeypatch)
    with pytest.raises(ValueError, match=message):
        sample(policy, PROMPTS, initial_latents(), sampler=sampler, timesteps=timesteps)
    assert seen == []


def test_uneven_spacing_is_fine_for_dpm_solver(policy: DiffusionPolicy) -> None:
    schedule = torch.tensor([800, 500, 250, 0])  # refused for DDIM above
    traj = sample(policy, PROMPTS, initial_latents(), sampler="dpmsolver++", timesteps=schedule)
    assert torch.equal(traj.timesteps.cpu(), schedule)


def test_perturbed_timesteps_are_shifted_copies_of_one_base() -> None:
    out = perturbed_timesteps(1000, 20, 2000, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2000, 20) and out.dtype == torch.long
    base = torch.arange(20).flip(0) * 50
    assert base[:3].tolist() == [950, 900, 850] and int(base[-1]) == 0
    offsets = out - base
    assert bool((offsets == offsets[:, :1]).all())  # one offset per row
    assert bool(((offsets >= 0) & (offsets < 50)).all())
    assert bool((out.diff(dim=1) < 0).all()) and int(out.min()) >= 0 and int(out.max()) < 1000
    assert offsets[:, 0].unique().tolist() == list(range(50))  # every training timestep is visited
    again = perturbed_timesteps(1000, 20, 2000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, out)
    assert not torch.equal(
        perturbed_timesteps(1000, 20, 2000, generator=torch.Generator().manual_seed(1)), out
    )


def test_perturbed_timesteps_match_the_official_formula() -> None:
    """basiclab/DiffusionDRO train.py: (T, B) = base[:, None] + randint(0, step_ratio, (1, B))."""
    num_train, steps, batch = 1000, 20, 7
    step_ratio = num_train // steps
    g = torch.Generator().manual_seed(3)
    timesteps = (torch.arange(0, steps) * step_ratio).flip(0)
    perturb = torch.randint(0, step_ratio, (1, batch), generator=g)
    official = timesteps[:, None] + perturb
    ours = perturbed_timesteps(num_train, steps, batch, generator=torch.Generator().manual_seed(3))
    assert torch.equal(ours, official.T)


def test_perturbed_timesteps_edge_cases_and_errors() -> None:
    uneven = perturbed_timesteps(1000, 3, 500, generator=torch.Generator().manual_seed(0))  # stride 333
    assert int(uneven.max()) <= 998 and bool((uneven.diff(dim=1) == -333).all())
    assert perturbed_timesteps(10, 10, 2).tolist() == [list(range(9, -1, -1))] * 2  # stride 1: no offset
    assert perturbed_timesteps(1000, 1, 3).shape == (3, 1)
    with pytest.raises(
        ValueError, match=r"num_inference_steps must lie in \[1, num_train_timesteps = 1000\]"
    ):
        perturbed_timesteps(1000, 0, 2)
    with pytest.raises(ValueError, match="got 1001"):
        perturbed_timesteps(1000, 1001, 2)
    with pytest.raises(ValueError, match=r"n .* must be >= 1, got 0"):
        perturbed_timesteps(1000, 20, 0)
    assert diffusion.perturbed_timesteps is perturbed_timesteps
    assert "perturbed_timesteps" in diffusion.__all__


def test_trajectory_logps_refuses_per_sample_schedules(
    policy: DiffusionPolicy, monkeypatch: pytest.MonkeyPatch
) -> None:
    schedules = BASE + torch.tensor([[0], [17], [249]])
    traj = sample(policy, PROMPTS, initial_latents(), **sampler_kwargs("ddim", eta=1.0), timesteps=schedules)
    seen = record_timesteps(policy, monkeypatch)
    with pytest.raises(ValueError, match=r"per-sample schedules.*\(3, 4\)"):
        trajectory_logps(policy, traj, steps=[0])
    assert seen == []
