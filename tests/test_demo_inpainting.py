"""The demo world's inpainting variant: its base pipeline, the inpainting data files, and the
evaluation of inpainting models (the same noise per example for every model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffalign.data.inpainting import (
    InpaintingDataset,
    collate_inpainting,
    read_inpainting_examples,
    write_inpainting_examples,
)
from diffalign.demo.world import World
from diffalign.images import masked_for_inpainting


@pytest.fixture(scope="module")
def inpainting_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's inpainting base after two steps of pretraining, in its own cache."""
    from diffalign.demo import pretrain

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DIFFALIGN_CACHE", str(tmp_path_factory.mktemp("cache")))
        return pretrain.pretrained_base(
            pretrain.PretrainConfig(steps=2, batch_size=4, inpainting=True), progress=False
        )


def test_the_text_to_image_cache_key_is_unchanged() -> None:
    """Bases cached before the inpainting option keep their key; the inpainting base has its own."""
    from diffalign.demo.pretrain import PretrainConfig

    assert PretrainConfig().key() == "18279411ff8f"
    assert PretrainConfig(inpainting=True).key() != PretrainConfig().key()


def test_the_inpainting_base_reloads_and_inpaints(inpainting_base: Path) -> None:
    from diffalign.diffusion.policy import DiffusionPolicy
    from diffalign.diffusion.sampling import sample_with_trajectory

    index = json.loads((inpainting_base / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionInpaintPipeline" and index["vae"] == [None, None]
    policy = DiffusionPolicy.from_pretrained(inpainting_base)
    # 3 noisy-image channels, the mask, 3 masked-image channels; pixel space: no VAE
    assert policy.is_inpainting and policy.unet.config.in_channels == 7 and policy.vae is None
    ex = World(0).inpainting(3, torch.Generator().manual_seed(1))
    trajectory = sample_with_trajectory(
        policy, ex.prompts, num_inference_steps=2, guidance_scale=2.0, image=ex.images, mask=ex.masks
    )
    assert trajectory.images.shape == (3, 3, 16, 16)
    assert torch.equal(trajectory.inpaint.mask, ex.masks)
    assert torch.equal(trajectory.inpaint.masked_image_latents, ex.masked_images * 2 - 1)


def examples(n: int = 4, size: int = 16) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    ex = World(0).inpainting(n, torch.Generator().manual_seed(2))
    images = torch.nn.functional.interpolate(ex.images, size=size, mode="nearest")
    masks = torch.nn.functional.interpolate(ex.masks, size=size, mode="nearest")
    return images, masks, ex.prompts


def test_written_examples_read_back(tmp_path: Path) -> None:
    images, masks, prompts = examples()
    path = write_inpainting_examples(tmp_path / "data", images, masks, prompts)
    records = read_inpainting_examples(path)
    assert read_inpainting_examples(tmp_path / "data") == records  # the folder reads its JSONL
    assert [r.prompt for r in records] == prompts and records[1].where == f"{path}:2"
    batch = collate_inpainting([InpaintingDataset(records, 16)[i] for i in range(len(records))])
    assert batch["prompts"] == prompts
    torch.testing.assert_close(batch["images"], (images * 255).round() / 255, atol=0, rtol=0)
    assert torch.equal(batch["masks"], masks)


def test_a_folder_of_images_and_masks_resized_to_the_resolution(tmp_path: Path) -> None:
    """``X.png`` / ``X.jpg`` with ``X.mask.png`` and an optional ``X.txt``; a 32x24 example is
    resized and center-cropped to 16 x 16, its mask binarised."""
    images, masks, _ = examples(2, size=32)
    pil_images = [Image.fromarray((im.permute(1, 2, 0) * 255).byte().numpy()) for im in images[:, :, 4:28]]
    pil_masks = [Image.fromarray((m[0] * 255).byte().numpy()) for m in masks[:, :, 4:28]]
    pil_images[0].save(tmp_path / "a.png")
    pil_masks[0].save(tmp_path / "a.mask.png")
    (tmp_path / "a.txt").write_text(" a red ring\n")
    pil_images[1].save(tmp_path / "b.jpg", quality=95)
    pil_masks[1].save(tmp_path / "b.mask.png")
    records = read_inpainting_examples(tmp_path)
    assert [(r.prompt, Path(r.where).name) for r in records] == [("a red ring", "a.png"), ("", "b.jpg")]
    item = InpaintingDataset(records, 16)[0]
    assert item["image"].shape == (3, 16, 16) and item["mask"].shape == (1, 16, 16)
    assert set(item["mask"].unique().tolist()) <= {0.0, 1.0} and item["mask"].sum() > 0


def write_rows(folder: Path, rows: list[dict]) -> Path:
    images, masks, _ = examples(2)
    write_inpainting_examples(folder, images, masks)
    Image.new("L", (8, 8)).save(folder / "images" / "small.mask.png")
    (folder / "images" / "corrupt.png").write_bytes(b"not a png")
    path = folder / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


GOOD = {"image": "images/0.png", "mask": "images/0.mask.png", "prompt": "a red ring"}
BAD_FILES = [
    ({"image": "images/1.png", "mask": "images/missing.mask.png"}, FileNotFoundError, "missing.mask.png"),
    ({"image": "images/1.png", "mask": "images/small.mask.png"}, ValueError, "8x8, its image 16x16"),
    ({"image": "images/corrupt.png", "mask": "images/1.mask.png"}, ValueError, "cannot decode.*corrupt.png"),
]


@pytest.mark.parametrize(("row", "error", "message"), BAD_FILES, ids=["missing", "size", "corrupt"])
def test_bad_files_name_the_row_or_are_skipped_and_counted(
    tmp_path: Path, row: dict, error: type, message: str
) -> None:
    path = write_rows(tmp_path, [GOOD, row])
    records = read_inpainting_examples(path)
    with pytest.raises(error, match=rf"rows\.jsonl:2: .*{message}"):
        InpaintingDataset(records, 16)[1]
    skipping = InpaintingDataset(records, 16, on_bad_sample="skip")
    assert skipping[1]["prompt"] == "a red ring" and skipping.skipped == 1  # the next record instead


def test_malformed_rows_name_the_row_or_are_dropped_with_a_count(tmp_path: Path) -> None:
    path = write_rows(tmp_path, [GOOD, {"image": "images/1.png"}, {**GOOD, "prompt": 3}])
    with pytest.raises(ValueError, match=r"rows\.jsonl:2: missing key 'mask'"):
        read_inpainting_examples(path)
    with pytest.warns(UserWarning, match="skipped 2 malformed rows of 3"):
        assert len(read_inpainting_examples(path, on_bad_sample="skip")) == 1
    with pytest.raises(
        ValueError, match=r"every row of the inpainting examples is malformed; the first: .*rows\.jsonl:1"
    ):
        read_inpainting_examples(write_rows(tmp_path / "none", [{"image": "images/1.png"}]), "skip")
    (tmp_path / "folder").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "folder" / "lonely.png")
    with pytest.raises(FileNotFoundError, match=r"lonely\.png: image file not found: .*lonely\.mask\.png"):
        InpaintingDataset(read_inpainting_examples(tmp_path / "folder"), 8)[0]


@pytest.mark.parametrize("model", ["demo", "latent"])
def test_inpainting_evaluation_gives_each_example_its_own_noise(
    model: str, inpainting_base: Path, tiny_pipelines: dict[str, str]
) -> None:
    """Two evaluations of one model on the same examples and seed are identical (for a latent model,
    the VAE's posterior sample of the masked image too), whatever the batch size."""
    from diffalign.diffusion.policy import DiffusionPolicy
    from diffalign.evaluation import compare, evaluate, measure, sample_images
    from diffalign.images import paste_unmasked

    folder = inpainting_base if model == "demo" else tiny_pipelines["inpaint"]
    policy = DiffusionPolicy.from_pretrained(folder)
    images, masks, prompts = examples(3, size=policy.unet.config.sample_size * policy.vae_scale_factor)
    rows = [0, 0, 1, 2, 2]  # examples 0 and 2 twice: diversity among the samples of one input
    args = ([prompts[i] for i in rows], "jpeg_compressibility")
    inputs = {"images": images[rows], "masks": masks[rows]}
    first = evaluate(policy, *args, seed=3, steps=2, **inputs)
    again = evaluate(policy, *args, seed=3, steps=2, **inputs)
    assert torch.equal(first.images, again.images) and compare(first, again)["win_rate"] == 0.5
    assert first.diversity is not None and first.diversity > 0
    batched = sample_images(policy, args[0], seed=3, steps=2, batch_size=2, **inputs)
    torch.testing.assert_close(batched, first.images, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="one image and mask per prompt: 5 prompts, 2 images"):
        sample_images(policy, args[0], seed=3, images=images[:2], masks=masks[:2])
    kept = evaluate(policy, *args, seed=3, steps=2, keep_unmasked=True, **inputs)
    hole = inputs["masks"] >= 0.5
    assert torch.equal(kept.images[hole.expand_as(kept.images)], first.images[hole.expand_as(first.images)])
    assert torch.equal(
        kept.images[~hole.expand_as(kept.images)], inputs["images"][~hole.expand_as(kept.images)]
    )
    with pytest.raises(ValueError, match="keep_unmasked pastes inpainting inputs back"):
        sample_images(policy, args[0], seed=3, keep_unmasked=True)
    # measuring samples drawn once (the demo's pasted and raw reports) equals sampling again
    pasted = measure(paste_unmasked(first.images, *inputs.values()), *args, seed=3, **inputs)
    assert torch.equal(pasted.scores, kept.scores) and pasted.diversity == kept.diversity
    assert not torch.equal(pasted.scores, first.scores)
    with pytest.raises(ValueError, match="one sample per prompt: 4 samples, 5 prompts"):
        measure(first.images[:4], *args, seed=3, **inputs)
    with pytest.raises(ValueError, match="both their `images` and `masks`"):
        measure(first.images, *args, seed=3, images=inputs["images"])


def test_diversity_groups_samples_by_their_masked_input() -> None:
    """Examples that show the model the same masked input (same prompt) form one group, even where
    the hidden pixels differ."""
    from diffalign.evaluation import input_groups

    images, masks, _ = examples(2)
    hidden_differs = images[0].clone()
    hidden_differs[masks[0].expand_as(images[0]).bool()] = 1.0
    stacked = torch.stack([images[0], hidden_differs, images[0], images[1]])
    groups = input_groups(["a", "a", "b", "a"], stacked, masks[[0, 0, 0, 1]])
    assert groups[0] == groups[1] and len(set(groups)) == 3
    assert torch.equal(
        masked_for_inpainting(stacked[0], masks[0]), masked_for_inpainting(stacked[1], masks[0])
    )


def test_an_inpainting_reward_gets_the_masks_and_the_black_masked_inputs(inpainting_base: Path) -> None:
    from diffalign.diffusion.policy import DiffusionPolicy
    from diffalign.evaluation import evaluate
    from diffalign.images import masked_for_reward
    from diffalign.rewards import RewardModel

    class HoleBrightness(RewardModel):
        needs_masks = True
        masked_fill = 0.0  # the inputs' check: black holes, as masked_for_reward makes them

        def score(self, images: torch.Tensor, prompts: list[str] | None, **context: torch.Tensor):
            seen.append(context)
            return (images * context["masks"]).mean(dim=(1, 2, 3))

    seen: list[dict] = []
    images, masks, prompts = examples(2)
    policy = DiffusionPolicy.from_pretrained(inpainting_base)
    result = evaluate(policy, prompts, HoleBrightness(), 0, steps=2, images=images, masks=masks)
    assert torch.equal(seen[0]["masks"], masks)
    assert torch.equal(seen[0]["masked_images"], masked_for_reward(images, masks))
    assert torch.equal(result.scores, (result.images * masks).mean(dim=(1, 2, 3)))


def test_reduced_prefpaint_demo_runs_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``diffalign demo --method prefpaint`` at a toy scale (a base after 2 pretraining steps,
    12 masked pictures of reward data, 2 RL steps): every stage runs and reports what it measured.
    Whether it aligns is the full demo's question (README, issue notes), not this test's."""
    import diffalign.demo.inpainting as demo_inpainting
    from diffalign.cli import main

    monkeypatch.setenv("DIFFALIGN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(demo_inpainting, "REWARD_EXAMPLES", 12)
    monkeypatch.setattr(demo_inpainting, "TRAIN_EXAMPLES", 8)
    monkeypatch.setattr(demo_inpainting, "EVAL_EXAMPLES", 4)
    out = tmp_path / "demo"
    code = main([
        "demo", "--method", "prefpaint", f"output_dir={out}", "pretrain.steps=2", "classifier_steps=2",
        "sampler_steps=2", "train_overrides=[max_steps=2, batch_size=4, gradient_accumulation_steps=1, "
        "checkpoint_every=2, method_options.train_batch_size=4, method_options.rollout_steps=3, "
        "method_options.train_timesteps=2]",
    ])  # fmt: skip
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["training_steps"] == 2 and report["trust_weights"] is True
    assert 0 < report["training_seconds"] < report["seconds"]
    # every pair of a masked picture's 4 inpaintings is annotated once
    assert report["annotation"]["pairs"] == 12 * 6
    pairs = report["annotation"]["pairs"] - report["annotation"]["ties"]
    model = report["reward_model"]
    assert model["train_pairs"] + model["validation_pairs"] == pairs and model["validation_pairs"] > 0
    for name in ("base", "aligned"):
        assert 0 <= report[f"reward_model_agreement_{name}"] <= 1
        # 4 held-out pictures x 4 inpaintings: at most 4 * 6 within-picture pairs
        assert 0 < report[f"reward_model_agreement_{name}_pairs"] <= 24
    assert report["held_out"] == "4 unseen masked pictures x 4 samples"
    # judged as users receive them (input pasted back), and as the UNet drew them
    raw = report["raw_output"]
    assert {"base", "aligned", "win_rate", "fidelity_drop_points"} <= set(raw)
    assert raw["base"]["reward"] != report["base"]["reward"]
    for name in ("before_after.png", "rollout_reward.png", "reward_model/v_inverse.safetensors"):
        assert (out / name).stat().st_size > 0
