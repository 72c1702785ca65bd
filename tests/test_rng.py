"""Per-sample random streams: a sample's draws depend on the seed and its place in the data stream,
not on how the batch around it is split (the unit-level half of the distributed-equivalence test)."""

from __future__ import annotations

import pytest
import torch

from diffalign import rng
from diffalign.diffusion.likelihood import denoising_logp
from diffalign.diffusion.policy import DiffusionPolicy, drop_captions
from diffalign.training.loop import row_generators


def test_stream_seeds_depend_on_the_position_alone() -> None:
    whole = rng.stream_seeds(7, 10, 4)
    assert rng.stream_seeds(7, 10, 2) + rng.stream_seeds(7, 12, 2) == whole
    assert len(set(whole)) == 4 and all(0 <= s < 2**63 for s in whole)
    assert rng.stream_seeds(8, 10, 4) != whole  # another run's seed, other streams
    assert rng.child_seeds(whole[:1], 3) == rng.child_seeds(whole, 3)[:3]
    assert len(set(rng.child_seeds(whole, 3))) == 12


def test_row_draws_equal_separate_draws_and_refuse_a_wrong_count() -> None:
    seeds = rng.stream_seeds(0, 0, 3)
    rows = rng.randn((3, 2, 5), rng.generators(seeds))
    for i, g in enumerate(rng.generators(seeds)):
        torch.testing.assert_close(rows[i : i + 1], torch.randn((1, 2, 5), generator=g), rtol=0, atol=0)
    split = torch.cat(
        [rng.randint(1000, 1, rng.generators(seeds[:1])), rng.randint(1000, 2, rng.generators(seeds[1:]))]
    )
    assert torch.equal(split, rng.randint(1000, 3, rng.generators(seeds)))
    one = torch.Generator().manual_seed(4)  # a single generator draws as torch does
    assert torch.equal(rng.rand(3, one), torch.rand(3, generator=torch.Generator().manual_seed(4)))
    with pytest.raises(ValueError, match="2 generators for 3 rows"):
        rng.randn((3, 4), rng.generators(seeds[:2]))


def test_a_batch_split_in_two_draws_what_the_whole_batch_draws(tiny_pipelines) -> None:
    """Noise, timesteps, caption dropout and VAE samples of rows 0-3 in one call equal those of
    rows 0-1 and 2-3 in two calls: what a two-process run of the same global batch relies on."""
    policy = DiffusionPolicy.from_pretrained(tiny_pipelines["sd"])
    seeds = rng.stream_seeds(3, 0, 4)
    images = torch.rand(4, 3, 32, 32)
    prompts = ["a", "b", "c", "d"]

    def draws(rows: slice) -> tuple[torch.Tensor, ...]:
        streams = rng.generators(seeds[rows])
        latents = policy.encode_images(images[rows], streams)
        dropped = drop_captions(prompts[rows], 0.5, streams)
        cond = policy.encode_prompts(prompts[rows])
        out = denoising_logp(policy, latents[:, None], cond, with_reference=False, generator=streams)
        return latents, torch.tensor([p == "" for p in dropped]), out.timesteps, out.noise, out.policy

    whole = draws(slice(0, 4))
    halves = [torch.cat(parts) for parts in zip(draws(slice(0, 2)), draws(slice(2, 4)), strict=True)]
    for a, b in zip(whole, halves, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    assert len(set(whole[2].tolist())) > 1  # rows draw their own timesteps


def test_row_generators_come_from_the_loops_seeds_and_are_none_without() -> None:
    batch = {"prompts": ["x", "y"], "sample_seeds": rng.stream_seeds(1, 4, 3)}  # a short last batch
    streams = row_generators(batch, 2, per_row=2)
    expected = rng.generators(rng.child_seeds(batch["sample_seeds"][:2], 2))
    assert [torch.rand(1, generator=g) for g in streams] == [torch.rand(1, generator=g) for g in expected]
    assert row_generators({"prompts": ["x"]}, 1) is None
    assert row_generators(["not", "a", "dict"], 3) is None
