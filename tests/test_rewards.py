"""The reward registry, the reward contract, and each built-in on tiny random weights."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reward_assets import TINY_OPEN_CLIP

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
        "clipscore": load_reward("clipscore", weights=a["open_clip"], model_name=TINY_OPEN_CLIP),
        "prefpaint": load_reward("prefpaint", clip=a["clip"], head=a["prefpaint_head"], heads=4, ff_dim=32),
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


@pytest.mark.parametrize("shape", [(32, 32), (60, 80), (80, 60), (100, 37)])
def test_clip_preprocessing_matches_the_pil_processor(built, reward_assets, shape: tuple[int, int]) -> None:
    """PickScore/aesthetic's tensor path vs transformers' CLIPImageProcessor on PIL images."""
    from transformers import CLIPImageProcessor

    from diffalign.rewards import resize_center_crop

    images = quantised_images(shape=shape)
    processor = CLIPImageProcessor.from_pretrained(reward_assets["clip"])
    via_pil = processor(images=to_pil(images), return_tensors="pt").pixel_values
    via_tensor = resize_center_crop(images, 32)
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
    # PIL resamples in fixed point and rounds to uint8: within 1.5 levels
    assert float(((via_pil - via_tensor) * std).abs().max()) <= 1.5 / 255
    aesthetic = built["aesthetic"]
    with torch.no_grad():
        from_pil = aesthetic.mlp(
            F.normalize(aesthetic.embed.model(pixel_values=via_pil).image_embeds, dim=-1)
        ).squeeze(-1)
    torch.testing.assert_close(aesthetic(images), from_pil, atol=1e-3, rtol=0)


@pytest.mark.parametrize("name", ["hpsv2", "clipscore"])
def test_open_clip_preprocessing_matches_the_pil_transform(built, name: str) -> None:
    """HPS: open_clip's resize-longest-and-pad transform; CLIPScore: open_clip's default one."""
    import open_clip

    reward = built[name]
    images = quantised_images(shape=(60, 80))
    transform = open_clip.image_transform(
        32, is_train=False, resize_mode="longest" if name == "hpsv2" else None
    )
    via_pil = torch.stack([transform(im) for im in to_pil(images)])
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
    # PIL's fixed-point resampling and uint8 rounding: within 1.5 levels
    assert float(((via_pil - reward.preprocess(images)) * std).abs().max()) <= 1.5 / 255
    with torch.no_grad():
        image = F.normalize(reward.model.encode_image(via_pil), dim=-1)
        text = F.normalize(
            reward.model.encode_text(reward.tokenizer([reward.prompt_prefix + p for p in PROMPTS])), dim=-1
        )
    cos = (image * text).sum(-1)
    with torch.no_grad():
        torch.testing.assert_close(reward.cosine(images, PROMPTS), cos, atol=1e-3, rtol=0)
    expected = cos if name == "hpsv2" else 2.5 * cos.clamp(min=0)
    torch.testing.assert_close(reward(images, PROMPTS), expected, atol=1e-3, rtol=0)


def test_differentiable_scoring(built) -> None:
    images = quantised_images().requires_grad_()
    built["aesthetic"](images, differentiable=True).sum().backward()
    assert images.grad is not None and bool(images.grad.abs().sum() > 0)
    assert not built["aesthetic"](quantised_images()).requires_grad  # no-grad by default
    with pytest.raises(RewardInputError, match="not differentiable"):
        built["jpeg_compressibility"](quantised_images(), differentiable=True)


def test_prefpaint_features_and_normalisation(built, reward_assets) -> None:
    images, masks = quantised_images(), (torch.rand(3, 1, 60, 80) > 0.5).float()
    scores, features = built["prefpaint"].score_with_features(images, masks)
    assert features.shape == (3, 256)
    torch.testing.assert_close(built["prefpaint"](images, masks=masks), scores)
    normalised = load_reward(
        "prefpaint",
        clip=reward_assets["clip"],
        head=reward_assets["prefpaint_head"],
        heads=4,
        ff_dim=32,
        normalize=True,
    )
    torch.testing.assert_close(normalised(images, masks=masks), (scores - 0.4064) / 2.3021)


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
        load_reward("diffalign.rewards:resize_center_crop")


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
