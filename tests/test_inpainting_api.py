"""The inpainting Python API (``diffalign.inpainting``): fit, inpaint, save and reload on the tiny
SD inpainting pipeline and on a pixel-space one; every input format; bad inputs refused with a
message that names the problem."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.diffusion.policy import DiffusionPolicy
from diffalign.inpainting import InpaintingAligner

# tiny rollouts (as tests/test_policy_gradient.py): 4 DDIM steps, 2 of them trained per sample
TINY = {"reward": "rl_rewards:HoleFeatures", "rollout_steps": 4, "train_timesteps": 2}


def example(size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An 8-bit RGB image (H, W, 3) and a mask (H, W) of 0 / 255 with a square hole."""
    image = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
    return image, mask


RGB, HOLE = np.zeros((32, 32, 3), np.uint8), np.zeros((32, 32), np.uint8)


def unet_state(policy: DiffusionPolicy) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in policy.unet.state_dict().items()}


@pytest.fixture(scope="module")
def fitted(tiny_pipelines, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two steps of PrefPaint on in-memory examples given as numpy, PIL and tensors."""
    aligner = InpaintingAligner.from_pretrained(tiny_pipelines["inpaint"], **TINY)
    before = unet_state(aligner.policy)
    image, mask = example()
    examples = [
        (image, mask, "a red cat"),
        (Image.fromarray(example(seed=1)[0]), Image.fromarray(mask)),
        {
            "image": torch.from_numpy(example(seed=2)[0]).permute(2, 0, 1) / 255,
            "mask": torch.tensor(mask > 0),
        },
    ]
    logged: list[tuple[int, dict]] = []
    out = tmp_path_factory.mktemp("fit") / "run"
    result = aligner.fit(
        examples, 2, output_dir=out, batch_size=2, callbacks=[lambda step, m: logged.append((step, m))],
        optim={"lr": 1e-3},
    )  # fmt: skip
    return {"aligner": aligner, "before": before, "result": result, "logged": logged, "out": out}


def test_fit_trains_the_unet_and_calls_back_with_the_logged_metrics(fitted) -> None:
    after = unet_state(fitted["aligner"].policy)
    assert all(not torch.equal(fitted["before"][k], after[k]) for k in after)
    out, result = fitted["out"], fitted["result"]
    assert result.global_step == 2 and result.output_dir == out
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert fitted["logged"] == [(m["step"], m) for m in lines] and lines[-1] == result.metrics
    assert {"loss", "reward/mean", "weights/mean"} <= result.metrics.keys()  # HoleFeatures' trust weights
    config = json.loads((out / "config.json").read_text())
    # one optimiser step per rollout: 1 inner epoch x 1 chunk of 2 samples x 2 trained timesteps
    assert config["gradient_accumulation_steps"] == 2 and config["method"] == "prefpaint"
    assert config["data"]["resolution"] == 32 and Path(config["data"]["path"]) == out / "data"
    assert len((out / "data" / "examples.jsonl").read_text().splitlines()) == 3


def test_the_saved_pipeline_inpaints_as_the_aligner(fitted, tmp_path: Path) -> None:
    """diffusers' own pipeline on the saved folder, with a DDIM scheduler and the same seed, gives
    the aligner's raw output exactly (measured: max |difference| 0.0 in float before the 8-bit
    rounding): the same weights (safetensors round-trips them exactly), the scheduler's own step,
    the random draws in the pipeline's order and the same preprocessing (x / 255, then 2x - 1)."""
    from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline

    aligner = fitted["aligner"]
    out = aligner.save_pretrained(tmp_path / "aligned")
    pipe = StableDiffusionInpaintPipeline.from_pretrained(out).to(aligner.policy.device)  # where fit left it
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    image, mask = example(seed=5)
    ours = aligner.inpaint(image, mask, "a red cat", num_inference_steps=6, seed=3, keep_unmasked=False)
    [theirs] = pipe(
        "a red cat", image=Image.fromarray(image), mask_image=Image.fromarray(mask), num_inference_steps=6,
        guidance_scale=7.0, generator=torch.Generator().manual_seed(3), height=32, width=32,
    ).images  # fmt: skip
    assert np.array_equal(np.asarray(ours[0]), np.asarray(theirs))
    kept = np.asarray(aligner.inpaint(image, mask, "a red cat", num_inference_steps=6, seed=3)[0])
    assert np.array_equal(kept[mask == 0], image[mask == 0])  # the input, exactly, outside the hole
    assert np.array_equal(kept[mask > 0], np.asarray(ours[0])[mask > 0])
    assert not np.array_equal(np.asarray(ours[0])[mask == 0], image[mask == 0])
    reloaded = InpaintingAligner.from_pretrained(out).to(aligner.policy.device)
    assert np.array_equal(
        np.asarray(reloaded.inpaint(image, mask, "a red cat", num_inference_steps=6, seed=3)[0]), kept
    )
    after = unet_state(aligner.policy)
    assert all(torch.equal(v, after[k]) for k, v in unet_state(DiffusionPolicy.from_pretrained(out)).items())


def test_a_second_fit_goes_on_from_the_first(fitted, tmp_path: Path) -> None:
    aligner = fitted["aligner"]
    first = unet_state(aligner.policy)
    # the first run's examples, read back from their folder
    aligner.fit(fitted["out"] / "data", 1, output_dir=tmp_path / "again", batch_size=2, optim={"lr": 1e-3})
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    start = Path(config["model"]["pretrained"])
    assert start == tmp_path / "again" / "initial_pipeline"  # the first fit's weights, saved for the second
    assert all(
        torch.equal(v, first[k]) for k, v in unet_state(DiffusionPolicy.from_pretrained(start)).items()
    )
    assert any(not torch.equal(v, first[k]) for k, v in unet_state(aligner.policy).items())


def test_accumulation_makes_one_optimiser_step_per_rollout(tiny_pipelines, tmp_path: Path) -> None:
    """Every stochastic step trained (train_timesteps none: all 4 of a 4-step rollout), 2 x 2
    samples in chunks of 3: 1 epoch x 2 chunks x 4 timesteps = 8 micro-batches per rollout."""
    options = {**TINY, "train_timesteps": None, "samples_per_prompt": 2, "train_batch_size": 3}
    aligner = InpaintingAligner.from_pretrained(tiny_pipelines["inpaint"], **options)
    image, mask = example()
    result = aligner.fit([(image, mask)] * 2, 1, output_dir=tmp_path / "run", batch_size=2)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["gradient_accumulation_steps"] == 8 and result.global_step == 1


@pytest.fixture(scope="module")
def aligner(tiny_pipelines) -> InpaintingAligner:
    return InpaintingAligner.from_pretrained(tiny_pipelines["inpaint"], **TINY)


def test_pil_numpy_and_tensor_inputs_give_the_same_result(aligner: InpaintingAligner) -> None:
    image, mask = example(seed=7)
    as_float = torch.from_numpy(image).permute(2, 0, 1) / 255
    inputs = [
        (image, mask),
        (Image.fromarray(image), Image.fromarray(mask).convert("RGB")),  # any mask mode, converted to L
        (image.astype(np.float32) / 255, (mask > 0)[..., None]),
        (as_float, torch.from_numpy(mask > 0).float()),
        (as_float[None], torch.from_numpy(mask > 0)[None, None]),
    ]
    results = [
        np.asarray(aligner.inpaint(x, m, "a cat", num_inference_steps=2, seed=1, num_images=2)[1])
        for x, m in inputs
    ]
    for other in results[1:]:
        assert np.array_equal(results[0], other)


@pytest.mark.parametrize(
    ("image", "mask", "message"),
    [
        (RGB, np.zeros((16, 32), np.uint8), r"image is 32x32 \(WxH\), the mask 32x16"),
        (RGB, np.full((32, 32), 128, np.uint8), "mask is not binary: 1024 of 1024 pixels"),
        (RGB, np.full((32, 32), 0.5), r"Threshold it first, e\.g\. mask >= 0\.5"),
        (RGB[:30, :30], HOLE[:30, :30], r"30x30 \(WxH\) is not a multiple of 4"),
        (np.zeros((32, 32, 4), np.uint8), HOLE, r"\(H, W, 3\) RGB.*\(4 channels\)"),
        (torch.zeros(1, 32, 32), HOLE, r"\(3, H, W\) or \(1, 3, H, W\) RGB.*\(1 channels\)"),
        (RGB, np.zeros((32, 32, 3), np.uint8), "mask: one channel expected"),
        (RGB, torch.zeros(2, 32, 32), r"mask: one channel expected.*\(2, 32, 32\)"),
        (np.full((32, 32, 3), 255.0), HOLE, r"image values must lie in \[0, 1\], got 255 to 255"),
        (-torch.ones(3, 32, 32), HOLE, r"must lie in \[0, 1\], got -1 to -1"),
    ],
    ids=["sizes", "grey-mask", "float-mask", "not-multiple", "rgba", "grey-image", "rgb-mask",
         "2-channel-mask", "8-bit-as-float", "negative"],
)  # fmt: skip
def test_bad_inputs_are_refused_naming_the_problem(aligner, image: Any, mask: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        aligner.inpaint(image, mask, num_inference_steps=2)


def test_bad_training_inputs_fail_before_training(aligner, tmp_path: Path) -> None:
    image, mask = example()
    with pytest.raises(ValueError, match=r"example 1: image and mask differ in size"):
        aligner.fit([(image, mask), (image, mask[:16])], 1, output_dir=tmp_path / "a")
    with pytest.raises(ValueError, match="'max_steps' cannot be overridden: pass steps="):
        aligner.fit([(image, mask)], 1, output_dir=tmp_path / "b", max_steps=3)
    with pytest.raises(ValueError, match=r"'data\.path' cannot be overridden"):
        aligner.fit([(image, mask)], 1, output_dir=tmp_path / "c", data={"path": "x"})
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="is not an empty folder"):
        aligner.fit([(image, mask)], 1, output_dir=tmp_path / "used")


def test_a_missing_or_wrong_reward_path_fails_clearly(tiny_pipelines, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-reward"
    with pytest.raises(FileNotFoundError, match=f"reward_path: {missing} does not exist"):
        InpaintingAligner.from_pretrained(tiny_pipelines["inpaint"], reward_path=missing)
    with pytest.raises(
        ValueError, match="give reward 'rl_rewards:HoleFeatures' its files through reward_kwargs"
    ):
        InpaintingAligner.from_pretrained(tiny_pipelines["inpaint"], reward_path=tmp_path, **TINY)
    empty = tmp_path / "empty"
    empty.mkdir()
    aligner = InpaintingAligner.from_pretrained(tiny_pipelines["inpaint"], reward_path=empty, rollout_steps=4)
    assert aligner.options["reward_kwargs"] == {"weights": str(empty)}
    image, mask = example()
    # the recipe builds the reward before any model loads, and says which files it looked for
    with pytest.raises(ValueError, match=f"cannot build reward 'prefpaint'.*{empty} has none of prefpaint"):
        aligner.fit([(image, mask)], 1, output_dir=tmp_path / "run")


def test_a_text_to_image_pipeline_or_an_unknown_option_is_refused(tiny_pipelines) -> None:
    with pytest.raises(
        ValueError, match="text-to-image pipeline: its UNet takes 4 input channels, an inpainting UNet 9"
    ):
        InpaintingAligner.from_pretrained(tiny_pipelines["sd"], **TINY)
    with pytest.raises(ValueError, match="unknown key 'rollout_step'; did you mean 'rollout_steps'"):
        InpaintingAligner.from_pretrained(tiny_pipelines["inpaint"], rollout_step=4)


def test_a_pixel_space_pipeline_fits_with_lora_saves_and_reloads(tmp_path: Path) -> None:
    """The demo world's inpainting model (no VAE): LoRA fused into the UNet after the fit; the
    saved folder loads through DiffusionPolicy and the aligner (diffusers' pipeline loads it with
    vae=None but cannot run without a VAE)."""
    from diffalign.demo import pretrain

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DIFFALIGN_CACHE", str(tmp_path / "cache"))
        base = pretrain.pretrained_base(
            pretrain.PretrainConfig(steps=1, batch_size=2, inpainting=True), progress=False
        )
    aligner = InpaintingAligner.from_pretrained(base, **TINY)
    assert aligner.size_multiple == 4 and aligner.native_size == 16
    before = unet_state(aligner.policy)
    image, mask = example(16)
    lora = {"lora": {"rank": 4}}
    aligner.fit(
        [(image, mask)] * 2, 1, output_dir=tmp_path / "run", batch_size=2, model=lora, optim={"lr": 1e-2}
    )
    assert not aligner.policy.has_lora and unet_state(aligner.policy).keys() == before.keys()
    assert any(not torch.equal(v, before[k]) for k, v in unet_state(aligner.policy).items())
    out = aligner.save_pretrained(tmp_path / "aligned")
    assert json.loads((out / "model_index.json").read_text())["vae"] == [None, None]
    assert DiffusionPolicy.from_pretrained(out).vae is None
    ours = aligner.inpaint(image, mask, "a cat", num_inference_steps=3, seed=0)
    again = (
        InpaintingAligner.from_pretrained(out)
        .to(aligner.policy.device)
        .inpaint(image, mask, "a cat", num_inference_steps=3, seed=0)
    )
    assert np.array_equal(np.asarray(ours[0]), np.asarray(again[0]))


def test_the_readme_demo_world_example_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """README's complete example on the demo world, executed as written but for one optimiser step
    and 16 training pictures, with a 1-step base in the cache and an untrained reward of the demo's
    architecture where the demo writes its reward model."""
    import shutil

    from diffalign.config import load_config, packaged_config
    from diffalign.demo import pretrain
    from diffalign_rewards.bradley_terry import TrainRewardConfig
    from diffalign_rewards.prefpaint_training import build_trainee, save_prefpaint

    monkeypatch.setenv("DIFFALIGN_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    quick = pretrain.pretrained_base(pretrain.PretrainConfig(steps=1, batch_size=2, inpainting=True), False)
    shutil.copytree(quick, pretrain.base_folder(pretrain.PretrainConfig(inpainting=True)))
    spec = load_config(
        TrainRewardConfig, packaged_config("rewards", "prefpaint_demo.yaml"), ["data=x", "output_dir=x"]
    ).prefpaint
    reward = build_trainee(spec)
    reward.v_inverse = torch.eye(reward.head.last_layer.in_features)
    save_prefpaint(reward, {}, tmp_path / "outputs" / "demo" / "reward_model")

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = readme.split("A complete run on the demo world", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    for written, quick_value in (("steps=60", "steps=1"), ("inpainting(256", "inpainting(16")):
        assert code.count(written) == 1
        code = code.replace(written, quick_value)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["result"].global_step == 1
    assert [im.size for im in namespace["images"]] == [(16, 16)] * 4
    assert capsys.readouterr().out.startswith("1 ")  # the callback saw step 1's reward
    saved = tmp_path / "outputs" / "demo-inpainting-aligned"
    assert DiffusionPolicy.from_pretrained(saved).is_inpainting
