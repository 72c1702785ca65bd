"""A Bradley-Terry reward model trained by diffalign, and its training.

The model scores an image (and, for inpainting, the masked input next to it) with a small MLP
on L2-normalised CLIP image embeddings; training fits ``P(chosen > rejected) = sigma(s_w - s_l)``
to preference pairs by binary cross-entropy (ties, when kept, are targets of 0.5) with the
CLIP tower frozen, so each image is embedded once. The trained model is a folder:
``bradley_terry.json`` (how to rebuild it) and ``head.safetensors``;
``load_reward("bradley_terry", path=FOLDER)`` reads it.

Shared with PrefPaint's trainer (``diffalign_rewards.prefpaint_training``, the same loss on
another model): :class:`TrainRewardConfig`, and the pair data: each distinct image (with its
mask) of the pairs decoded once (:func:`load_pair_images`), the usable pairs split into
training and held-out ones (:func:`split_usable_pairs`), held-out metrics
(:meth:`PairSplit.metrics`).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from diffalign.config import build
from diffalign.data.preference import ImageRef, PairRecord, load_image, read_preference_pairs
from diffalign.images import masked_for_reward
from diffalign.rewards import RewardModel
from diffalign_rewards._weights import load_state_dict
from diffalign_rewards.clip_rewards import ClipImageEmbedder
from diffalign_rewards.prefpaint import PrefPaintTrainSpec

__all__ = [
    "BradleyTerryReward",
    "ModelSpec",
    "PairImage",
    "PairSplit",
    "TrainRewardConfig",
    "embed_pair_images",
    "index_pair_images",
    "load_pair_images",
    "split_usable_pairs",
    "train_bradley_terry",
]

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
        metadata={
            "help": "preference pairs: Pick-a-Pic-style .parquet or .jsonl, or scored images (.jsonl rows "
            "with image, mask, score, group; see diffalign.data)"
        }
    )
    output_dir: Path = field(
        metadata={
            "help": "where the model goes: bradley_terry.json and head.safetensors, or prefpaint.json, "
            "prefpaint.safetensors and v_inverse.safetensors; and metrics.json"
        }
    )
    architecture: Literal["bradley_terry", "prefpaint"] = field(
        default="bradley_terry",
        metadata={"help": "an MLP on CLIP embeddings (model.*), or PrefPaint's reward (prefpaint.*)"},
    )
    model: ModelSpec = field(
        default_factory=ModelSpec, metadata={"help": "the bradley_terry model (see model.* below)"}
    )
    prefpaint: PrefPaintTrainSpec = field(
        default_factory=PrefPaintTrainSpec, metadata={"help": "the prefpaint model (see prefpaint.* below)"}
    )
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
    lr: float = field(
        default=1e-3,
        metadata={"help": "AdamW learning rate of the head (and of a trained CLIP tower, see prefpaint.*)"},
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    embed_batch_size: int = field(default=32, metadata={"help": "images per backbone forward when embedding"})
    seed: int = field(default=0, metadata={"help": "split and initialisation seed"})

    def __post_init__(self) -> None:
        if not 0 < self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in (0, 1), got {self.validation_fraction}")


class PairImage(NamedTuple):
    """One distinct image of a pair set: the image, its mask (inpainting), and the first row that
    uses it (errors name it)."""

    image: ImageRef
    mask: ImageRef | None
    where: str


def index_pair_images(records: list[PairRecord], inpainting: bool) -> tuple[list[PairImage], Tensor]:
    """The distinct images of ``records`` (with their masks when ``inpainting``), in order of
    first use, and (P, 2) long: the indices of each pair's (chosen, rejected) among them."""
    ids: dict[tuple[ImageRef, ImageRef | None], int] = {}
    images, index = [], []
    for record in records:
        mask = record.mask if inpainting else None
        for ref in (record.chosen, record.rejected):
            if (ref, mask) not in ids:
                ids[ref, mask] = len(images)
                images.append(PairImage(ref, mask, record.where))
            index.append(ids[ref, mask])
    return images, torch.tensor(index, dtype=torch.long).reshape(-1, 2)


def _decode(image: PairImage, size: int, inpainting: bool) -> Tensor:
    """(K, 3, size, size) in [0, 1]: the image, and with ``inpainting`` its masked input (black
    in the hole, :func:`~diffalign.images.masked_for_reward`) after it."""
    pixels = load_image(image.image, image.where, size)
    if not inpainting:
        return pixels[None]
    if image.mask is None:
        raise ValueError(f"{image.where}: an inpainting reward needs a 'mask' for every pair")
    mask = load_image(image.mask, image.where, size, grey=True)
    return torch.stack([pixels, masked_for_reward(pixels, mask)])


def load_pair_images(
    images: list[PairImage],
    size: int,
    inpainting: bool,
    cfg: TrainRewardConfig,
    consume: Callable[[Tensor, Tensor], None],
) -> Tensor:
    """Decode every image, handing batches of about ``cfg.embed_batch_size`` of them to
    ``consume(ids (B,), pixels (B, K, 3, size, size))`` so that no more are held at once; an
    image that cannot be read stops everything or, with ``on_bad_sample="skip"``, is left out.

    Returns:
        (U,) bool: which images were decoded.
    """
    usable = torch.zeros(len(images), dtype=torch.bool)
    ids: list[int] = []
    batch: list[Tensor] = []
    for i, image in enumerate(images):
        try:
            batch.append(_decode(image, size, inpainting))
        except (FileNotFoundError, ValueError):
            if cfg.on_bad_sample == "error":
                raise
            continue
        ids.append(i)
        usable[i] = True
        if len(batch) * batch[0].shape[0] >= cfg.embed_batch_size:
            consume(torch.tensor(ids), torch.stack(batch))
            ids, batch = [], []
    if batch:
        consume(torch.tensor(ids), torch.stack(batch))
    return usable


def embed_pair_images(
    images: list[PairImage],
    embed: Callable[[Tensor], Tensor],
    size: int,
    inpainting: bool,
    cfg: TrainRewardConfig,
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    """Embeddings (U, K, E) of every image (K = 2 with ``inpainting``: image, masked input)
    by a frozen ``embed`` ((B, 3, H, W) -> (B, E)), each embedded once; and (U,) bool: which
    were usable (the others' rows are 0)."""
    chunks: list[tuple[Tensor, Tensor]] = []

    def consume(ids: Tensor, pixels: Tensor) -> None:
        with torch.no_grad():
            emb = embed(pixels.flatten(0, 1).to(device))
        chunks.append((ids, emb.unflatten(0, pixels.shape[:2])))

    usable = load_pair_images(images, size, inpainting, cfg, consume)
    if not chunks:
        raise ValueError(f"{cfg.data}: no usable preference pairs")
    out = torch.zeros(len(images), *chunks[0][1].shape[1:], device=device)
    for ids, emb in chunks:
        out[ids.to(device)] = emb
    return out, usable


@dataclass
class PairSplit:
    """The usable pairs, and which are trained on and which held out (CPU tensors)."""

    pairs: Tensor  # (P, 2) long: indices of (chosen, rejected) among the distinct images
    labels: Tensor  # (P,) P(chosen preferred): 1, or 0.5 for a tie kept
    train: Tensor  # indices into pairs
    val: Tensor
    skipped: int  # pairs left out for an unreadable image

    def metrics(self, margin: Tensor) -> dict[str, float]:
        """Pair counts, accuracy on decided pairs (``margin = s_w - s_l > 0``) and held-out
        BCE loss, from ``margin`` (P,) of every usable pair."""
        margin, decided = margin.detach().float().cpu(), self.labels == 1.0

        def accuracy(part: Tensor) -> float:
            won = margin[part][decided[part]] > 0
            return float(won.float().mean()) if len(won) else math.nan

        return {
            "pairs": float(len(self.pairs)),
            "skipped_pairs": float(self.skipped),
            "train_pairs": float(len(self.train)),
            "validation_pairs": float(len(self.val)),
            "validation_accuracy": accuracy(self.val),
            "train_accuracy": accuracy(self.train),
            "validation_loss": float(
                F.binary_cross_entropy_with_logits(margin[self.val], self.labels[self.val])
            ),
        }


def split_usable_pairs(
    records: list[PairRecord], index: Tensor, usable: Tensor, cfg: TrainRewardConfig
) -> PairSplit:
    """The pairs of ``records`` whose two images are ``usable``, about ``validation_fraction`` of
    them (at least one; seeded by ``cfg.seed``) held out. Pairs that share an image (the
    inpaintings of one masked input compared with each other, scored groups) are held out or
    trained on together, so that held-out accuracy is measured on images never trained on; pairs
    of distinct images split as a random permutation of the pairs, and so do pairs that share
    images so widely (a pool paired at random) that whole groups cannot be held out (with a warning).

    Raises:
        ValueError: naming ``cfg.data``: no usable pair, or too few to hold some out.
    """
    kept = usable[index].all(1).nonzero().flatten()
    n = len(kept)
    if n == 0:
        raise ValueError(f"{cfg.data}: no usable preference pairs")
    component = _shared_image_components(index[kept])
    # components in a seeded random order (the j-th drawn goes j-th: for pairs of distinct images
    # this is the plain permutation of pairs the split has always used), their pairs together
    drawn = torch.randperm(int(component.max()) + 1, generator=torch.Generator().manual_seed(cfg.seed))
    position = torch.empty_like(drawn)
    position[drawn] = torch.arange(len(drawn))
    order = torch.argsort(position[component], stable=True)
    grouped = component[order]
    # where a component ends: the first held-out boundary at or after the target count
    target = max(1, round(n * cfg.validation_fraction))
    ends = [p for p in range(1, n + 1) if p == n or grouped[p] != grouped[p - 1]]
    n_val = next(p for p in ends if p >= target)
    if n_val > 2 * target:  # images shared across most pairs (a pool paired at random): split pairs
        warnings.warn(
            f"{cfg.data}: the pairs share images too widely to hold out whole groups; held-out pairs "
            "may show images trained on, so held-out accuracy is optimistic",
            stacklevel=2,
        )
        order, n_val = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed)), target
    if n_val == n:
        raise ValueError(
            f"{cfg.data}: {n} usable pairs are too few to hold out {cfg.validation_fraction:.0%}"
        )
    labels = torch.tensor([records[i].label for i in kept.tolist()])
    return PairSplit(index[kept], labels, order[n_val:], order[:n_val], len(records) - n)


def _shared_image_components(pairs: Tensor) -> Tensor:
    """(n,) ids of the connected components of pairs (n, 2) linked by shared images, numbered in
    order of first appearance."""
    parent = list(range(int(pairs.max()) + 1))

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs.tolist():
        parent[root(a)] = root(b)
    roots = [root(a) for a, _ in pairs.tolist()]
    ids = {r: i for i, r in enumerate(dict.fromkeys(roots))}
    return torch.tensor([ids[r] for r in roots])


def train_bradley_terry(cfg: TrainRewardConfig) -> dict[str, float]:
    """Train the head on frozen CLIP features; save the model; return held-out metrics."""
    from accelerate import Accelerator
    from safetensors.torch import save_file

    if cfg.architecture != "bradley_terry":
        raise ValueError(f"architecture={cfg.architecture!r}: train it with its own trainer, not this one")
    accelerator = Accelerator()
    torch.manual_seed(cfg.seed)
    records = read_preference_pairs(cfg.data, ties=cfg.ties)
    spec = cfg.model
    embedder = ClipImageEmbedder(spec.backbone_path, spec.backbone, spec.backbone_weights).to(
        accelerator.device
    )
    images, index = index_pair_images(records, spec.inpainting)
    size = embedder.image_size
    emb, usable = embed_pair_images(images, embedder, size, spec.inpainting, cfg, accelerator.device)
    emb = emb.flatten(1)  # inpainting: image and masked input side by side
    split = split_usable_pairs(records, index, usable, cfg)
    pairs, labels = split.pairs.to(accelerator.device), split.labels.to(accelerator.device)

    head = _head(emb.shape[1], spec.hidden_dim)
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loader = torch.utils.data.DataLoader(split.train, batch_size=cfg.batch_size, shuffle=True)
    head, optimizer, loader = accelerator.prepare(head, optimizer, loader)
    for _ in range(cfg.epochs):
        for idx in loader:
            idx = idx.to(accelerator.device)
            ids = pairs[idx]
            margin = (head(emb[ids[:, 0]]) - head(emb[ids[:, 1]])).squeeze(-1)
            loss = F.binary_cross_entropy_with_logits(margin, labels[idx])
            optimizer.zero_grad()
            accelerator.backward(loss)
            optimizer.step()

    model = accelerator.unwrap_model(head).eval()
    with torch.no_grad():
        margin = (model(emb[pairs[:, 0]]) - model(emb[pairs[:, 1]])).squeeze(-1)
    metrics = split.metrics(margin)
    if accelerator.is_main_process:
        cfg.output_dir.mkdir(parents=True, exist_ok=True)
        (cfg.output_dir / SPEC_FILE).write_text(json.dumps(asdict(spec), indent=2))
        save_file(
            {k: v.contiguous().cpu() for k, v in model.state_dict().items()}, str(cfg.output_dir / HEAD_FILE)
        )
        (cfg.output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
