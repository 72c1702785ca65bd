"""Each built-in reward against its official scoring code, with identical random weights.

Every reference below is written from the official code's own steps (named in each), not from
diffalign's functions: 8-bit PIL images in, the official preprocessing, tokeniser, model calls
and score formula. The image sizes are those users score (SD1.5's 512x512, 640x360, 300x700,
798x448 and SDXL's 832x1216, width x height): at 798x448 and 832x1216 the resized long side
minus 224 is 3 mod 4, where OpenAI CLIP's crop (rounded) and the HF processors' (floored)
part by a pixel. Scores must agree to 1e-4 relative.
"""

from __future__ import annotations

import html
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from reward_assets import TINY_OPEN_CLIP, TINY_OPENAI_CLIP
from safetensors.torch import load_file
from torch import nn
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from diffalign.rewards import load_reward
from diffalign_rewards._weights import WeightsError

SIZES = [(512, 512), (640, 360), (300, 700), (798, 448), (832, 1216)]  # width x height
PROMPTS = ["a red cat on a sofa", "tom &amp; jerry, oil painting"]
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def images_of(width: int, height: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    """8-bit images with detail at every scale (a pixel's shift changes the embedding) and hard
    edges (where bicubic resizing overshoots [0, 1], so clamping or not shows)."""
    g = torch.Generator().manual_seed(seed)
    blocks = (torch.rand(n, 3, height // 8 + 1, width // 8 + 1, generator=g) > 0.5).float()
    blocks = F.interpolate(blocks, scale_factor=8, mode="nearest")[..., :height, :width]
    smooth = F.interpolate(torch.rand(n, 3, 6, 6, generator=g), size=(height, width), mode="bilinear")
    x = 0.6 * blocks + 0.4 * smooth + 0.2 * torch.rand(n, 3, height, width, generator=g) - 0.1
    return (x.clamp(0, 1) * 255).round() / 255


def pil_images(images: torch.Tensor) -> list[Image.Image]:
    """As diffusers' ``numpy_to_pil``: ``(x * 255).round().astype("uint8")``."""
    arrays = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in arrays]


def openai_transform(n_px: int) -> transforms.Compose:
    """openai/CLIP ``clip/clip.py::_transform`` (also jmhessel's ``_transform_test``)."""
    return transforms.Compose(
        [
            transforms.Resize(n_px, interpolation=InterpolationMode.BICUBIC),
            transforms.CenterCrop(n_px),
            lambda image: image.convert("RGB"),
            transforms.ToTensor(),
            transforms.Normalize(OPENAI_MEAN, OPENAI_STD),
        ]
    )


def assert_parity(ours: torch.Tensor, reference: torch.Tensor) -> None:
    reference = torch.as_tensor(reference, dtype=torch.float32)
    assert ours.shape == reference.shape
    torch.testing.assert_close(ours.float(), reference, rtol=1e-4, atol=1e-7)


def fresh_open_clip(name: str, weights: Path) -> nn.Module:
    import open_clip

    model = open_clip.create_model(name, pretrained=None).eval()
    model.load_state_dict(load_file(str(weights)))
    return model


def openai_tokenize(texts: list[str], context_length: int = 77) -> torch.Tensor:
    """openai/CLIP ``clip.tokenize(texts, truncate=True)``: BPE of the cleaned, lower-cased text
    (ftfy, HTML unescaped twice), start and end tokens, cut to the context keeping the end."""
    from open_clip.tokenizer import SimpleTokenizer

    bpe = SimpleTokenizer()
    sot, eot = bpe.encoder["<start_of_text>"], bpe.encoder["<end_of_text>"]
    out = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, text in enumerate(texts):
        tokens = [sot, *bpe.encode(text), eot]
        if len(tokens) > context_length:
            tokens = tokens[:context_length]
            tokens[-1] = eot
        out[i, : len(tokens)] = torch.tensor(tokens)
    return out


# -- aesthetic: improved-aesthetic-predictor's simple_inference.py ----------------------------


def aesthetic_reference(images: torch.Tensor, clip_dir: Path, head: Path) -> np.ndarray:
    from transformers import CLIPModel

    model2 = CLIPModel.from_pretrained(clip_dir).eval()  # clip.load("ViT-L/14") stands here
    mlp = nn.Sequential(
        nn.Linear(16, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
        nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
    )  # fmt: skip
    mlp.load_state_dict({k.removeprefix("layers."): v for k, v in load_file(str(head)).items()})
    mlp.eval()
    preprocess = openai_transform(model2.config.vision_config.image_size)
    scores = []
    for pil_image in pil_images(images):
        image = preprocess(pil_image).unsqueeze(0)
        with torch.no_grad():
            out = model2.get_image_features(pixel_values=image)
            image_features = out if isinstance(out, torch.Tensor) else out.pooler_output
        a = image_features.numpy()
        l2 = np.atleast_1d(np.linalg.norm(a, 2, -1))
        l2[l2 == 0] = 1
        im_emb_arr = a / np.expand_dims(l2, -1)
        with torch.no_grad():
            scores.append(mlp(torch.from_numpy(im_emb_arr).float()).item())
    return np.array(scores)


@pytest.mark.parametrize("size", SIZES)
def test_aesthetic_matches_simple_inference(reward_assets, size: tuple[int, int]) -> None:
    images = images_of(*size)
    reward = load_reward("aesthetic", clip=reward_assets["clip"], head=reward_assets["aesthetic_head"])
    ref = aesthetic_reference(images, reward_assets["clip"], reward_assets["aesthetic_head"])
    assert_parity(reward(images), ref)


def test_the_reference_sees_a_one_pixel_crop_shift(reward_assets) -> None:
    """The parity tests can fail: at 798x448 a crop floored instead of rounded (diffalign's old
    preprocessing) moves the aesthetic score far beyond the tolerance."""
    images = images_of(798, 448)
    ref = torch.as_tensor(aesthetic_reference(images, reward_assets["clip"], reward_assets["aesthetic_head"]))
    reward = load_reward("aesthetic", clip=reward_assets["clip"], head=reward_assets["aesthetic_head"])
    resized = transforms.Resize(224, interpolation=InterpolationMode.BICUBIC)
    pixels = []
    for pil_image in pil_images(images):
        x = transforms.ToTensor()(resized(pil_image))
        left = (x.shape[-1] - 224) // 2  # floored
        pixels.append(transforms.Normalize(OPENAI_MEAN, OPENAI_STD)(x[:, :, left : left + 224]))
    with torch.no_grad():
        floored = reward.mlp(F.normalize(reward.embed.towers.encode_image(torch.stack(pixels)), dim=-1))
    assert float(((floored.squeeze(-1) - ref).abs() / ref.abs()).max()) > 1e-3


# -- PickScore: the model card's calc_probs (scores before the softmax) -----------------------


def pil_image_processor(folder: Path) -> object:
    """The CLIP image processor the model card and torchmetrics ran: transformers 4's default,
    which resamples with PIL (transformers 5 keeps it as ``CLIPImageProcessorPil``)."""
    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    except ImportError:  # transformers 4
        from transformers import CLIPImageProcessor as CLIPImageProcessorPil
    return CLIPImageProcessorPil.from_pretrained(folder)


def pickscore_reference(images: torch.Tensor, prompts: list[str], folder: Path) -> list[float]:
    from transformers import AutoModel, AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    processor.image_processor = pil_image_processor(folder)
    model = AutoModel.from_pretrained(folder).eval()

    def features(out: object) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    scores = []
    for prompt, image in zip(prompts, pil_images(images), strict=True):
        image_inputs = processor(
            images=[image], padding=True, truncation=True, max_length=77, return_tensors="pt"
        )
        text_inputs = processor(
            text=prompt, padding=True, truncation=True, max_length=77, return_tensors="pt"
        )
        with torch.no_grad():
            image_embs = features(model.get_image_features(**image_inputs))
            image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
            text_embs = features(model.get_text_features(**text_inputs))
            text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
            scores.append((model.logit_scale.exp() * (text_embs @ image_embs.T)[0]).item())
    return scores


@pytest.mark.parametrize("size", SIZES)
def test_pickscore_matches_the_model_card(reward_assets, size: tuple[int, int]) -> None:
    images = images_of(*size)
    reward = load_reward("pickscore", model=reward_assets["clip"])
    assert_parity(reward(images, PROMPTS), pickscore_reference(images, PROMPTS, reward_assets["clip"]))


# -- HPSv2: hpsv2 1.2.0's img_score.score ----------------------------------------------------


class ResizeMaxSize(nn.Module):
    """hpsv2/src/open_clip/transform.py, as released."""

    def __init__(self, max_size: int, fill: int = 0) -> None:
        super().__init__()
        self.max_size, self.fill = max_size, fill

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        height, width = img.shape[1:]
        scale = self.max_size / float(max(height, width))
        if scale != 1.0:
            new_size = tuple(round(dim * scale) for dim in (height, width))
            img = transforms.functional.resize(img, new_size, InterpolationMode.BICUBIC)
            pad_h = self.max_size - new_size[0]
            pad_w = self.max_size - new_size[1]
            img = transforms.functional.pad(
                img, padding=[pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=self.fill
            )
        return img


def hps_reference(images: torch.Tensor, prompts: list[str], weights: Path) -> list[float]:
    import open_clip

    model = fresh_open_clip(TINY_OPEN_CLIP, weights)
    tokenizer = open_clip.get_tokenizer(TINY_OPEN_CLIP)
    preprocess_val = transforms.Compose(
        [transforms.ToTensor(), ResizeMaxSize(224, fill=0), transforms.Normalize(OPENAI_MEAN, OPENAI_STD)]
    )
    result = []
    for prompt, pil_image in zip(prompts, pil_images(images), strict=True):
        with torch.no_grad():
            image = preprocess_val(pil_image).unsqueeze(0)
            text = tokenizer([prompt])
            image_features = model.encode_image(image, normalize=True)
            text_features = model.encode_text(text, normalize=True)
            logits_per_image = image_features @ text_features.T
            result.append(torch.diagonal(logits_per_image)[0].item())
    return result


@pytest.mark.parametrize("size", SIZES)
def test_hpsv2_matches_img_score(reward_assets, size: tuple[int, int]) -> None:
    images = images_of(*size)
    reward = load_reward("hpsv2", weights=reward_assets["open_clip"], model_name=TINY_OPEN_CLIP)
    assert_parity(reward(images, PROMPTS), hps_reference(images, PROMPTS, reward_assets["open_clip"]))


# -- CLIPScore w = 2.5: jmhessel's clipscore.py ------------------------------------------------


def clipscore_reference(
    images: torch.Tensor, candidates: list[str], weights: Path, w: float = 2.5
) -> np.ndarray:
    model = fresh_open_clip(TINY_OPENAI_CLIP, weights)  # clip.load("ViT-B/32") stands here
    prefix = "A photo depicts"
    if prefix[-1] != " ":
        prefix += " "
    preprocess = openai_transform(224)
    with torch.no_grad():
        image_feats = model.encode_image(torch.stack([preprocess(im) for im in pil_images(images)])).numpy()
        text_feats = model.encode_text(openai_tokenize([prefix + c for c in candidates])).numpy()
    image_feats = image_feats / np.sqrt(np.sum(image_feats**2, axis=1, keepdims=True))
    text_feats = text_feats / np.sqrt(np.sum(text_feats**2, axis=1, keepdims=True))
    return w * np.clip(np.sum(image_feats * text_feats, axis=1), 0, None), np.sum(
        image_feats * text_feats, axis=1
    )


@pytest.mark.parametrize("size", SIZES)
def test_clipscore_matches_jmhessel(reward_assets, size: tuple[int, int]) -> None:
    images = images_of(*size)
    prompts = [*PROMPTS, "a very long caption " * 30]  # cut to 77 tokens, keeping the end token
    images = torch.cat([images, images[:1]])
    reward = load_reward("clipscore", weights=reward_assets["openai_clip"], model_name=TINY_OPENAI_CLIP)
    per, cos = clipscore_reference(images, prompts, reward_assets["openai_clip"])
    with torch.no_grad():
        assert_parity(reward.cosine(images, prompts), cos)  # the clamp at 0 may hide a random model
    assert_parity(reward(images, prompts), per)


# -- CLIPScore scale 100: torchmetrics' clip_score ---------------------------------------------


def torchmetrics_reference(
    images: torch.Tensor, prompts: list[str], folder: Path, keep_end_token: bool = False
) -> torch.Tensor:
    """``_clip_score_update`` and ``_get_features`` of torchmetrics 1.9 (per-sample scores)."""
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    processor.image_processor = pil_image_processor(folder)

    def features(out: object) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    uint8 = [(im * 255).round().to(torch.uint8) for im in images]  # torchmetrics takes [0, 255] images
    with torch.no_grad():
        processed = processor(images=[i.cpu() for i in uint8], return_tensors="pt", padding=True)
        source = features(model.get_image_features(processed["pixel_values"]))
        if keep_end_token:  # what diffalign does instead of the slicing below
            processed = processor(
                text=prompts, return_tensors="pt", padding=True, truncation=True, max_length=77
            )
        else:
            processed = processor(text=prompts, return_tensors="pt", padding=True)
        max_position_embeddings = model.config.text_config.max_position_embeddings
        if processed["attention_mask"].shape[-1] > max_position_embeddings:
            processed["attention_mask"] = processed["attention_mask"][..., :max_position_embeddings]
            processed["input_ids"] = processed["input_ids"][..., :max_position_embeddings]
        target = features(model.get_text_features(processed["input_ids"], processed["attention_mask"]))
    source = source / source.norm(p=2, dim=-1, keepdim=True)
    target = target / target.norm(p=2, dim=-1, keepdim=True)
    return 100 * (source * target).sum(axis=-1)


@pytest.mark.parametrize("size", SIZES)
def test_clipscore_scale_100_matches_torchmetrics(reward_assets, size: tuple[int, int]) -> None:
    images = images_of(*size)
    reward = load_reward("clipscore", model=reward_assets["clip"], scale=100)
    ref = torchmetrics_reference(images, PROMPTS, reward_assets["clip"])
    with torch.no_grad():
        assert_parity(100 * reward.cosine(images, PROMPTS), ref)
    assert_parity(reward(images, PROMPTS), ref.clamp(min=0))  # per-sample clamp: see CLIPScore's doc


def test_long_prompts_keep_their_end_token_unlike_torchmetrics(reward_assets) -> None:
    """torchmetrics slices a long prompt's tokens and loses the end token, so the text feature is
    read at the first token whatever the prompt says; diffalign keeps the end token."""
    images = images_of(512, 512, n=2)
    long_prompts = ["cat " * 100, "dog " * 100]
    reward = load_reward("clipscore", model=reward_assets["clip"], scale=100)
    with torch.no_grad():
        ours = 100 * reward.cosine(images, long_prompts)
    assert_parity(
        ours, torchmetrics_reference(images, long_prompts, reward_assets["clip"], keep_end_token=True)
    )
    sliced = torchmetrics_reference(images, long_prompts, reward_assets["clip"])
    assert not torch.allclose(ours, sliced, rtol=1e-3)


# -- PrefPaint: the official InpaintReward.py --------------------------------------------------


class OfficialMLP(nn.Module):
    """InpaintReward.py's ``MLP``, keys and alias as released."""

    def __init__(self, input_size: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(input_size, 512), nn.Dropout(0.2), nn.Linear(512, 256))
        self.last_layer = nn.Linear(256, 1, bias=False)
        self.last_layer_weight = self.last_layer.weight

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.layers(x)
        return self.last_layer(features), features


class OfficialViTBlock(nn.Module):
    def __init__(self, feature_dim: int, num_heads: int, mlp_dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.encoder_layer = nn.TransformerEncoderLayer(
            d_model=feature_dim, nhead=num_heads, dim_feedforward=mlp_dim, dropout=dropout, batch_first=True
        )
        self.transformer_encoder = nn.TransformerEncoder(self.encoder_layer, num_layers=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.transformer_encoder(x)


class OfficialInpaintReward(nn.Module):
    """InpaintReward.py's ``ImageReward`` (the tiny QuickGELU CLIP for ``clip.load("ViT-B/32")``)."""

    def __init__(self, clip_weights: Path) -> None:
        super().__init__()
        self.clip_model = fresh_open_clip(TINY_OPENAI_CLIP, clip_weights).float()
        self.preprocess = openai_transform(224)
        self.mlp = OfficialMLP(32)
        self.vit_block = OfficialViTBlock(32, 4, 32)
        self.mean, self.std = 0.4064, 2.3021

    def score(self, inpaint_list: list, masks_rgb: list, group: bool = False) -> tuple[list, list]:
        inpaint_embeds_bs, mask_rgb_embeds_bs = [], []
        for bs in range(len(inpaint_list)):
            inpt = self.preprocess(inpaint_list[bs]).unsqueeze(0)
            msk = self.preprocess(masks_rgb[bs]).unsqueeze(0)
            inpaint_embeds_bs.append(self.clip_model.encode_image(inpt).to(torch.float32).squeeze(0))
            mask_rgb_embeds_bs.append(self.clip_model.encode_image(msk).to(torch.float32).squeeze(0))
        emb_feature = torch.cat((torch.stack(inpaint_embeds_bs), torch.stack(mask_rgb_embeds_bs)), dim=-1)
        emb_feature = self.vit_block(emb_feature.unsqueeze(1))
        scores, last_features = self.mlp(emb_feature)
        scores, last_features = torch.squeeze(scores), torch.squeeze(last_features)
        if group:
            scores = (scores - self.mean) / self.std
        return scores.detach().numpy().tolist(), last_features.detach().numpy().tolist()


@pytest.fixture(scope="module")
def official_prefpaint(reward_assets, tmp_path_factory) -> tuple[OfficialInpaintReward, Path]:
    """The official module with random weights, saved as a DDP run saves it ("module." keys)."""
    torch.manual_seed(3)
    official = OfficialInpaintReward(reward_assets["openai_clip"]).eval()
    path = tmp_path_factory.mktemp("prefpaint") / "prefpaintReward.pt"
    torch.save({"module." + k: v for k, v in official.state_dict().items()}, path)
    return official, path


def masked_input(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    return images * (masks < 0.5)


@pytest.mark.parametrize("size", SIZES)
def test_prefpaint_matches_inpaint_reward(official_prefpaint, size: tuple[int, int]) -> None:
    official, path = official_prefpaint
    images = images_of(*size)
    masks = torch.zeros(2, 1, size[1], size[0])
    masks[..., size[1] // 4 : size[1] // 2, size[0] // 3 :] = 1
    masked = masked_input(images_of(*size, seed=1), masks)
    with torch.no_grad():
        ref_scores, ref_features = official.score(pil_images(images), pil_images(masked))
        ref_group, _ = official.score(pil_images(images), pil_images(masked), group=True)
    reward = load_reward("prefpaint", weights=path, model_name=TINY_OPENAI_CLIP, heads=4, ff_dim=32)
    scores, features = reward.score_with_features(images, masks, masked)
    assert_parity(scores, ref_scores)
    torch.testing.assert_close(features, torch.tensor(ref_features), rtol=1e-4, atol=1e-6)
    normalised = load_reward(
        "prefpaint", weights=path, model_name=TINY_OPENAI_CLIP, heads=4, ff_dim=32, normalize=True
    )
    assert_parity(normalised(images, masks=masks, masked_images=masked), ref_group)


def test_prefpaint_conversion_keeps_the_checkpoints_clip(official_prefpaint, tmp_path: Path) -> None:
    """Every CLIP tensor of the official checkpoint survives conversion, and the converted file
    loads strictly and scores as the released one."""
    from script_loader import load_script

    official, path = official_prefpaint
    convert = load_script("convert_reward_weights").convert
    out = convert("prefpaint", path, tmp_path / "out", model_name=TINY_OPENAI_CLIP, heads=4, ff_dim=32)
    converted = load_file(str(out))
    clip_keys = [k for k in official.state_dict() if k.startswith("clip_model.")]
    assert len(clip_keys) == len([k for k in converted if k.startswith("clip.")]) > 30
    for key in clip_keys:
        assert torch.equal(converted["clip." + key.removeprefix("clip_model.")], official.state_dict()[key])
    images, masks = images_of(640, 360), torch.ones(2, 1, 360, 640)
    kwargs = {"model_name": TINY_OPENAI_CLIP, "heads": 4, "ff_dim": 32}
    from_pt = load_reward("prefpaint", weights=path, **kwargs)(images, masks=masks)
    torch.testing.assert_close(
        load_reward("prefpaint", weights=tmp_path / "out", **kwargs)(images, masks=masks), from_pt
    )


def test_prefpaint_checkpoint_with_an_unknown_key_is_refused(official_prefpaint, tmp_path: Path) -> None:
    _, path = official_prefpaint
    state = torch.load(path, weights_only=True)
    state["module.extra_head.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "odd.pt")
    with pytest.raises(
        WeightsError, match=r"odd\.pt: unexpected key in a PrefPaint checkpoint: extra_head\.weight"
    ):
        load_reward("prefpaint", weights=tmp_path / "odd.pt", model_name=TINY_OPENAI_CLIP, heads=4, ff_dim=32)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.pop("module.clip_model.visual.proj"), r"does not fit CLIP.*visual\.proj"),
        (
            lambda s: s.pop("module.mlp.last_layer.weight"),
            r"last_layer_weight differs from mlp\.last_layer\.weight",
        ),
        (
            lambda s: s.__setitem__("module.mlp.last_layer_weight", torch.zeros(1, 256)),
            r"last_layer_weight differs",
        ),
        (
            lambda s: s.__setitem__("module.mlp.layers.0.weight", torch.zeros(3, 3)),
            r"does not fit PrefPaintHead",
        ),
    ],
)
def test_a_broken_prefpaint_checkpoint_converts_to_nothing(
    official_prefpaint, tmp_path: Path, change, message
) -> None:
    """The converter loads what it wrote into the reward before keeping it; errors name the file."""
    from script_loader import load_script

    _, path = official_prefpaint
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, tmp_path / "broken.pt")
    convert = load_script("convert_reward_weights").convert
    with pytest.raises(WeightsError, match=r"(?s)broken\.pt.*" + message):
        convert(
            "prefpaint",
            tmp_path / "broken.pt",
            tmp_path / "out",
            model_name=TINY_OPENAI_CLIP,
            heads=4,
            ff_dim=32,
        )
    assert not (tmp_path / "out").exists()


def test_prefpaint_refuses_a_gelu_clip(official_prefpaint) -> None:
    """Its CLIP is OpenAI's ViT-B/32: QuickGELU."""
    _, path = official_prefpaint
    with pytest.raises(ValueError, match=r"needs a QuickGELU model.*-quickgelu"):
        load_reward("prefpaint", weights=path, model_name=TINY_OPEN_CLIP, heads=4, ff_dim=32)


# -- ImageReward: through its package, where it imports ----------------------------------------


def test_imagereward_where_it_can_run() -> None:
    from diffalign_rewards.imagereward import import_image_reward

    try:
        import_image_reward()
    except RuntimeError as err:
        pytest.skip(f"image-reward cannot run here: {err}")
    pytest.skip("image-reward imports here, but its BLIP weights are not available offline to compare")


@pytest.fixture
def fake_image_reward(tmp_path: Path, monkeypatch):
    """A folder on sys.path for a stand-in ``ImageReward`` package, forgotten afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("ImageReward", None)
    yield tmp_path / "ImageReward"
    sys.modules.pop("ImageReward", None)


def test_imagereward_names_the_real_import_failure(fake_image_reward: Path) -> None:
    package = fake_image_reward
    package.mkdir()
    (package / "__init__.py").write_text(
        "from transformers.modeling_utils import find_pruneable_heads_and_indices_gone\n"
    )
    with pytest.raises(
        RuntimeError,
        match=r"installed but could not be imported: ImportError.*transformers >= 4\.27\.4, < 4\.56",
    ):
        load_reward("imagereward")


def test_imagereward_without_a_med_config_says_where_to_get_it(fake_image_reward: Path) -> None:
    package = fake_image_reward
    package.mkdir()
    (package / "__init__.py").write_text(
        "def load(*args, **kwargs):\n    raise AssertionError('not reached')\n"
    )
    checkpoint = package.parent / "ImageReward.pt"
    checkpoint.write_bytes(b"")
    with pytest.raises(
        FileNotFoundError, match=r"no med_config.json at .*THUDM/ImageReward.*med_config=PATH"
    ):
        load_reward("imagereward", model=checkpoint)


# -- checks that the references are what they say -------------------------------------------


def test_html_entities_are_unescaped_as_openai_clip_does() -> None:
    assert torch.equal(
        openai_tokenize(["tom &amp; jerry"]), openai_tokenize([html.unescape("tom &amp; jerry")])
    )


def test_open_clip_config_beside_weights_is_read(reward_assets, tmp_path: Path) -> None:
    """A folder as open_clip's hub repos hold it: config and weights."""
    import shutil

    shutil.copy(reward_assets["openai_clip"], tmp_path / "open_clip_model.safetensors")
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"quick_gelu": True}}))
    reward = load_reward("clipscore", weights=tmp_path, model_name=TINY_OPENAI_CLIP)
    assert reward(images_of(64, 64), PROMPTS).shape == (2,)
    with pytest.raises(
        ValueError, match=rf"needs a QuickGELU model.*'{TINY_OPEN_CLIP}'.*{TINY_OPEN_CLIP}-quickgelu"
    ):
        load_reward("clipscore", weights=tmp_path, model_name=TINY_OPEN_CLIP)


def test_the_converter_cli_takes_custom_open_clip_configs(
    official_prefpaint, reward_assets, tmp_path: Path
) -> None:
    import subprocess

    _, path = official_prefpaint
    script = Path(__file__).resolve().parents[1] / "scripts" / "convert_reward_weights.py"
    args = [sys.executable, str(script), "prefpaint", str(path), str(tmp_path / "out")]
    args += ["--model-name", TINY_OPENAI_CLIP, "--heads", "4", "--ff-dim", "32"]
    run = subprocess.run(args, capture_output=True, text=True)
    assert run.returncode == 2 and f"open_clip has no model config named '{TINY_OPENAI_CLIP}'" in run.stderr
    configs = reward_assets["clip"].parent / "open_clip_configs"
    run = subprocess.run([*args, "--open-clip-config", str(configs)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    kwargs = {"model_name": TINY_OPENAI_CLIP, "heads": 4, "ff_dim": 32}
    images, masks = images_of(64, 64), torch.ones(2, 1, 64, 64)
    torch.testing.assert_close(
        load_reward("prefpaint", weights=tmp_path / "out", **kwargs)(images, masks=masks),
        load_reward("prefpaint", weights=path, **kwargs)(images, masks=masks),
    )
