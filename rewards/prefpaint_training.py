"""Training PrefPaint's reward model on preference pairs, and its trust matrix ``V^-1``.

The PrefPaint release (Kenkenzaii/PrefPaint) ships the trained reward and ``V_inverse.pt`` but
not the code that trained them; this trainer fits the released architecture
(:class:`~diffalign_rewards.prefpaint.PrefPaintReward`) with the Bradley-Terry loss of
diffalign's own reward trainer, ``BCE(sigma(s_w - s_l), label)`` (ties, when kept, 0.5), on
inpainting pairs: the chosen and rejected inpaintings of one masked input, each scored beside
that input blacked out in the hole. Pairs come from ``read_preference_pairs``: pair rows with a
``mask``, or scored inpaintings grouped by input.

Recipe: read pairs -> build the model (official weights, open_clip weights for the CLIP, or
random) -> decode each distinct image once (frozen CLIP: embed it once; trained CLIP: keep its
8-bit pixels) -> split pairs -> train -> score and take the features ``f`` of every image in
eval mode -> ``V^-1 = trust_matrix(f of the training images, ridge)`` -> save.

The output folder, read by ``load_reward("prefpaint", weights=FOLDER)``: ``prefpaint.safetensors``
(``clip.*``, ``head.*``), ``prefpaint.json`` (architecture, open_clip config, score mean and std
on the training images for ``normalize=True``), ``v_inverse.safetensors``, and ``metrics.json``:
pair accuracy and loss as the Bradley-Terry trainer reports them, and the trust bounds
``||f V^-1||`` (min, median, max) on the training images and on the held-out images no training
pair uses: the RL stage weights a sample by ``clamp(exp(-0.05 b + 0.7), 1, 2.21)`` (official
``train_inpainting_model.py``), so bounds above 14 get weight 1.

Pairs that share an image (the inpaintings of one masked input compared with each other) are
held out together (``split_usable_pairs``), so held-out accuracy is on unseen images. Limit:
``train_backbone`` holds every distinct image in memory (about 300 KB each at 224 px).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from diffalign.data.preference import read_preference_pairs
from diffalign_rewards._weights import load_into
from diffalign_rewards.bradley_terry import (
    PairImage,
    PairSplit,
    TrainRewardConfig,
    embed_pair_images,
    index_pair_images,
    load_pair_images,
    split_usable_pairs,
)
from diffalign_rewards.clip_rewards import OPEN_CLIP_FILES, load_open_clip_state
from diffalign_rewards.prefpaint import (
    SPEC_FILE,
    V_INVERSE_KEY,
    PrefPaintArchitecture,
    PrefPaintHead,
    PrefPaintReward,
    PrefPaintTrainSpec,
    register_open_clip_config,
    trust_bounds,
    trust_matrix,
)

__all__ = [
    "PairScorer",
    "augment_pixels",
    "build_trainee",
    "fit_prefpaint",
    "save_prefpaint",
    "train_prefpaint",
]

WEIGHTS_FILE, V_INVERSE_FILE = "prefpaint.safetensors", "v_inverse.safetensors"


def build_trainee(spec: PrefPaintTrainSpec) -> PrefPaintReward:
    """The model to train: from ``init_weights`` (CLIP and head), or ``clip_weights`` (CLIP) and
    the official MLP initialisation, or all random; its head carries ``spec``'s dropout, its CLIP
    image tower trains with ``train_backbone``.

    Raises:
        ValueError, FileNotFoundError, WeightsError: as :class:`PrefPaintReward` and
            :class:`~diffalign_rewards.clip_rewards.OpenClipTowers` raise them.
    """
    import open_clip

    register_open_clip_config(spec.model_name, spec.open_clip_config, "prefpaint.open_clip_config")
    arch = {
        f.name: getattr(spec, f.name)
        for f in dataclasses.fields(PrefPaintArchitecture)
        if f.name != "open_clip_config"
    }
    if spec.init_weights is not None:
        reward = PrefPaintReward(weights=spec.init_weights, **arch)
    else:
        reward = PrefPaintReward(random_weights=True, **arch)
        if spec.clip_weights is not None:
            quick_gelu = bool(open_clip.get_model_config(spec.model_name).get("quick_gelu", False))
            state, path = load_open_clip_state(
                spec.model_name, quick_gelu, spec.clip_weights, "prefpaint.clip_weights", OPEN_CLIP_FILES
            )
            load_into(reward.towers.model, state, path, "prefpaint.clip_weights")
    head = PrefPaintHead(
        reward.towers.dim,
        spec.heads,
        spec.ff_dim,
        spec.dropout,
        spec.hidden_dim,
        spec.feature_dim,
        spec.mlp_dropout,
    )
    if spec.init_weights is None:
        head.reset_like_official()
    else:
        head.load_state_dict(reward.head.state_dict())
    reward.head = head
    reward.towers.model.visual.requires_grad_(spec.train_backbone)
    return reward


def augment_pixels(pixels: Tensor, kind: str) -> Tensor:
    """``pixels`` (B, ..., S, S), each sample independently flipped left-right with probability
    1/2 (``"hflip"``), or moved by one of the 8 flips and quarter turns of the square, uniformly
    (``"dihedral"``); ``"none"`` returns them as they are. Draws from torch's global generator."""
    if kind == "none":
        return pixels
    flip = (torch.rand(len(pixels)) < 0.5).view(-1, *[1] * (pixels.dim() - 1))
    out = torch.where(flip, pixels.flip(-1), pixels)
    if kind == "dihedral":
        turns = torch.randint(4, (len(pixels),))
        for k in (1, 2, 3):
            out[turns == k] = torch.rot90(out[turns == k], k, dims=(-2, -1))
    return out


class PairScorer(torch.nn.Module):
    """Scores (B,) and features (B, D) of the distinct images by index, from ``inputs``: CLIP
    embeddings (U, 2, E) of (image, masked input) when the tower is frozen, or their 8-bit
    pixels (U, 2, 3, S, S) when it trains, then moved by ``augment`` (:func:`augment_pixels`)
    in training mode. One module, so that DDP wraps what trains."""

    def __init__(self, reward: PrefPaintReward, inputs: Tensor, augment: str = "none") -> None:
        super().__init__()
        self.reward = reward
        self.inputs = inputs  # a plain attribute: DDP would broadcast a buffer at every step
        self.augment = augment

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        x = self.inputs[ids.to(self.inputs.device)]
        if self.training:
            x = augment_pixels(x, self.augment)
        x = x.to(self.reward.head.last_layer.weight.device)
        if not x.is_floating_point():
            x = self.reward.embed(x.flatten(0, 1).float() / 255).unflatten(0, x.shape[:2])
        return self.reward.head(x[:, 0], x[:, 1])


def cache_inputs(
    reward: PrefPaintReward, images: list[PairImage], cfg: TrainRewardConfig, device: torch.device
) -> tuple[Tensor, Tensor]:
    """:class:`PairScorer`'s ``inputs`` (frozen tower: embeddings on ``device``; trained: 8-bit
    pixels on the CPU) and (U,) bool: which images were usable."""
    size = reward.towers.image_size
    if not cfg.prefpaint.train_backbone:
        reward.eval()
        return embed_pair_images(images, reward.embed, size, True, cfg, device)
    pixels = torch.zeros(len(images), 2, 3, size, size, dtype=torch.uint8)

    def keep(ids: Tensor, batch: Tensor) -> None:
        pixels[ids] = (batch * 255).round().to(torch.uint8)  # decoded images are exact k / 255

    return pixels, load_pair_images(images, size, True, cfg, keep)


def train_pairs(scorer: PairScorer, split: PairSplit, cfg: TrainRewardConfig) -> PairScorer:
    """AdamW on the Bradley-Terry loss of the training pairs; returns the scorer, unwrapped."""
    from accelerate import Accelerator

    accelerator = Accelerator()
    reward = scorer.reward
    groups = [{"params": list(reward.head.parameters()), "lr": cfg.lr}]
    if cfg.prefpaint.train_backbone:
        backbone_lr = cfg.prefpaint.backbone_lr if cfg.prefpaint.backbone_lr is not None else cfg.lr
        groups.append({"params": list(reward.towers.model.visual.parameters()), "lr": backbone_lr})
        reward.towers.model.visual.train()
    reward.head.train()
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    loader = torch.utils.data.DataLoader(split.train, batch_size=cfg.batch_size, shuffle=True)
    model, optimizer, loader = accelerator.prepare(scorer, optimizer, loader)
    pairs, labels = split.pairs.to(accelerator.device), split.labels.to(accelerator.device)
    for _ in range(cfg.epochs):
        for idx in loader:
            idx = idx.to(accelerator.device)
            scores, _ = model(pairs[idx].T.flatten())  # every chosen image, then every rejected
            chosen, rejected = scores.chunk(2)
            loss = F.binary_cross_entropy_with_logits(chosen - rejected, labels[idx])
            optimizer.zero_grad()
            accelerator.backward(loss)
            optimizer.step()
    return accelerator.unwrap_model(model)


def score_images(scorer: PairScorer, usable: Tensor, batch_size: int) -> tuple[Tensor, Tensor]:
    """Eval-mode scores (U,) and features (U, D) of every usable image (0 for the others)."""
    scorer.eval()
    ids = usable.nonzero().flatten()
    with torch.no_grad():
        parts = [scorer(chunk) for chunk in ids.split(batch_size)]
    scores = torch.zeros(len(usable))
    features = torch.zeros(len(usable), parts[0][1].shape[1])
    scores[ids] = torch.cat([s for s, _ in parts]).float().cpu()
    features[ids] = torch.cat([f for _, f in parts]).float().cpu()
    return scores, features


def bound_summary(name: str, bounds: Tensor) -> dict[str, float]:
    """``{name}_images`` and ``trust_bound_{name}_min/median/max`` (NaN without images)."""
    levels = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    values = torch.quantile(bounds.double(), levels).tolist() if len(bounds) else [float("nan")] * 3
    out = {f"trust_bound_{name}_{q}": v for q, v in zip(("min", "median", "max"), values, strict=True)}
    return {f"{name}_images": float(len(bounds)), **out}


def fit_prefpaint(cfg: TrainRewardConfig) -> tuple[PrefPaintReward, dict[str, float]]:
    """Train a PrefPaint reward on ``cfg.data``; return it (eval mode, with its ``v_inverse``
    and the score statistics in its ``spec``) and its metrics (module docstring). Saves nothing.

    Raises:
        ValueError: naming the data: no usable pair, too few to hold some out, a pair without a
            mask; an ``architecture`` other than prefpaint.
    """
    import open_clip
    from accelerate import PartialState

    if cfg.architecture != "prefpaint":
        raise ValueError(f"architecture={cfg.architecture!r}: train it with its own trainer, not this one")
    device = PartialState().device
    torch.manual_seed(cfg.seed)
    records = read_preference_pairs(cfg.data, ties=cfg.ties)
    reward = build_trainee(cfg.prefpaint).to(device)
    images, index = index_pair_images(records, inpainting=True)
    inputs, usable = cache_inputs(reward, images, cfg, device)
    split = split_usable_pairs(records, index, usable, cfg)
    scorer = train_pairs(PairScorer(reward, inputs, cfg.prefpaint.augment), split, cfg)
    scores, features = score_images(scorer, usable, cfg.embed_batch_size)

    train_ids = split.pairs[split.train].unique()
    held_out = split.pairs[split.val].unique()
    held_out = held_out[~torch.isin(held_out, train_ids)]
    v_inverse = trust_matrix(features[train_ids], cfg.prefpaint.ridge)
    reward.v_inverse = v_inverse.to(device)
    train_scores = scores[train_ids]
    reward.spec = dataclasses.replace(
        reward.spec,
        open_clip_config=open_clip.get_model_config(reward.spec.model_name),  # for a fresh process
        score_mean=float(train_scores.mean()),
        score_std=float(train_scores.std(correction=0)) or 1.0,  # one training image: no spread
    )
    reward.requires_grad_(False)
    metrics = split.metrics(scores[split.pairs[:, 0]] - scores[split.pairs[:, 1]])
    metrics |= bound_summary("train", trust_bounds(features[train_ids], v_inverse))
    metrics |= bound_summary("validation", trust_bounds(features[held_out], v_inverse))
    return reward, metrics


def save_prefpaint(reward: PrefPaintReward, metrics: dict[str, float], folder: Path) -> None:
    """Write the model folder ``load_reward("prefpaint", weights=folder)`` reads, and ``metrics.json``.

    Raises:
        ValueError: ``reward`` has no ``v_inverse``.
    """
    from safetensors.torch import save_file

    if reward.v_inverse is None:
        raise ValueError("the reward has no v_inverse to save")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SPEC_FILE).write_text(json.dumps(dataclasses.asdict(reward.spec), indent=2))
    parts = (("clip.", reward.towers.model), ("head.", reward.head))
    state = {
        prefix + k: v.contiguous().cpu() for prefix, module in parts for k, v in module.state_dict().items()
    }
    save_file(state, str(folder / WEIGHTS_FILE))
    save_file({V_INVERSE_KEY: reward.v_inverse.contiguous().cpu()}, str(folder / V_INVERSE_FILE))
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))


def train_prefpaint(cfg: TrainRewardConfig) -> dict[str, float]:
    """Train (:func:`fit_prefpaint`), save to ``cfg.output_dir`` on the main process, return the metrics."""
    from accelerate import PartialState

    reward, metrics = fit_prefpaint(cfg)
    if PartialState().is_main_process:
        save_prefpaint(reward, metrics, cfg.output_dir)
    return metrics
