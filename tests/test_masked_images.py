"""Each model gets the masked image it was built with: the inpainting UNet grey, the inpainting
rewards black (PrefPaint as its official data; the Bradley-Terry reward as it trained)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from reward_assets import TINY_OPENAI_CLIP
from test_bradley_terry import _spec, synthetic_images, write_jsonl

from diffalign.data.preference import load_image
from diffalign.diffusion import DiffusionPolicy
from diffalign.images import masked_for_inpainting, masked_for_reward
from diffalign.rewards import RewardInputError, load_reward
from diffalign_rewards.bradley_terry import TrainRewardConfig, train_bradley_terry
from diffalign_rewards.clip_rewards import ClipImageEmbedder


def filled(images: torch.Tensor, masks: torch.Tensor, value: float) -> torch.Tensor:
    """The expected masked image, written out: ``value`` in the hole, the image elsewhere."""
    out = images.clone()
    hole = (masks >= 0.5).expand_as(images)
    out[hole] = value
    return out


def images_and_masks() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 32, 32, generator=g) * 0.8 + 0.1  # no pixel is 0 or 0.5 by chance
    masks = torch.zeros(2, 1, 32, 32)
    masks[0, :, 4:20, 8:30] = 1
    masks[1, :, 10:, :12] = 0.7  # soft masks count from 0.5
    return images, masks


def test_the_inpainting_unet_gets_the_grey_masked_image(tiny_pipelines) -> None:
    policy = DiffusionPolicy.from_pretrained(tiny_pipelines["inpaint"])
    seen = []
    encode = policy.encode_images
    policy.encode_images = lambda x, **kw: seen.append(x.clone()) or encode(x, **kw)  # type: ignore[method-assign]
    images, masks = images_and_masks()
    policy.prepare_inpaint(images, masks)
    assert torch.equal(seen[0], filled(images, masks, 0.5))


def test_prefpaint_scores_the_black_masked_input(reward_assets) -> None:
    reward = load_reward("prefpaint", model_name=TINY_OPENAI_CLIP, heads=4, ff_dim=32, random_weights=True)
    seen = []
    embed = reward.embed
    reward.embed = lambda x: seen.append(x.clone()) or embed(x)
    images, masks = images_and_masks()
    scores = reward(images, masks=masks)
    assert torch.equal(seen[1], filled(images, masks, 0.0))  # [inpainted, masked input]
    # the black input given is the default's; a grey one (the UNet's convention) is refused
    given = reward(images, masks=masks, masked_images=masked_for_reward(images, masks))
    assert torch.equal(given, scores)
    with pytest.raises(RewardInputError, match=r"holding 0.0 in the hole .* differ there by up to 0.5"):
        reward(images, masks=masks, masked_images=masked_for_inpainting(images, masks))


def test_bradley_terry_trains_and_scores_on_the_same_black_masked_input(
    tmp_path: Path, reward_assets, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[torch.Tensor] = []
    forward = ClipImageEmbedder.forward
    monkeypatch.setattr(
        ClipImageEmbedder, "forward", lambda self, x: seen.append(x.clone()) or forward(self, x)
    )
    data = write_jsonl(tmp_path / "data", n_images=6, n_pairs=4, masks=True)
    out = tmp_path / "bt"
    spec = _spec(reward_assets["clip"], inpainting=True)
    train_bradley_terry(TrainRewardConfig(data=data, output_dir=out, model=spec, epochs=1))
    # training embeds [image, its masked input] per image, at the backbone's size
    trained = torch.cat(seen).reshape(-1, 2, 3, 224, 224)
    mask = load_image(tmp_path / "data" / "img" / "mask.png", "mask", 224, grey=True)
    assert 0 < float((mask >= 0.5).float().mean()) < 1
    for image, masked in trained:
        assert torch.equal(masked, filled(image[None], mask[None], 0.0)[0])

    seen.clear()
    reward = load_reward("bradley_terry", path=out)
    images = torch.stack(synthetic_images(2, seed=5))
    masks = (torch.arange(32) < 16).float().expand(2, 1, 32, 32)  # the training mask's left half
    reward(images, masks=masks)
    assert torch.equal(seen[1], filled(images, masks, 0.0))
    with pytest.raises(RewardInputError, match=r"bradley_terry' was trained on masked inputs holding 0\.0"):
        reward(images, masks=masks, masked_images=masked_for_inpainting(images, masks))
    # the hole's fill is checked on values in [0, 1]: 0-255, NaN and bad masks are named
    black = masked_for_reward(images, masks)
    for bad, message in [
        (black * 255, r"masked_images` must lie in \[0, 1\].*divide by 255"),
        (torch.where(masks >= 0.5, torch.nan, images), "masked_images` contain NaN"),
        ((black * 255).to(torch.uint8), "masked_images` must be float"),
    ]:
        with pytest.raises(RewardInputError, match=message):
            reward(images, masks=masks, masked_images=bad)
    with pytest.raises(RewardInputError, match=r"masks` must lie in \[0, 1\]"):
        reward(images, masks=masks * 255)
    one_255th = torch.where(masks >= 0.5, torch.tensor(1 / 255), images)  # float32 rounds it up a hair
    reward(images, masks=masks, masked_images=one_255th)
