"""A Bradley-Terry reward model trained by diffalign, and its training.

The model scores an image (and, for inpainting, the masked input next to it) with a small MLP
on L2-normalised CLIP image embeddings; training fits ``P(chosen > rejected) = sigma(s_w - s_l)``
to preference pairs by binary cross-entropy (ties, when kept, are targets of 0.5) with the
CLIP tower frozen, so each image is embedded once. The trained model is a folder:
``bradley_terry.json`` (how to rebuild it) and ``head.safetensors``;
``load_reward("bradley_terry", path=FOLDER)`` reads it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from diffalign.config import build
from diffalign.data.preference import PairRecord, load_image, read_preference_pairs
from diffalign.images import masked_for_reward
from diffalign.rewards import RewardModel
from diffalign_rewards._weights import load_state_dict
from diffalign_rewards.clip_rewards import ClipImageEmbedder

__all__ = ["BradleyTerryReward", "ModelSpec", "TrainRewardConfig", "train_bradley_terry"]

SPEC_FILE, HEAD_FILE = "bradley_terry.json", "head.safetensors"


@dataclass
class ModelSpec:
    """What ``bradley_terry.json`` holds: enough to rebuild the model."""

    backbone: Literal["transformers", "open_clip"] = field(
        default="transformers", metadata={"help": "CLIP implementation: transformers or open_clip"}
    )
    backbone_path: str = field(
        default="openai/clip-vit-large-patch14",
        metadata={"help": "transformers CLIP folder or hub id, or open_clip model name"},
    )
    backbone_weights: str | None = field(
        default=None, metadata={"help": "open_clip weights (file, folder or hub repo); none for transformers"}
    )
    inpainting: bool = field(
        default=False, metadata={"help": "also embed the masked input (pairs with a mask, as PrefPaint's)"}
    )
    hidden_dim: int = field(default=256, metadata={"help": "width of the MLP head"})


def _head(in_dim: int, hidden: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(in_dim, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 1))


class BradleyTerryReward(RewardModel):
    """A reward trained by ``scripts/train_reward.py``; ``path`` is its output folder.

    Differentiable; an inpainting model (trained with ``inpainting: true``) needs ``masks``, and
    embeds the masked input black in the hole, as training did
    (:func:`~diffalign.images.masked_for_reward`): ``masked_images`` given must follow it, by
    default the scored image with ``masks`` blacked out.
    """

    differentiable = True
    masked_fill = 0.0

    def __init__(self, path: str | Path, device: str | torch.device | None = None) -> None:
        super().__init__()
        folder = Path(path)
        if not (folder / SPEC_FILE).is_file():
            raise FileNotFoundError(
                f"{folder}: no {SPEC_FILE}; pass the output folder of scripts/train_reward.py"
            )
        self.spec = build(
            ModelSpec, json.loads((folder / SPEC_FILE).read_text()), source=str(folder / SPEC_FILE)
        )
        self.needs_masks = self.spec.inpainting
        self.embed = ClipImageEmbedder(
            self.spec.backbone_path, self.spec.backbone, self.spec.backbone_weights
        )
        width = self.embed.dim * (2 if self.spec.inpainting else 1)
        self.head = _head(width, self.spec.hidden_dim)
        self.head.load_state_dict(load_state_dict(folder / HEAD_FILE))
        self.head.eval()
        self.to(device)

    def score(
        self,
        images: Tensor,
        prompts: list[str] | None,
        masks: Tensor | None = None,
        masked_images: Tensor | None = None,
    ) -> Tensor:
        emb = self.embed(images)
        if self.spec.inpainting:
            masked = masked_images if masked_images is not None else masked_for_reward(images, masks)
            emb = torch.cat([emb, self.embed(masked)], dim=-1)
        return self.head(emb).squeeze(-1)


@dataclass
class TrainRewardConfig:
    data: Path = field(
        metadata={"help": "preference pairs: Pick-a-Pic-style .parquet or .jsonl (see diffalign.data)"}
    )
    output_dir: Path = field(
        metadata={"help": "where bradley_terry.json, head.safetensors and metrics.json go"}
    )
    model: ModelSpec = field(default_factory=ModelSpec, metadata={"help": "the model (see model.* below)"})
    ties: Literal["drop", "half"] = field(
        default="drop", metadata={"help": "drop tied pairs, or train them towards 0.5"}
    )
    on_bad_sample: Literal["error", "skip"] = field(
        default="error",
        metadata={"help": "a missing or corrupt image stops training, or drops its pair (counted)"},
    )
    validation_fraction: float = field(default=0.1, metadata={"help": "share of pairs held out for accuracy"})
    epochs: int = field(default=30, metadata={"help": "passes over the training pairs"})
    batch_size: int = field(default=64, metadata={"help": "pairs per optimiser step (per process)"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate of the head"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    embed_batch_size: int = field(default=32, metadata={"help": "images per backbone forward when embedding"})
    seed: int = field(default=0, metadata={"help": "split and initialisation seed"})

    def __post_init__(self) -> None:
        if not 0 < self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in (0, 1), got {self.validation_fraction}")


def _embed_all(
    records: list[PairRecord], embedder: ClipImageEmbedder, cfg: TrainRewardConfig, device: torch.device
) -> tuple[Tensor, Tensor, list[int], int]:
    """Features of the chosen and rejected image of every usable pair (frozen backbone)."""
    feats_w, feats_l, kept, skipped = [], [], [], 0
    size = embedder.image_size
    buffer: list[tuple[int, Tensor, Tensor]] = []

    def load_pair(r: PairRecord) -> tuple[Tensor, Tensor]:
        w, lo = load_image(r.chosen, r.where, size), load_image(r.rejected, r.where, size)
        if cfg.model.inpainting:
            if r.mask is None:
                raise ValueError(f"{r.where}: an inpainting reward needs a 'mask' for every pair")
            mask = load_image(r.mask, r.where, size, grey=True)
            w, lo = torch.cat([w, masked_for_reward(w, mask)]), torch.cat([lo, masked_for_reward(lo, mask)])
        return w, lo

    def flush() -> None:
        if not buffer:
            return
        images = torch.stack([x for _, w, lo in buffer for x in (w, lo)]).to(device)
        images = images.reshape(-1, 3, size, size)  # inpainting: image, masked input interleaved
        with torch.no_grad():
            emb = torch.cat([embedder(chunk) for chunk in images.split(cfg.embed_batch_size)])
        per = 4 if cfg.model.inpainting else 2
        emb = emb.reshape(len(buffer), per, -1)
        half = per // 2
        feats_w.append(emb[:, :half].flatten(1))
        feats_l.append(emb[:, half:].flatten(1))
        kept.extend(i for i, _, _ in buffer)
        buffer.clear()

    for i, record in enumerate(records):
        try:
            w, lo = load_pair(record)
        except (FileNotFoundError, ValueError):
            if cfg.on_bad_sample == "error":
                raise
            skipped += 1
            continue
        buffer.append((i, w, lo))
        if len(buffer) * 2 >= cfg.embed_batch_size:
            flush()
    flush()
    if not kept:
        raise ValueError(f"{cfg.data}: no usable preference pairs")
    return torch.cat(feats_w), torch.cat(feats_l), kept, skipped


def train_bradley_terry(cfg: TrainRewardConfig) -> dict[str, float]:
    """Train the head on frozen CLIP features; save the model; return held-out metrics."""
    from accelerate import Accelerator
    from safetensors.torch import save_file

    accelerator = Accelerator()
    torch.manual_seed(cfg.seed)
    records = read_preference_pairs(cfg.data, ties=cfg.ties)
    spec = cfg.model
    embedder = ClipImageEmbedder(spec.backbone_path, spec.backbone, spec.backbone_weights).to(
        accelerator.device
    )
    feats_w, feats_l, kept, skipped = _embed_all(records, embedder, cfg, accelerator.device)
    labels = torch.tensor([records[i].label for i in kept], device=accelerator.device)
    n = len(kept)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed)).to(accelerator.device)
    n_val = max(1, round(n * cfg.validation_fraction))
    val, train = order[:n_val], order[n_val:]
    if len(train) == 0:
        raise ValueError(
            f"{cfg.data}: {n} usable pairs are too few to hold out {cfg.validation_fraction:.0%}"
        )

    head = _head(feats_w.shape[1], spec.hidden_dim)
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loader = torch.utils.data.DataLoader(train.cpu(), batch_size=cfg.batch_size, shuffle=True)
    head, optimizer, loader = accelerator.prepare(head, optimizer, loader)
    for _ in range(cfg.epochs):
        for idx in loader:
            idx = idx.to(accelerator.device)
            margin = (head(feats_w[idx]) - head(feats_l[idx])).squeeze(-1)
            loss = F.binary_cross_entropy_with_logits(margin, labels[idx])
            optimizer.zero_grad()
            accelerator.backward(loss)
            optimizer.step()

    model = accelerator.unwrap_model(head).eval()
    with torch.no_grad():
        margin = (model(feats_w) - model(feats_l)).squeeze(-1)
    decided = labels == 1.0
    metrics = {
        "pairs": float(n),
        "skipped_pairs": float(skipped),
        "train_pairs": float(len(train)),
        "validation_pairs": float(n_val),
        "validation_accuracy": float((margin[val][decided[val]] > 0).float().mean())
        if bool(decided[val].any())
        else math.nan,
        "train_accuracy": float((margin[train][decided[train]] > 0).float().mean())
        if bool(decided[train].any())
        else math.nan,
        "validation_loss": float(F.binary_cross_entropy_with_logits(margin[val], labels[val])),
    }
    if accelerator.is_main_process:
        cfg.output_dir.mkdir(parents=True, exist_ok=True)
        (cfg.output_dir / SPEC_FILE).write_text(json.dumps(asdict(spec), indent=2))
        save_file(
            {k: v.contiguous().cpu() for k, v in model.state_dict().items()}, str(cfg.output_dir / HEAD_FILE)
        )
        (cfg.output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
