"""The reward registry, the reward contract, and each built-in on tiny random weights."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reward_assets import TINY_OPEN_CLIP, TINY_OPENAI_CLIP

from diffalign import rewards as registry
from diffalign.images import to_pil
from diffalign.rewards import RewardInputError, RewardModel, list_rewards, load_reward, register_reward

BUILT_INS = {
    "jpeg_compressibility", "jpeg_incompressibility", "aesthetic", "pickscore", "hpsv2", "clipscore",
    "imagereward", "prefpaint", "bradley_terry",
}  # fmt: skip
PROMPTS = ["a red cat", "a blue dog", "three apples"]


def quantised_images(n: int = 3, shape: tuple[int, int] = (60, 80), seed: int = 0) -> torch.Tensor:
    """Smooth random images that are exactly representable as uint8 (so PIL sees the same pixels)."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=shape, mode="bilinear")
    return (x * 255).round() / 255


@pytest.fixture(scope="module")
def built(reward_assets) -> dict[str, RewardModel]:
    a = reward_assets
    return {
        "jpeg_compressibility": load_reward("jpeg_compressibility"),
        "jpeg_incompressibility": load_reward("jpeg_incompressibility"),
        "aesthetic": load_reward("aesthetic", clip=a["clip"], head=a["aesthetic_head"]),
        "pickscore": load_reward("pickscore", model=a["clip"]),
        "hpsv2": load_reward("hpsv2", weights=a["open_clip"], model_name=TINY_OPEN_CLIP),
        "clipscore": load_reward("clipscore", weights=a["openai_clip"], model_name=TINY_OPENAI_CLIP),
        "prefpaint": load_reward(
            "prefpaint", model_name=TINY_OPENAI_CLIP, heads=4, ff_dim=32, random_weights=True
        ),
    }


def test_every_built_in_is_listed() -> None:
    assert set(list_rewards()) >= BUILT_INS


@pytest.mark.parametrize(
    "name",
    [
        "jpeg_compressibility",
        "jpeg_incompressibility",
        "aesthetic",
        "pickscore",
        "hpsv2",
        "clipscore",
        "prefpaint",
    ],
)
def test_built_in_scores_a_batch(built, name: str) -> None:
    reward = built[name]
    images = quantised_images()
    kwargs = {"masks": torch.zeros(3, 1, 60, 80)} if reward.needs_masks else {}
    scores = reward(images, PROMPTS if reward.needs_prompts else None, **kwargs)
    assert scores.shape == (3,) and scores.dtype == torch.float32 and scores.device == images.device
    assert bool(scores.isfinite().all())
    if name.startswith("jpeg"):
        return

    # different images score differently (the model is really used); CLIPScore clamps the
    # cosine at 0, which a random tiny model's cosines may all fall below, so compare those
    def raw(images: torch.Tensor) -> torch.Tensor:
        if name == "clipscore":
            with torch.no_grad():
                return reward.cosine(images, PROMPTS)
        return reward(images, PROMPTS if reward.needs_prompts else None, **kwargs)

    assert not torch.allclose(raw(images), raw(quantised_images(seed=1)))


def test_jpeg_reward_is_the_jpeg_size(built) -> None:
    flat = torch.full((1, 3, 64, 64), 0.5)
    noisy = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    buffer = io.BytesIO()
    to_pil(noisy)[0].save(buffer, format="JPEG", quality=95)
    assert float(built["jpeg_incompressibility"](noisy)) == pytest.approx(buffer.tell() / 1000)
    assert float(built["jpeg_compressibility"](flat)) > float(built["jpeg_compressibility"](noisy))


@pytest.mark.parametrize("shape", [(60, 80), (448, 798), (1216, 832)])
def test_differentiable_preprocessing_is_within_two_levels_of_the_exact_one(
    shape: tuple[int, int], reward_assets
) -> None:
    """The gradient path runs PIL's two 8-bit passes on float tensors; PIL computes them in fixed
    point, so a few pixels land one or two 8-bit levels apart."""
    from transformers import CLIPImageProcessor

    from diffalign_rewards.preprocessing import clip_pixels, hf_processor_pixels, hps_pixels

    images = quantised_images(shape=shape)
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
    processor = CLIPImageProcessor.from_pretrained(reward_assets["clip"])
    pairs = [
        (clip_pixels(images, 224, "round"), clip_pixels(images, 224, "round", True)),
        (hf_processor_pixels(images, processor), hf_processor_pixels(images, processor, differentiable=True)),
    ]
    for exact, approx in pairs:
        assert exact.shape == approx.shape == (3, 3, 224, 224)
        assert float(((exact - approx) * std).abs().max()) <= 2.01 / 255
    x = images.clone().requires_grad_()
    hps_pixels(x, 224).sum().backward()
    assert x.grad is not None and bool(x.grad.abs().sum() > 0)


def test_differentiable_scoring(built) -> None:
    images = quantised_images().requires_grad_()
    built["aesthetic"](images, differentiable=True).sum().backward()
    assert images.grad is not None and bool(images.grad.abs().sum() > 0)
    assert not built["aesthetic"](quantised_images()).requires_grad  # no-grad by default
    with pytest.raises(RewardInputError, match="not differentiable"):
        built["jpeg_compressibility"](quantised_images(), differentiable=True)


def test_prefpaint_features_are_checked_like_scores(built) -> None:
    images, masks = quantised_images(), (torch.rand(3, 1, 60, 80) > 0.5).float()
    scores, features = built["prefpaint"].score_with_features(images, masks)
    assert features.shape == (3, 256) and not scores.requires_grad
    torch.testing.assert_close(built["prefpaint"](images, masks=masks), scores)
    with pytest.raises(RewardInputError, match=r"`masked_images` must be float and shaped like the images"):
        built["prefpaint"].score_with_features(images, masks, images[:, :, :8])
    with pytest.raises(RewardInputError, match=r"look like \[0, 255\]"):
        built["prefpaint"].score_with_features(images * 255, masks)


def test_bad_input_is_named(built) -> None:
    images = quantised_images()
    with pytest.raises(RewardInputError, match=r"look like \[0, 255\]: divide by 255"):
        built["aesthetic"](images * 255)
    with pytest.raises(RewardInputError, match=r"\(N, 3, H, W\)"):
        built["aesthetic"](images[:, :1])
    with pytest.raises(RewardInputError, match="uint8"):
        built["jpeg_compressibility"]((images * 255).to(torch.uint8))
    with pytest.raises(RewardInputError, match="'pickscore' needs prompts"):
        built["pickscore"](images)
    with pytest.raises(RewardInputError, match="list of 3 strings"):
        built["pickscore"](images, PROMPTS[:2])
    with pytest.raises(RewardInputError, match="'prefpaint' is an inpainting reward: it needs `masks`"):
        built["prefpaint"](images)
    with pytest.raises(RewardInputError, match=r"`masks` must be \(N, 1, H, W\)"):
        built["prefpaint"](images, masks=torch.zeros(3, 1, 8, 8))
    with pytest.raises(RewardInputError, match="'aesthetic' cannot use `masks`"):
        built["aesthetic"](images, masks=torch.zeros(3, 1, 60, 80))


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(
        KeyError, match=r"unknown reward 'aesthetics'; did you mean 'aesthetic'.*known: .*pickscore"
    ):
        load_reward("aesthetics")


def test_duplicate_registration_is_an_error() -> None:
    with pytest.raises(
        ValueError, match=r"'pickscore' is already registered by diffalign_rewards\.clip_rewards:PickScore"
    ):

        @register_reward("pickscore")
        class Mine(RewardModel):
            pass


def test_module_path_fallback() -> None:
    reward = load_reward("diffalign_rewards.jpeg:JpegCompressibility", quality=50)
    assert reward.quality == 50
    with pytest.raises(TypeError, match="not a RewardModel"):
        load_reward("diffalign.rewards:list_rewards")


def test_imagereward_without_its_package_says_how_to_install() -> None:
    try:
        import ImageReward  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="pip install image-reward"):
            load_reward("imagereward")
    else:
        pytest.skip("image-reward is installed here; the missing-package path cannot be exercised")


def test_offline_hub_id_says_which_file_to_place_where(monkeypatch) -> None:
    import huggingface_hub.constants

    # the hub library reads HF_HUB_OFFLINE at import: switch the live flag (no network is tried)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    from diffalign_rewards._weights import resolve_file

    with pytest.raises(
        FileNotFoundError, match=r"download aesthetic_mlp\.safetensors from that repo.*pass DIR"
    ):
        resolve_file("someone/aesthetic-head", "aesthetic_mlp.safetensors", "aesthetic head")


def install_plugin(root: Path, dist: str, name: str, module: str, body: str) -> None:
    """A distribution on sys.path with an entry point in diffalign.rewards (no pip needed)."""
    (root / module).mkdir(parents=True)
    (root / module / "__init__.py").write_text(textwrap.dedent(body))
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[diffalign.rewards]\n{name} = {module}:Brightness\n")


PLUGIN = """
    from diffalign.rewards import RewardModel

    class Brightness(RewardModel):
        '''Mean brightness: a weightless plug-in.'''

        def score(self, images, prompts):
            return images.mean(dim=(1, 2, 3))
"""


def test_third_party_plugin_is_discovered_and_loads(tmp_path: Path, monkeypatch) -> None:
    install_plugin(tmp_path, "diffalign_brightness", "brightness", "brightness_plugin", PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    registry._entry_points.cache_clear()
    try:
        assert "brightness" in list_rewards()
        reward = load_reward("brightness")
        images = quantised_images()
        torch.testing.assert_close(reward(images), images.mean(dim=(1, 2, 3)))
    finally:
        monkeypatch.undo()
        registry._entry_points.cache_clear()
    assert "brightness" not in list_rewards()


def test_two_plugins_with_one_name_are_an_error(tmp_path: Path, monkeypatch) -> None:
    install_plugin(tmp_path / "a", "plugin_a", "glow", "glow_a", PLUGIN)
    install_plugin(tmp_path / "b", "plugin_b", "glow", "glow_b", PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path / "a"))
    monkeypatch.syspath_prepend(str(tmp_path / "b"))
    registry._entry_points.cache_clear()
    try:
        with pytest.raises(ValueError, match=r"both named 'glow': glow_\w:Brightness and glow_\w:Brightness"):
            list_rewards()
    finally:
        monkeypatch.undo()
        registry._entry_points.cache_clear()


def test_readme_plugin_example_runs(tmp_path: Path, monkeypatch) -> None:
    """The README's "write your own reward plug-in" example, executed as written."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Write your own reward plug-in", 1)[1]
    code = section.split("```python", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert "sharpness" in list_rewards()
    scores = load_reward("sharpness")(torch.rand(2, 3, 16, 16))
    assert scores.shape == (2,)
    registry._DECORATED.pop("sharpness")
    np.testing.assert_array_less(-1e-9, scores.numpy())  # a non-negative measure


@pytest.mark.parametrize(
    ("name", "kwargs", "argument"),
    [
        ("aesthetic", {}, "head="),
        ("hpsv2", {"weights": None, "model_name": TINY_OPEN_CLIP}, "weights="),
        ("clipscore", {"weights": None, "model_name": TINY_OPENAI_CLIP}, "weights="),
        ("prefpaint", {"weights": None}, "weights="),
    ],
)
def test_missing_weights_are_an_error_not_a_random_model(reward_assets, name, kwargs, argument) -> None:
    if name == "aesthetic":
        kwargs = {"clip": reward_assets["clip"]}
    with pytest.raises(ValueError, match=rf"no weights were given\. Pass {argument}.*random_weights=True"):
        load_reward(name, **kwargs)


@pytest.fixture
def offline(monkeypatch):
    import huggingface_hub.constants

    # the hub library reads HF_HUB_OFFLINE at import: switch the live flag (no network is tried)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize(
    ("name", "kwargs", "repo"),
    [
        ("clipscore", {}, "timm/vit_base_patch32_clip_224.openai"),
        ("hpsv2", {"model_name": TINY_OPEN_CLIP}, "xswu/HPSv2"),
        ("prefpaint", {"model_name": TINY_OPENAI_CLIP}, "kd5678/prefpaintReward"),
        ("pickscore", {}, "yuvalkirstain/PickScore_v1"),
        ("aesthetic", {}, "openai/clip-vit-large-patch14"),
    ],
)
def test_unreachable_hub_weights_say_what_to_place_where(offline, reward_assets, name, kwargs, repo) -> None:
    """One message for every reward (transformers' generic OSError included)."""
    if name == "aesthetic":
        kwargs = {"head": reward_assets["aesthetic_head"]}
    with pytest.raises(FileNotFoundError) as info:
        load_reward(name, **kwargs)
    message = str(info.value)
    assert f"could not be fetched from the hub repo '{repo}'" in message
    assert "Without a network, download" in message and "pass DIR instead" in message


def test_openai_weights_need_quickgelu(reward_assets, tmp_path: Path) -> None:
    """OpenAI's CLIP weights in a GELU model raise nothing by themselves: diffalign refuses."""
    with pytest.raises(ValueError, match=r"tag 'openai' needs a QuickGELU model.*'ViT-B-32-quickgelu'"):
        load_reward("clipscore", weights="openai", model_name="ViT-B-32")  # refused before any download
    from safetensors.torch import load_file, save_file

    state = load_file(str(reward_assets["openai_clip"]))
    state |= {"input_resolution": torch.tensor(224), "context_length": torch.tensor(77)}
    save_file(state, str(tmp_path / "ViT-B-32.safetensors"))  # OpenAI's own checkpoint keys
    with pytest.raises(ValueError, match=r"OpenAI's original CLIP checkpoint\) needs a QuickGELU model"):
        load_reward("clipscore", weights=tmp_path / "ViT-B-32.safetensors", model_name=TINY_OPEN_CLIP)
    reward = load_reward("clipscore", weights=tmp_path / "ViT-B-32.safetensors", model_name=TINY_OPENAI_CLIP)
    reference = load_reward("clipscore", weights=reward_assets["openai_clip"], model_name=TINY_OPENAI_CLIP)
    with torch.no_grad():
        torch.testing.assert_close(
            reward.cosine(quantised_images(), PROMPTS), reference.cosine(quantised_images(), PROMPTS)
        )


@pytest.mark.parametrize("name", ["aesthetic", "pickscore", "hpsv2", "clipscore", "prefpaint"])
def test_any_float_dtype_scores(built, name: str) -> None:
    """float64 and float16 images of 8-bit values score exactly as float32 ones (every reward
    rounds to 8 bits first); bfloat16 cannot hold every 8-bit value and scores close; a model in
    bfloat16 scores float32 images in its own dtype."""
    reward = built[name]
    images = quantised_images()
    kwargs = {"masks": torch.zeros(3, 1, 60, 80)} if reward.needs_masks else {}
    prompts = PROMPTS if reward.needs_prompts else None
    reference = reward(images, prompts, **kwargs)
    for dtype in (torch.float64, torch.float16):
        assert torch.equal(reward(images.to(dtype), prompts, **kwargs), reference)
    close = reward(images.to(torch.bfloat16), prompts, **kwargs)
    assert close.dtype == torch.float32
    torch.testing.assert_close(close, reference, rtol=0.05, atol=0.05)
    try:
        reward.to(torch.bfloat16)
        low = reward(images, prompts, **kwargs)
    finally:
        reward.to(torch.float32)
    assert low.dtype == torch.float32 and bool(low.isfinite().all())
    torch.testing.assert_close(low, reference, rtol=0.1, atol=0.1)


def test_a_model_folder_without_a_processor_says_to_pass_one(reward_assets, tmp_path: Path) -> None:
    from transformers import CLIPModel

    CLIPModel.from_pretrained(reward_assets["clip"]).save_pretrained(tmp_path / "model_only")
    with pytest.raises(FileNotFoundError, match=r"no CLIP processor .*pass processor="):
        load_reward("pickscore", model=tmp_path / "model_only")
    reward = load_reward("pickscore", model=tmp_path / "model_only", processor=reward_assets["clip"])
    assert reward(quantised_images(), PROMPTS).shape == (3,)


def test_nan_images_are_refused(built) -> None:
    images = quantised_images()
    images[1, 0, 3, 3] = float("nan")
    with pytest.raises(RewardInputError, match=r"NaN or inf \(image 1; 1 of 3\)"):
        built["aesthetic"](images)


def test_a_missing_local_path_is_not_looked_up_on_the_hub(reward_assets) -> None:
    with pytest.raises(FileNotFoundError, match=r"no such file or folder: /nope/x\.safetensors"):
        load_reward("clipscore", weights="/nope/x.safetensors", model_name=TINY_OPENAI_CLIP)
    with pytest.raises(FileNotFoundError, match=r"no such folder: \./no/clip"):
        load_reward("aesthetic", clip="./no/clip", head=reward_assets["aesthetic_head"])


@pytest.mark.parametrize(
    ("name", "kwargs", "argument"),
    [("aesthetic", {"clip": None}, "clip="), ("pickscore", {"model": None}, "model=")],
)
def test_none_for_a_model_says_what_to_pass(reward_assets, name, kwargs, argument) -> None:
    if name == "aesthetic":
        kwargs["head"] = reward_assets["aesthetic_head"]
    with pytest.raises(ValueError, match=rf"no weights were given\. Pass {argument}"):
        load_reward(name, **kwargs)


def test_the_released_aesthetic_file_name_is_found_in_a_folder(reward_assets, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    torch.save(load_file(str(reward_assets["aesthetic_head"])), tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    reward = load_reward("aesthetic", clip=reward_assets["clip"], head=tmp_path)
    reference = load_reward("aesthetic", clip=reward_assets["clip"], head=reward_assets["aesthetic_head"])
    torch.testing.assert_close(reward(quantised_images()), reference(quantised_images()))


def test_images_too_thin_to_resize_are_named(built) -> None:
    with pytest.raises(RewardInputError, match=r"images of 1000x1 pixels cannot be resized"):
        built["hpsv2"](torch.rand(1, 3, 1000, 1), ["x"])


def test_a_folder_with_several_weight_files_asks_which(reward_assets, tmp_path: Path) -> None:
    import shutil

    shutil.copy(reward_assets["aesthetic_head"], tmp_path / "aesthetic_mlp.safetensors")
    torch.save({"layers.0.weight": torch.zeros(1)}, tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    with pytest.raises(FileNotFoundError, match=r"holds several weight files .*pass the one to use"):
        load_reward("aesthetic", clip=reward_assets["clip"], head=tmp_path)


def test_model_objects_and_misspelt_options_are_named(reward_assets) -> None:
    from transformers import CLIPModel

    with pytest.raises(TypeError, match=r"PickScore: expected a file, a folder or a hub id, got a CLIPModel"):
        load_reward("pickscore", model=CLIPModel.from_pretrained(reward_assets["clip"]))
    with pytest.raises(TypeError, match=r"has no option 'wieghts'; did you mean 'weights'"):
        load_reward("hpsv2", wieghts="x")
    with pytest.raises(TypeError, match=r"differentiable is given when scoring"):
        load_reward("aesthetic", differentiable=True)


def test_prompts_must_be_strings(built) -> None:
    with pytest.raises(RewardInputError, match=r"prompts must be strings, got a NoneType"):
        built["clipscore"](quantised_images(), [None, "a", "b"])


def test_gradients_reach_pixels_on_the_bounds(built) -> None:
    """Straight-through rounding and clamping: a pixel at exactly 0 or 1 still gets a gradient."""
    images = quantised_images()
    images[:, :, :10] = 1.0
    images[:, :, -10:] = 0.0
    images.requires_grad_()
    built["hpsv2"](images, PROMPTS, differentiable=True).sum().backward()
    assert bool((images.grad[:, :, :10] != 0).any()) and bool((images.grad[:, :, -10:] != 0).any())
