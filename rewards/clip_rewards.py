"""CLIP-family rewards: LAION aesthetic, PickScore, HPSv2, CLIPScore.

Preprocessing runs on tensors and follows each model's own: CLIP's bicubic resize of the
shortest side and center crop with OpenAI's mean and std (aesthetic, PickScore, CLIPScore);
HPS's resize of the longest side and zero padding to a square (open_clip's
``resize_longest_max``). Model weights load from local folders/files or hub ids.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from diffalign.rewards import CLIP_MEAN, CLIP_STD, RewardModel, resize_center_crop
from diffalign_rewards._weights import load_state_dict, resolve_file


def load_clip_vision(source: str | Path) -> torch.nn.Module:
    """A transformers CLIP vision tower with its projection, from a full CLIP folder or id.

    The projection width lives on the top-level CLIP config; older exports do not repeat it in
    ``vision_config``, so it is copied over before loading.
    """
    from transformers import AutoConfig, CLIPVisionModelWithProjection

    config = AutoConfig.from_pretrained(str(source))
    if config.model_type == "clip":
        vision = config.vision_config
        vision.projection_dim = config.projection_dim
        config = vision
    return (
        CLIPVisionModelWithProjection.from_pretrained(str(source), config=config).requires_grad_(False).eval()
    )


def pooled(output: Tensor | object) -> Tensor:
    """``get_*_features`` return a tensor (transformers 4) or an output whose ``pooler_output``
    holds the projected features (transformers 5)."""
    return output if isinstance(output, Tensor) else output.pooler_output


def load_open_clip(model_name: str, weights: str | Path | None, filename: str, what: str) -> torch.nn.Module:
    """An open_clip model built from its config (``pretrained=None``: nothing is downloaded)
    with ``weights`` (a file, a folder holding ``filename``, or a hub repo) loaded into it."""
    import open_clip

    model = open_clip.create_model(str(model_name), pretrained=None).requires_grad_(False).eval()
    if weights is not None:
        model.load_state_dict(load_state_dict(resolve_file(weights, filename, what)))
    return model


def open_clip_image_size(model: torch.nn.Module) -> int:
    size = model.visual.image_size
    return size[0] if isinstance(size, (tuple, list)) else size


class ClipImageEmbedder(torch.nn.Module):
    """Image embeddings of a CLIP image tower (transformers or open_clip), from [0, 1] tensors
    with CLIP's preprocessing; L2-normalised unless ``normalize=False``."""

    def __init__(
        self,
        source: str | Path,
        backbone: str = "transformers",
        weights: str | Path | None = None,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        self.backbone, self.normalize = backbone, normalize
        if backbone == "transformers":
            self.model = load_clip_vision(source)
            self.image_size = self.model.config.image_size
            self.dim = self.model.config.projection_dim
        elif backbone == "open_clip":
            self.model = load_open_clip(str(source), weights, "open_clip.safetensors", "open_clip weights")
            self.image_size = open_clip_image_size(self.model)
            self.dim = self.model.visual.output_dim
        else:
            raise ValueError(f"unknown backbone '{backbone}' (choose transformers or open_clip)")

    def forward(self, images: Tensor) -> Tensor:
        pixels = resize_center_crop(images, self.image_size)
        if self.backbone == "transformers":
            emb = self.model(pixel_values=pixels.to(self.model.dtype)).image_embeds
        else:
            emb = self.model.encode_image(pixels)
        emb = emb.float()
        return F.normalize(emb, dim=-1) if self.normalize else emb


class AestheticMLP(torch.nn.Module):
    """The improved-aesthetic-predictor head (``sac+logos+ava1-l14-linearMSE``)."""

    def __init__(self, dim: int = 768) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(dim, 1024),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, embeddings: Tensor) -> Tensor:
        return self.layers(embeddings)


class Aesthetic(RewardModel):
    """LAION aesthetic score: the MLP on L2-normalised CLIP ViT-L/14 image embeddings.

    ``clip``: a transformers CLIP folder or id (``openai/clip-vit-large-patch14``); ``head``: the
    MLP weights (a file, a folder with ``aesthetic_mlp.safetensors``, or a hub repo), converted
    from the released ``.pth`` by ``scripts/convert_reward_weights.py``.
    """

    differentiable = True

    def __init__(
        self,
        clip: str | Path = "openai/clip-vit-large-patch14",
        head: str | Path | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__()
        self.embed = ClipImageEmbedder(clip)
        self.mlp = AestheticMLP(self.embed.dim)
        if head is not None:
            self.mlp.load_state_dict(
                load_state_dict(resolve_file(head, "aesthetic_mlp.safetensors", "aesthetic head"))
            )
        self.mlp.requires_grad_(False).eval()
        self.to(device)

    def score(self, images: Tensor, prompts: list[str] | None) -> Tensor:
        return self.mlp(self.embed(images)).squeeze(-1)


class PickScore(RewardModel):
    """PickScore (Kirstain et al. 2023): ``logit_scale.exp() * cos(text, image)`` of a CLIP
    ViT-H/14 fine-tuned on Pick-a-Pic, through transformers.

    ``model``: ``yuvalkirstain/PickScore_v1`` or a local copy; ``processor``: where its tokenizer
    lives (``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``; default: the model folder).
    """

    needs_prompts = True
    differentiable = True

    def __init__(
        self,
        model: str | Path = "yuvalkirstain/PickScore_v1",
        processor: str | Path | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__()
        from transformers import AutoTokenizer, CLIPModel

        self.model = CLIPModel.from_pretrained(str(model)).requires_grad_(False).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(processor or model))
        self.to(device)

    def score(self, images: Tensor, prompts: list[str] | None) -> Tensor:
        pixels = resize_center_crop(images, self.model.config.vision_config.image_size)
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        image = pooled(self.model.get_image_features(pixel_values=pixels.to(self.model.dtype)))
        text = pooled(self.model.get_text_features(**{k: v.to(self.device) for k, v in tokens.items()}))
        image, text = F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)
        return self.model.logit_scale.exp().float() * (image * text).sum(-1)


def resize_longest_pad(images: Tensor, size: int) -> Tensor:
    """HPS's preprocessing: longest side to ``size`` (bicubic, antialiased), zero padding to a
    centred square, CLIP normalisation (the padding is black before normalising)."""
    h, w = images.shape[-2:]
    scale = size / max(h, w)
    new_h, new_w = round(h * scale), round(w * scale)
    x = F.interpolate(images, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False).clamp(
        0, 1
    )
    pad_h, pad_w = size - new_h, size - new_w
    x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
    mean = torch.tensor(CLIP_MEAN, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean) / std


class OpenClipReward(RewardModel):
    """A prompt-image cosine from an open_clip model (shared by HPSv2 and CLIPScore)."""

    needs_prompts = True
    differentiable = True
    weights_file = "open_clip_pytorch_model.bin"
    prompt_prefix = ""

    def __init__(
        self,
        model_name: str,
        weights: str | Path | None,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__()
        import open_clip

        self.model = load_open_clip(model_name, weights, self.weights_file, f"{type(self).__name__} weights")
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.image_size = open_clip_image_size(self.model)
        self.to(device)

    def preprocess(self, images: Tensor) -> Tensor:
        return resize_center_crop(images, self.image_size)

    def cosine(self, images: Tensor, prompts: list[str]) -> Tensor:
        image = F.normalize(self.model.encode_image(self.preprocess(images)).float(), dim=-1)
        tokens = self.tokenizer([self.prompt_prefix + p for p in prompts]).to(self.device)
        text = F.normalize(self.model.encode_text(tokens).float(), dim=-1)
        return (image * text).sum(-1)


class HPSv2(OpenClipReward):
    """HPS v2 / v2.1 (Wu et al. 2023): cosine of an open_clip ViT-H-14 fine-tuned on HPD v2.

    ``weights``: ``HPS_v2_compressed.pt`` (v2.0) or ``HPS_v2.1_compressed.pt`` (v2.1) converted to
    safetensors, a folder holding ``hps.safetensors``, or a hub repo. Scores are cosines
    (benchmarks print them x100).
    """

    weights_file = "hps.safetensors"

    def __init__(
        self,
        weights: str | Path | None = None,
        model_name: str = "ViT-H-14",
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__(model_name, weights, device)

    def preprocess(self, images: Tensor) -> Tensor:
        return resize_longest_pad(images, self.image_size)

    def score(self, images: Tensor, prompts: list[str] | None) -> Tensor:
        return self.cosine(images, prompts)


class CLIPScore(OpenClipReward):
    """CLIPScore (Hessel et al. 2021): ``w * max(cos, 0)`` with the prompt prefixed by
    "A photo depicts "; ``w = 2.5`` (the paper) or ``scale=100`` (torchmetrics' convention,
    which also drops the prefix)."""

    def __init__(
        self,
        weights: str | Path | None = None,
        model_name: str = "ViT-B-32",
        scale: float = 2.5,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__(model_name, weights, device)
        self.scale = scale
        self.prompt_prefix = "A photo depicts " if scale == 2.5 else ""

    def score(self, images: Tensor, prompts: list[str] | None) -> Tensor:
        return self.scale * self.cosine(images, prompts).clamp(min=0)
