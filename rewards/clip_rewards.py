"""CLIP-family rewards: LAION aesthetic, PickScore, HPSv2, CLIPScore, and the CLIP towers they share.

Each reward reproduces one official scoring code, named in its docstring, step for step:
preprocessing (``diffalign_rewards.preprocessing``), tokeniser, model, and score formula. Two
kinds of towers carry the weights: :class:`OpenClipTowers` (open_clip; OpenAI CLIP's state-dict
layout and tokeniser) and :class:`TransformersClipTowers` (a transformers CLIP with its
processor). Images are preprocessed in float32 and cast to the model's dtype; scores are float32.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from diffalign.rewards import RewardModel
from diffalign_rewards._weights import (
    WeightsError,
    from_pretrained,
    load_into,
    load_state_dict,
    optional_file,
    require_weights,
    resolve_file,
)
from diffalign_rewards.preprocessing import clip_pixels, hf_processor_pixels, hps_pixels

OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "open_clip.safetensors")
# keys that only OpenAI's original CLIP checkpoints carry (open_clip drops them when loading one)
OPENAI_ONLY_KEYS = ("input_resolution", "context_length", "vocab_size")


def pooled(output: Tensor | object) -> Tensor:
    """``get_*_features`` return a tensor (transformers 4) or an output whose ``pooler_output``
    holds the projected features (transformers 5)."""
    return output if isinstance(output, Tensor) else output.pooler_output


def check_activation(model_name: str, quick_gelu: bool, needs_quick_gelu: bool, evidence: str) -> None:
    """OpenAI's CLIP weights were trained with QuickGELU; loading them into a GELU model (or the
    reverse) raises nothing and silently moves every score."""
    if quick_gelu == needs_quick_gelu:
        return
    want = "QuickGELU" if needs_quick_gelu else "GELU"
    hint = (
        f"use model_name='{model_name}-quickgelu'"
        if needs_quick_gelu
        else f"use model_name='{model_name.removesuffix('-quickgelu')}'"
    )
    raise ValueError(
        f"{evidence} needs a {want} model, but open_clip's '{model_name}' uses "
        f"{'QuickGELU' if quick_gelu else 'GELU'}: {hint}"
    )


def declared_quick_gelu(config_file: Path) -> bool:
    """What an ``open_clip_config.json`` (open_clip's hub layout) says about QuickGELU."""
    try:
        value = json.loads(config_file.read_text()).get("model_cfg", {}).get("quick_gelu", False)
    except (json.JSONDecodeError, AttributeError) as err:
        raise WeightsError(f"{config_file}: not a valid open_clip_config.json ({err})") from err
    if not isinstance(value, bool):
        raise WeightsError(f"{config_file}: model_cfg.quick_gelu must be true or false, got {value!r}")
    return value


def load_open_clip_state(
    model_name: str, quick_gelu: bool, weights: str | Path, what: str, filenames: tuple[str, ...]
) -> tuple[dict[str, Tensor], Path]:
    """Weights for open_clip's ``model_name`` (and the file they came from) from a file, a
    folder, a hub repo, or one of open_clip's pretrained tags for it (e.g. ``"openai"``), checked
    against the model's activation wherever they say which one they were trained with: the tag,
    an ``open_clip_config.json`` beside them, or OpenAI's own checkpoint keys."""
    import open_clip

    tag = {} if Path(weights).exists() else open_clip.get_pretrained_cfg(model_name, str(weights))
    if tag:
        needs = bool(tag.get("quick_gelu", False))
        check_activation(model_name, quick_gelu, needs, f"open_clip's pretrained tag '{weights}'")
    source = tag["hf_hub"].rstrip("/") if tag.get("hf_hub") else weights
    config_file = optional_file(source, "open_clip_config.json")
    if config_file is not None:
        check_activation(model_name, quick_gelu, declared_quick_gelu(config_file), str(config_file))
    path = resolve_file(source, filenames, what)
    state = load_state_dict(path)
    if any(k in state for k in OPENAI_ONLY_KEYS):
        check_activation(model_name, quick_gelu, True, f"{path} (OpenAI's original CLIP checkpoint)")
        state = {k: v for k, v in state.items() if k not in OPENAI_ONLY_KEYS}
    return state, path


class OpenClipTowers(torch.nn.Module):
    """An open_clip model (OpenAI CLIP's layout and tokeniser, ``OpenAI``'s ``clip.tokenize``
    with ``truncate=True``), built from ``model_name``'s config; nothing is downloaded unless
    ``weights`` is a hub repo or a pretrained tag. ``openai_state``: weights already read from
    the file ``weights``, known to be OpenAI's CLIP (PrefPaint's checkpoint carries one).

    Raises:
        ValueError: unknown ``model_name``; no ``weights`` (unless ``random_weights``); weights
            whose activation (QuickGELU vs GELU) differs from the model's.
        FileNotFoundError: weights that cannot be found (naming what to place where).
        WeightsError: weights that cannot be read or do not fit (naming the file).
    """

    def __init__(
        self,
        model_name: str,
        weights: str | Path | None,
        what: str,
        filenames: tuple[str, ...] = OPEN_CLIP_FILES,
        openai_state: dict[str, Tensor] | None = None,
        random_weights: bool = False,
    ) -> None:
        super().__init__()
        import open_clip

        config = open_clip.get_model_config(model_name)
        if config is None:
            raise ValueError(f"{what}: open_clip has no model config named '{model_name}'")
        quick_gelu = bool(config.get("quick_gelu", False))
        state, path = None, weights
        if openai_state is not None:
            check_activation(model_name, quick_gelu, True, f"{what} in {weights} (OpenAI's CLIP)")
            state = openai_state
        elif not random_weights:
            example = "a file, a folder, a hub repo, or an open_clip pretrained tag such as 'openai'"
            source = require_weights(weights, what, "weights", example)
            state, path = load_open_clip_state(model_name, quick_gelu, source, what, filenames)
        self.model = _create_without_weights(model_name).requires_grad_(False).eval()
        if state is not None:
            load_into(self.model, state, path, what)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        size = self.model.visual.image_size
        self.image_size = size[0] if isinstance(size, (tuple, list)) else size
        self.dim = self.model.visual.output_dim

    def encode_image(self, pixels: Tensor) -> Tensor:
        dtype = next(self.model.parameters()).dtype
        return self.model.encode_image(pixels.to(dtype)).float()

    def encode_text(self, prompts: list[str]) -> Tensor:
        tokens = self.tokenizer(prompts).to(next(self.model.parameters()).device)
        return self.model.encode_text(tokens).float()


def _create_without_weights(model_name: str) -> torch.nn.Module:
    """``open_clip.create_model(model_name, pretrained=None)`` without its root-logger warning that
    no pretrained weights were loaded: ours are loaded next, or left random on purpose."""
    import open_clip

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        return open_clip.create_model(model_name, pretrained=None)
    finally:
        root.removeFilter(keep)


def load_processor(loader: Callable[[str], object], source: str | Path, what: str) -> object:
    """The CLIP processor (image processor and tokeniser) at ``source``; a folder that holds a
    model without them says to pass ``processor=``."""
    try:
        processor = from_pretrained(loader, source, what)
    except (OSError, ValueError) as err:
        if isinstance(err, FileNotFoundError) and not Path(source).exists():
            raise
        raise FileNotFoundError(
            f"{what}: no CLIP processor (tokenizer and preprocessor_config.json) at {source} ({err}); "
            f"pass processor= a folder or hub id that has them (PickScore's model card uses "
            f"laion/CLIP-ViT-H-14-laion2B-s32B-b79K)"
        ) from err
    if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
        raise FileNotFoundError(
            f"{what}: {source} holds a {type(processor).__name__}, not a CLIP processor with an image "
            f"processor and a tokenizer; pass processor= a folder that has both"
        )
    return processor


class TransformersClipTowers(torch.nn.Module):
    """A transformers CLIP (``CLIPModel``, or only its vision tower with ``vision_only``) and the
    processor saved with it (or at ``processor``): image processor and tokeniser.

    Raises:
        FileNotFoundError: a folder or hub id that cannot be found or reached.
    """

    def __init__(
        self, model: str | Path, what: str, processor: str | Path | None = None, vision_only: bool = False
    ) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoProcessor, CLIPModel, CLIPVisionModelWithProjection

        config = from_pretrained(AutoConfig.from_pretrained, model, what)
        if vision_only:
            if config.model_type == "clip":  # older exports keep projection_dim on the top config only
                config.vision_config.projection_dim = config.projection_dim
                config = config.vision_config

            def load(source: str) -> torch.nn.Module:
                from transformers.utils import logging

                # the text tower's weights in a full CLIP folder are unused here, by design
                verbosity = logging.get_verbosity()
                logging.set_verbosity_error()
                try:
                    return CLIPVisionModelWithProjection.from_pretrained(source, config=config)
                finally:
                    logging.set_verbosity(verbosity)

            self.model = from_pretrained(load, model, what)
            self.image_size, self.dim = config.image_size, config.projection_dim
            self.processor = None
        else:
            self.model = from_pretrained(CLIPModel.from_pretrained, model, what)
            self.image_size = config.vision_config.image_size
            self.dim = config.projection_dim
            self.processor = load_processor(AutoProcessor.from_pretrained, processor or model, what)
        self.model.requires_grad_(False).eval()

    def encode_image(self, pixels: Tensor) -> Tensor:
        pixels = pixels.to(self.model.dtype)
        if self.processor is None:
            return self.model(pixel_values=pixels).image_embeds.float()
        return pooled(self.model.get_image_features(pixel_values=pixels)).float()

    def encode_text(self, prompts: list[str]) -> Tensor:
        max_length = self.model.config.text_config.max_position_embeddings
        tokens = self.processor.tokenizer(
            prompts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        return pooled(self.model.get_text_features(**tokens.to(self.model.device))).float()


class ClipImageEmbedder(torch.nn.Module):
    """Image embeddings of a CLIP image tower from [0, 1] images with OpenAI CLIP's
    preprocessing (:func:`clip_pixels`); L2-normalised unless ``normalize=False``.

    ``backbone="transformers"``: ``source`` is a transformers CLIP folder or hub id;
    ``backbone="open_clip"``: ``source`` is an open_clip model name and ``weights`` its weights.
    """

    def __init__(
        self,
        source: str | Path,
        backbone: str = "transformers",
        weights: str | Path | None = None,
        normalize: bool = True,
        random_weights: bool = False,
    ) -> None:
        super().__init__()
        self.normalize = normalize
        if backbone == "transformers":
            self.towers = TransformersClipTowers(source, "CLIP image tower", vision_only=True)
        elif backbone == "open_clip":
            self.towers = OpenClipTowers(
                str(source), weights, "open_clip weights", random_weights=random_weights
            )
        else:
            raise ValueError(f"unknown backbone '{backbone}' (choose transformers or open_clip)")
        self.dim, self.image_size = self.towers.dim, self.towers.image_size

    def forward(self, images: Tensor) -> Tensor:
        pixels = clip_pixels(images, self.image_size, "round", torch.is_grad_enabled())
        emb = self.towers.encode_image(pixels)
        return F.normalize(emb, dim=-1) if self.normalize else emb


def cosine(image: Tensor, text: Tensor) -> Tensor:
    return (F.normalize(image, dim=-1) * F.normalize(text, dim=-1)).sum(-1)


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


HEAD_FILES = ("aesthetic_mlp.safetensors", "sac+logos+ava1-l14-linearMSE.pth")


class Aesthetic(RewardModel):
    """LAION aesthetic score: the MLP on L2-normalised CLIP ViT-L/14 image embeddings, as the
    improved-aesthetic-predictor's ``simple_inference.py`` computes it (OpenAI CLIP's preprocess).

    ``clip``: a transformers CLIP folder or id (``openai/clip-vit-large-patch14``); ``head``: the
    MLP weights (the released ``sac+logos+ava1-l14-linearMSE.pth``, its safetensors conversion by
    ``scripts/convert_reward_weights.py``, a folder holding ``aesthetic_mlp.safetensors``, or a hub
    repo). Scores lie roughly in [1, 10].
    """

    differentiable = True

    def __init__(
        self,
        clip: str | Path = "openai/clip-vit-large-patch14",
        head: str | Path | None = None,
        device: str | torch.device | None = None,
        random_weights: bool = False,
    ) -> None:
        super().__init__()
        state, path = None, "aesthetic head"
        if not random_weights:
            example = "sac+logos+ava1-l14-linearMSE.pth from christophschuhmann/improved-aesthetic-predictor"
            path = resolve_file(require_weights(head, "aesthetic head", "head", example), HEAD_FILES, path)
            state = load_state_dict(path)
        self.embed = ClipImageEmbedder(
            require_weights(clip, "aesthetic CLIP", "clip", "openai/clip-vit-large-patch14")
        )
        self.mlp = AestheticMLP(self.embed.dim)
        if state is not None:
            load_into(self.mlp, state, path, "aesthetic head")
        self.mlp.requires_grad_(False).eval()
        self.to(device)

    def score(self, images: Tensor, prompts: list[str] | None) -> Tensor:
        embeddings = self.embed(images).to(self.mlp.layers[0].weight.dtype)
        return self.mlp(embeddings).squeeze(-1).float()


class PickScore(RewardModel):
    """PickScore (Kirstain et al. 2023): ``logit_scale.exp() * cos(text, image)`` of a CLIP
    ViT-H/14 fine-tuned on Pick-a-Pic, as the model card's ``calc_probs`` computes it before the
    softmax (transformers ``CLIPModel`` with the processor's preprocessing and tokeniser).

    ``model``: ``yuvalkirstain/PickScore_v1`` or a local copy; ``processor``: where its processor
    lives (the model card uses ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``; default: the model
    folder). Scores lie roughly in [15, 25] for real images.
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
        source = require_weights(model, "PickScore", "model", "yuvalkirstain/PickScore_v1 or a local copy")
        self.towers = TransformersClipTowers(source, "PickScore", processor)
        self.to(device)

    def score(self, images: Tensor, prompts: list[str] | None) -> Tensor:
        towers = self.towers
        pixels = hf_processor_pixels(images, towers.processor.image_processor, torch.is_grad_enabled())
        cos = cosine(towers.encode_image(pixels), towers.encode_text(prompts))
        return towers.model.logit_scale.exp().float() * cos


class HPSv2(RewardModel):
    """HPS v2 / v2.1 (Wu et al. 2023): the cosine of an open_clip ViT-H-14 fine-tuned on HPD v2,
    as hpsv2 1.2.0's ``img_score.score`` computes it (its longest-side resize and padding, fp32).

    ``weights``: ``HPS_v2.1_compressed.pt`` (v2.1) or ``HPS_v2_compressed.pt`` (v2.0) as released,
    their safetensors conversion, a folder holding one, or the hub repo ``xswu/HPSv2`` (v2.1).
    Scores are cosines (papers print them x100), about 0.2-0.3 for real images.
    """

    needs_prompts = True
    differentiable = True
    weight_files = ("hps.safetensors", "HPS_v2.1_compressed.pt", "HPS_v2_compressed.pt")

    def __init__(
        self,
        weights: str | Path | None = "xswu/HPSv2",
        model_name: str = "ViT-H-14",
        device: str | torch.device | None = None,
        random_weights: bool = False,
    ) -> None:
        super().__init__()
        self.towers = OpenClipTowers(
            model_name, weights, "HPSv2 weights", self.weight_files, random_weights=random_weights
        )
        self.to(device)

    def score(self, images: Tensor, prompts: list[str] | None) -> Tensor:
        pixels = hps_pixels(images, self.towers.image_size)
        return cosine(self.towers.encode_image(pixels), self.towers.encode_text(prompts))


class CLIPScore(RewardModel):
    """CLIPScore (Hessel et al. 2021): ``scale * max(cos, 0)`` of a prompt and an image.

    Two references, by which weights are given:

    - ``weights`` (default ``"openai"``, open_clip's tag for OpenAI's release) with ``model_name``
      (default ``ViT-B-32-quickgelu``, OpenAI's architecture): jmhessel's ``clipscore.py`` (OpenAI
      CLIP's preprocess and ``clip.tokenize(truncate=True)``); with ``scale=2.5`` the prompt is
      prefixed "A photo depicts " as there.
    - ``model``: a transformers CLIP folder or hub id (torchmetrics' default is
      ``openai/clip-vit-large-patch14``): torchmetrics' ``clip_score`` (the CLIP processor's
      preprocessing and tokeniser), usually with ``scale=100`` and no prefix. Differences from
      torchmetrics, deliberate: a prompt longer than the text context is truncated *keeping* the
      end token (torchmetrics cuts it off, and the text feature is then read at the first token,
      whatever the prompt says); each score is clamped at 0 (torchmetrics clamps the batch mean).

    ``prefix`` overrides the prefix ("" for none). Scores lie in [0, scale].
    """

    needs_prompts = True
    differentiable = True

    def __init__(
        self,
        weights: str | Path | None = "openai",
        model_name: str = "ViT-B-32-quickgelu",
        model: str | Path | None = None,
        processor: str | Path | None = None,
        scale: float = 2.5,
        prefix: str | None = None,
        device: str | torch.device | None = None,
        random_weights: bool = False,
    ) -> None:
        super().__init__()
        if model is not None:
            self.towers = TransformersClipTowers(model, "CLIPScore", processor)
        else:
            self.towers = OpenClipTowers(
                model_name, weights, "CLIPScore weights", random_weights=random_weights
            )
        self.scale = scale
        if prefix is None:
            prefix = "A photo depicts " if scale == 2.5 else ""
        self.prefix = prefix if not prefix or prefix.endswith(" ") else prefix + " "

    def pixels(self, images: Tensor) -> Tensor:
        if isinstance(self.towers, TransformersClipTowers):
            return hf_processor_pixels(images, self.towers.processor.image_processor, torch.is_grad_enabled())
        return clip_pixels(images, self.towers.image_size, "round", torch.is_grad_enabled())

    def cosine(self, images: Tensor, prompts: list[str]) -> Tensor:
        text = self.towers.encode_text([self.prefix + p for p in prompts])
        return cosine(self.towers.encode_image(self.pixels(images)), text)

    def score(self, images: Tensor, prompts: list[str] | None) -> Tensor:
        return self.scale * self.cosine(images, prompts).clamp(min=0)
