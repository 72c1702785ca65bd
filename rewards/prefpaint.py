"""PrefPaint's inpainting reward (Liu et al. 2024; official ``InpaintReward.py``).

CLIP ViT-B/32 embeds the inpainted image and the masked input (the image with the masked
region blacked out); the two 512-d embeddings are concatenated, passed as a one-token sequence
through one transformer encoder layer (d 1024, 16 heads, feed-forward 1024, dropout 0.1), then
``Linear(1024, 512) -> Dropout -> Linear(512, 256)`` gives the 256-d features ``f`` and a
bias-free ``Linear(256, 1)`` the score. ``normalize=True`` applies the official
``(s - 0.4064) / 2.3021``. :meth:`score_with_features` also returns ``f``, which PrefPaint's
reward-trust weights need.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from diffalign.rewards import RewardModel
from diffalign_rewards._weights import load_state_dict, resolve_file
from diffalign_rewards.clip_rewards import ClipImageEmbedder

MEAN, STD = 0.4064, 2.3021


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


class PrefPaintReward(RewardModel):
    """Inpainting reward: needs ``masks`` (N, 1, H, W; 1 = inpainted region).

    ``clip``: transformers CLIP ViT-B/32 (``openai/clip-vit-base-patch32``); ``head``: the trained
    head (a file, a folder with ``prefpaint_head.safetensors``, or a hub repo); or ``path``: a
    folder holding both (``clip/`` and the head), as ``scripts/convert_reward_weights.py`` writes.
    """

    needs_masks = True
    differentiable = True

    def __init__(
        self,
        clip: str | Path = "openai/clip-vit-base-patch32",
        head: str | Path | None = None,
        normalize: bool = False,
        device: str | torch.device | None = None,
        heads: int = 16,
        ff_dim: int = 1024,
    ) -> None:
        super().__init__()
        self.embed = ClipImageEmbedder(clip, normalize=False)  # PrefPaint uses raw CLIP embeddings
        self.head = PrefPaintHead(self.embed.dim, heads, ff_dim)
        if head is not None:
            self.head.load_state_dict(
                load_state_dict(resolve_file(head, "prefpaint_head.safetensors", "PrefPaint head"))
            )
        self.head.eval()
        self.normalize = normalize
        self.to(device)

    def score_with_features(
        self, images: Tensor, masks: Tensor, masked_images: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        if masked_images is None:
            masked_images = images * (masks < 0.5)
        scores, features = self.head(self.embed(images), self.embed(masked_images))
        if self.normalize:
            scores = (scores - MEAN) / STD
        return scores, features

    def score(
        self, images: Tensor, prompts: list[str] | None, masks: Tensor, masked_images: Tensor | None = None
    ) -> Tensor:
        return self.score_with_features(images, masks, masked_images)[0]
