"""PrefPaint's inpainting reward (Liu et al. 2024), as the official ``InpaintReward.py`` scores.

OpenAI CLIP ViT-B/32 (``clip.load("ViT-B/32")`` cast to float32; here open_clip's
``ViT-B-32-quickgelu``, the same architecture and state-dict layout) embeds the inpainted image
and the masked input with OpenAI CLIP's preprocessing; the two raw 512-d embeddings are
concatenated and passed as a one-token sequence through one transformer encoder layer (d 1024,
16 heads, feed-forward 1024), then ``Linear(1024, 512) -> Dropout -> Linear(512, 256)`` gives
the 256-d features ``f`` and a bias-free ``Linear(256, 1)`` the score. ``normalize=True``
applies the official ``(s - 0.4064) / 2.3021`` (its ``config.group``).

Deliberately not copied: the official RL script never puts the reward model in eval mode, so
its dropout layers stay active while it scores; here scoring is deterministic (eval mode).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from diffalign.images import masked_for_reward
from diffalign.rewards import RewardModel
from diffalign_rewards._weights import WeightsError, load_into, load_state_dict, require_weights, resolve_file
from diffalign_rewards.clip_rewards import OpenClipTowers
from diffalign_rewards.preprocessing import clip_pixels

MEAN, STD = 0.4064, 2.3021
WEIGHT_FILES = ("prefpaint.safetensors", "prefpaintReward.pt")
OFFICIAL_PREFIXES = (
    ("clip_model.", "clip."),
    ("vit_block.transformer_encoder.layers.0.", "head.block."),
    ("mlp.layers.", "head.mlp."),
    ("mlp.last_layer.", "head.last_layer."),
)


class PrefPaintHead(torch.nn.Module):
    def __init__(
        self, embed_dim: int = 512, heads: int = 16, ff_dim: int = 1024, dropout: float = 0.1
    ) -> None:
        super().__init__()
        width = 2 * embed_dim
        self.block = torch.nn.TransformerEncoderLayer(width, heads, ff_dim, dropout, batch_first=True)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(width, 512), torch.nn.Dropout(0.2), torch.nn.Linear(512, 256)
        )
        self.last_layer = torch.nn.Linear(256, 1, bias=False)

    def forward(self, inpainted: Tensor, masked: Tensor) -> tuple[Tensor, Tensor]:
        x = self.block(torch.cat([inpainted, masked], dim=-1).unsqueeze(1)).squeeze(1)
        features = self.mlp(x)
        return self.last_layer(features).squeeze(-1), features


def split_official_state(state: dict[str, Tensor], path: Path | str) -> dict[str, Tensor]:
    """The official checkpoint's keys (``prefpaintReward.pt``) as diffalign's ``clip.*`` and
    ``head.*``.

    The official module registers some tensors twice: ``mlp.last_layer_weight`` aliases
    ``mlp.last_layer.weight``, and ``vit_block.encoder_layer.*`` is the template that
    ``nn.TransformerEncoder`` deep-copies into ``vit_block.transformer_encoder.layers.0.*`` (the
    copy is the one its forward runs). Both duplicates are dropped.

    Raises:
        WeightsError: naming ``path``: a key the official ``ImageReward`` module does not have,
            or an alias that differs from the weight it aliases.
    """
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith("vit_block.encoder_layer.") or key == "mlp.last_layer_weight":
            continue
        for official, ours in OFFICIAL_PREFIXES:
            if key.startswith(official):
                out[ours + key.removeprefix(official)] = value
                break
        else:
            raise WeightsError(f"{path}: unexpected key in a PrefPaint checkpoint: {key}")
    alias, weight = state.get("mlp.last_layer_weight"), state.get("mlp.last_layer.weight")
    if alias is not None and (
        weight is None or alias.shape != weight.shape or not torch.equal(alias, weight)
    ):
        raise WeightsError(f"{path}: mlp.last_layer_weight differs from mlp.last_layer.weight (its alias)")
    return out


def read_prefpaint_weights(path: Path) -> dict[str, Tensor]:
    """diffalign's ``prefpaint.safetensors`` or the official release's ``.pt`` (read with
    ``weights_only=True``), as ``clip.*`` and ``head.*`` keys.

    Raises:
        WeightsError: naming ``path``: unreadable, unknown keys, or a part missing.
    """
    state = load_state_dict(path)
    if any(k.startswith(("clip_model.", "mlp.layers.")) for k in state):
        state = split_official_state(state, path)
    stray = [k for k in state if not k.startswith(("clip.", "head."))]
    if stray:
        raise WeightsError(f"{path}: keys outside clip.* and head.* in PrefPaint weights: {stray[:3]}")
    for part in ("clip.", "head."):
        if not any(k.startswith(part) for k in state):
            raise WeightsError(
                f"{path}: no {part}* tensors in PrefPaint weights; convert the official "
                f"prefpaintReward.pt with scripts/convert_reward_weights.py prefpaint (or pass it as is)"
            )
    return state


class PrefPaintReward(RewardModel):
    """Inpainting reward: needs ``masks`` (N, 1, H, W; 1 = inpainted region).

    ``weights``: the official ``prefpaintReward.pt`` (hub repo ``kd5678/prefpaintReward``, the
    default), its conversion ``prefpaint.safetensors`` by ``scripts/convert_reward_weights.py``,
    or a folder holding either; CLIP and head come from the same file. ``model_name``: the
    open_clip architecture of its CLIP. ``masked_images``: the masked input, black in the hole
    as the reward was trained (:func:`~diffalign.images.masked_for_reward`; the official data is
    the original image so blacked out), not the grey input of the inpainting UNet; by default
    the inpainted image with ``masks`` blacked out.
    """

    needs_masks = True
    differentiable = True
    masked_fill = 0.0

    def __init__(
        self,
        weights: str | Path | None = "kd5678/prefpaintReward",
        model_name: str = "ViT-B-32-quickgelu",
        normalize: bool = False,
        device: str | torch.device | None = None,
        heads: int = 16,
        ff_dim: int = 1024,
        random_weights: bool = False,
    ) -> None:
        super().__init__()
        state, path = None, "PrefPaint weights"
        if not random_weights:
            example = "prefpaintReward.pt from kd5678/prefpaintReward, or its conversion"
            source = require_weights(weights, "PrefPaint weights", "weights", example)
            path = resolve_file(source, WEIGHT_FILES, "PrefPaint weights")
            state = read_prefpaint_weights(path)
        clip_state = None if state is None else {k[5:]: v for k, v in state.items() if k.startswith("clip.")}
        self.towers = OpenClipTowers(
            model_name, path, "PrefPaint CLIP", openai_state=clip_state, random_weights=True
        )
        self.head = PrefPaintHead(self.towers.dim, heads, ff_dim)
        if state is not None:
            head_state = {k[5:]: v for k, v in state.items() if k.startswith("head.")}
            load_into(self.head, head_state, path, "PrefPaint head")
        self.head.requires_grad_(False).eval()
        self.normalize = normalize
        self.to(device)

    def embed(self, images: Tensor) -> Tensor:
        pixels = clip_pixels(images, self.towers.image_size, "round", torch.is_grad_enabled())
        return self.towers.encode_image(pixels)

    def score_with_features(
        self,
        images: Tensor,
        masks: Tensor,
        masked_images: Tensor | None = None,
        *,
        differentiable: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """Scores (N,) and the 256-d features ``f`` (N, 256) that PrefPaint's trust weights use;
        inputs are checked as :meth:`forward` checks them, and scored under no-grad unless
        ``differentiable``."""
        context = (
            {"masks": masks} if masked_images is None else {"masks": masks, "masked_images": masked_images}
        )
        images, _, context = self.validate(images, None, context)
        with torch.set_grad_enabled(differentiable):
            return self.scores_and_features(images, **context)

    def scores_and_features(
        self, images: Tensor, masks: Tensor, masked_images: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        if masked_images is None:
            masked_images = masked_for_reward(images, masks)
        dtype = self.head.last_layer.weight.dtype
        scores, features = self.head(self.embed(images).to(dtype), self.embed(masked_images).to(dtype))
        scores, features = scores.float(), features.float()
        if self.normalize:
            scores = (scores - MEAN) / STD
        return scores, features

    def score(
        self, images: Tensor, prompts: list[str] | None, masks: Tensor, masked_images: Tensor | None = None
    ) -> Tensor:
        return self.scores_and_features(images, masks, masked_images)[0]
