"""A Bradley-Terry reward model trained by diffalign, and its training.

The model scores an image (and, for inpainting, the masked input next to it) with a small MLP
on L2-normalised CLIP image embeddings; training fits ``P(chosen > rejected) = sigma(s_w - s_l)``
to preference pairs by binary cross-entropy (ties, when kept, are targets of 0.5) with the
CLIP tower frozen, so each image is embedded once. Options on top (all in ``model.*``, saved
with the model):

- ``ensemble_size`` M: M heads, each from its own seed (``seed + m``; member 0 trains exactly
  as a single head does), on the same pairs; the reward scores with their mean and
  :meth:`BradleyTerryReward.member_scores` gives each member's, whose pair probabilities feed
  BALD (:func:`diffalign.acquisition.binary_bald`; BAL-PM, Melo et al. 2024, trains its
  ensemble the same way: heads on frozen features, parsing/active_learning_parser.py:57-61).
- ``link``: ``logistic`` (Bradley-Terry / Luce) or ``thurstone``, ``P = Phi((s_w - s_l) /
  sqrt(2))`` (Thurstone case V with unit noise per item; Dumoulin et al. 2024, section 8 of
  SEED-METHODS.md). The noise scale is fixed at 1, not learned: the head's last layer scales
  the scores freely, so a learned scale would only trade off against it.

When the pairs name their annotators (Pick-a-Pic ``user_id``, a JSONL ``annotator``), the
metrics also hold a misspecification report (:func:`misspecification_report`): held-out
log-likelihood of the single model against an annotator-conditioned one.

The trained model is a folder:
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
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple

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

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = [
    "AnnotatorConditioned",
    "BradleyTerryReward",
    "HeadEnsemble",
    "ModelSpec",
    "PairImage",
    "PairSplit",
    "TrainRewardConfig",
    "embed_pair_images",
    "fit_heads",
    "index_pair_images",
    "load_heads",
    "load_pair_images",
    "misspecification_report",
    "pair_log_likelihood",
    "pair_nll",
    "preference_probability",
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
    ensemble_size: int = field(
        default=1,
        metadata={
            "help": "heads trained from seeds seed..seed+M-1; the reward is their mean (BALD needs M >= 2)"
        },
    )
    link: Literal["logistic", "thurstone"] = field(
        default="logistic",
        metadata={"help": "P(w > l): logistic sigma(s_w - s_l) (Bradley-Terry) or Phi((s_w - s_l)/sqrt(2))"},
    )

    def __post_init__(self) -> None:
        if self.ensemble_size < 1:
            raise ValueError(f"model.ensemble_size must be >= 1, got {self.ensemble_size}")


def _head(in_dim: int, hidden: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(in_dim, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 1))


def pair_log_likelihood(margin: Tensor, labels: Tensor, link: str) -> Tensor:
    """(P,) ``y log F(m) + (1 - y) log F(-m)`` of pairs with score margins ``m = s_w - s_l``
    (P,) and targets ``y`` (P,) in [0, 1]; ``F`` is sigma (``link="logistic"``) or
    ``Phi(m / sqrt(2))`` (``"thurstone"``), computed in log space."""
    if link == "logistic":
        return -F.binary_cross_entropy_with_logits(margin, labels, reduction="none")
    if link == "thurstone":
        z = margin / math.sqrt(2.0)
        return labels * torch.special.log_ndtr(z) + (1 - labels) * torch.special.log_ndtr(-z)
    raise ValueError(f"link must be 'logistic' or 'thurstone', got {link!r}")


def pair_nll(margin: Tensor, labels: Tensor, link: str) -> Tensor:
    """Mean of ``-pair_log_likelihood``; for ``logistic`` torch's BCE-with-logits with mean
    reduction, so that a logistic model trains bit for bit as it did before links existed."""
    if link == "logistic":
        return F.binary_cross_entropy_with_logits(margin, labels)
    return -pair_log_likelihood(margin, labels, link).mean()


def preference_probability(margin: Tensor, link: str) -> Tensor:
    """P(first preferred) of score margins ``margin`` (any shape) under ``link``."""
    return pair_log_likelihood(margin, torch.ones_like(margin), link).exp()


class HeadEnsemble(torch.nn.Module):
    """M heads on the same features: ``forward`` (B, E) -> (B,) their mean score,
    :meth:`member_scores` (B, E) -> (M, B)."""

    def __init__(self, members: list[torch.nn.Module]) -> None:
        super().__init__()
        self.members = torch.nn.ModuleList(members)

    def member_scores(self, emb: Tensor) -> Tensor:
        return torch.stack([head(emb).squeeze(-1) for head in self.members])

    def forward(self, emb: Tensor) -> Tensor:
        return self.member_scores(emb).mean(0)

    def file_state(self) -> dict[str, Tensor]:
        """What ``head.safetensors`` holds: one head's keys as they always were, or
        ``{m}.{key}`` for an ensemble."""
        module = self.members[0] if len(self.members) == 1 else self.members
        return {k: v.contiguous().cpu() for k, v in module.state_dict().items()}


def _read_spec(folder: Path) -> ModelSpec:
    if not (folder / SPEC_FILE).is_file():
        raise FileNotFoundError(
            f"{folder}: no {SPEC_FILE}; pass the output folder of scripts/train_reward.py"
        )
    return build(ModelSpec, json.loads((folder / SPEC_FILE).read_text()), source=str(folder / SPEC_FILE))


def load_heads(folder: Path, in_dim: int) -> tuple[ModelSpec, HeadEnsemble]:
    """The spec and the heads of a trained model folder, for features of width ``in_dim``
    (without its CLIP tower: ``scripts/select_pairs.py`` on a features file).

    Raises:
        FileNotFoundError: no ``bradley_terry.json`` in ``folder``.
        RuntimeError: the heads do not match ``in_dim`` or the spec.
    """
    spec = _read_spec(Path(folder))
    return spec, _load_heads(Path(folder), spec, in_dim)


def _load_heads(folder: Path, spec: ModelSpec, in_dim: int) -> HeadEnsemble:
    heads = HeadEnsemble([_head(in_dim, spec.hidden_dim) for _ in range(spec.ensemble_size)])
    target = heads.members[0] if spec.ensemble_size == 1 else heads.members
    target.load_state_dict(load_state_dict(folder / HEAD_FILE))
    return heads.eval()


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
        spec = _read_spec(folder)
        self.needs_masks = spec.inpainting
        self.embed = ClipImageEmbedder(spec.backbone_path, spec.backbone, spec.backbone_weights)
        self.spec, self.head = spec, _load_heads(folder, spec, self.embed.dim * (2 if spec.inpainting else 1))
        self.to(device)

    def features(
        self, images: Tensor, masks: Tensor | None = None, masked_images: Tensor | None = None
    ) -> Tensor:
        """(B, E) what the heads read: CLIP embeddings (beside the masked input's, inpainting)."""
        emb = self.embed(images)
        if self.spec.inpainting:
            masked = masked_images if masked_images is not None else masked_for_reward(images, masks)
            emb = torch.cat([emb, self.embed(masked)], dim=-1)
        return emb

    def member_scores(
        self, images: Tensor, masks: Tensor | None = None, masked_images: Tensor | None = None
    ) -> Tensor:
        """(M, B) each ensemble member's score (``score`` is their mean)."""
        return self.head.member_scores(self.features(images, masks, masked_images))

    def score(
        self,
        images: Tensor,
        prompts: list[str] | None,
        masks: Tensor | None = None,
        masked_images: Tensor | None = None,
    ) -> Tensor:
        return self.head(self.features(images, masks, masked_images))


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
    annotator_min_pairs: int = field(
        default=20,
        metadata={
            "help": "misspecification report (pairs with annotator ids): annotators with at least this "
            "many training pairs get their own reward direction"
        },
    )

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
    annotators: list[str | None] = field(default_factory=list)  # (P,) who labelled each pair, if known

    def metrics(self, margin: Tensor, link: str = "logistic") -> dict[str, float]:
        """Pair counts, accuracy on decided pairs (``margin = s_w - s_l > 0``) and held-out
        loss (negative log-likelihood under ``link``), from ``margin`` (P,) of every usable pair."""
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
            "validation_loss": float(pair_nll(margin[self.val], self.labels[self.val], link)),
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
    annotators = [records[i].annotator for i in kept.tolist()]
    return PairSplit(index[kept], labels, order[n_val:], order[:n_val], len(records) - n, annotators)


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


def _fit(
    model: torch.nn.Module,
    margin: Callable[[torch.nn.Module, Tensor], Tensor],
    labels: Tensor,
    train: Tensor,
    cfg: TrainRewardConfig,
    link: str,
    accelerator: Accelerator | None,
) -> torch.nn.Module:
    """Fit ``model`` by AdamW on the negative log-likelihood under ``link`` of the pairs
    ``train`` (indices, CPU), ``margin(model, idx)`` giving the (B,) score margins of pairs
    ``idx``; ``cfg.epochs`` passes of batches of ``cfg.batch_size``. Returns it unwrapped, in
    eval mode."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loader = torch.utils.data.DataLoader(train, batch_size=cfg.batch_size, shuffle=True)
    if accelerator is not None:
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    for _ in range(cfg.epochs):
        for idx in loader:
            idx = idx.to(labels.device)
            loss = pair_nll(margin(model, idx), labels[idx], link)
            optimizer.zero_grad()
            if accelerator is not None:
                accelerator.backward(loss)
            else:
                loss.backward()
            optimizer.step()
    return (accelerator.unwrap_model(model) if accelerator is not None else model).eval()


def fit_heads(
    emb: Tensor,
    pairs: Tensor,
    labels: Tensor,
    train: Tensor,
    spec: ModelSpec,
    cfg: TrainRewardConfig,
    accelerator: Accelerator | None = None,
) -> HeadEnsemble:
    """``spec.ensemble_size`` heads of width ``spec.hidden_dim`` on frozen features ``emb``
    (U, E), each fitted to the pairs ``train`` (indices into ``pairs`` (P, 2) long, rows of
    ``emb`` of (chosen, rejected); ``labels`` (P,) P(chosen preferred)) under ``spec.link``;
    member m initialised and shuffled from seed ``cfg.seed + m``."""

    def margin(head: torch.nn.Module, idx: Tensor) -> Tensor:
        ids = pairs[idx]
        return (head(emb[ids[:, 0]]) - head(emb[ids[:, 1]])).squeeze(-1)

    members = []
    for m in range(spec.ensemble_size):
        torch.manual_seed(cfg.seed + m)
        head = _head(emb.shape[1], spec.hidden_dim).to(emb.device)
        members.append(_fit(head, margin, labels, train, cfg, spec.link, accelerator))
    return HeadEnsemble(members)


ANNOTATOR_RANK = 4  # per-annotator parameters: few, so that an annotator with 20 pairs cannot memorise them


class AnnotatorConditioned(torch.nn.Module):
    """``r(x, a) = r(x) + u_a . g(x)``: a shared head ``r``, and for each modelled annotator a
    vector ``u_a`` (``ANNOTATOR_RANK``) read against shared features ``g(x) = W x``. Index 0
    stands for every other annotator (``u_0 = 0``: the shared reward). An additive offset per
    annotator would cancel in ``r(x_w, a) - r(x_l, a)``, hence a direction."""

    def __init__(self, in_dim: int, hidden: int, annotators: int) -> None:
        super().__init__()
        self.shared = _head(in_dim, hidden)
        self.project = torch.nn.Linear(in_dim, ANNOTATOR_RANK, bias=False)
        self.taste = torch.nn.Embedding(annotators + 1, ANNOTATOR_RANK, padding_idx=0)
        torch.nn.init.zeros_(self.taste.weight)  # start at the shared model

    def forward(self, emb: Tensor, who: Tensor) -> Tensor:
        return self.shared(emb).squeeze(-1) + (self.taste(who) * self.project(emb)).sum(-1)


def misspecification_report(
    emb: Tensor, split: PairSplit, single: torch.nn.Module, spec: ModelSpec, cfg: TrainRewardConfig
) -> dict[str, float]:
    """Is one reward enough for these annotators? Held-out mean log-likelihood (nats per pair,
    under ``spec.link``) of ``single`` ((B, E) -> (B,) scores, trained on ``split.train``)
    against :class:`AnnotatorConditioned` trained the same way (``cfg``), where annotators
    with at least ``cfg.annotator_min_pairs`` training pairs get their own direction
    (Dumoulin et al. 2024: a mixture of annotators is not one Bradley-Terry model). ``gain``
    is the conditioned minus the single log-likelihood, with its standard error over the
    held-out pairs: a gain of a few standard errors says the single model is misspecified.

    Raises:
        ValueError: ``split.annotators`` does not give one entry per pair.
    """
    if len(split.annotators) != len(split.pairs):
        raise ValueError(f"split.annotators: {len(split.annotators)} entries for {len(split.pairs)} pairs")
    counts = Counter(split.annotators[i] for i in split.train.tolist())
    counts.pop(None, None)
    modelled = sorted(a for a, n in counts.items() if n >= cfg.annotator_min_pairs)
    number = {a: i + 1 for i, a in enumerate(modelled)}
    who = torch.tensor([number.get(a, 0) for a in split.annotators], device=emb.device)
    pairs, labels = split.pairs.to(emb.device), split.labels.to(emb.device)

    def margin(model: torch.nn.Module, idx: Tensor) -> Tensor:
        ids = pairs[idx]
        return model(emb[ids[:, 0]], who[idx]) - model(emb[ids[:, 1]], who[idx])

    torch.manual_seed(cfg.seed)
    init = AnnotatorConditioned(emb.shape[1], spec.hidden_dim, len(modelled)).to(emb.device)
    conditioned = _fit(init, margin, labels, split.train, cfg, spec.link, None)
    val = split.val.to(emb.device)
    with torch.no_grad():
        single_ll = pair_log_likelihood(
            single(emb[pairs[val, 0]]) - single(emb[pairs[val, 1]]), labels[val], spec.link
        )
        gain = pair_log_likelihood(margin(conditioned, val), labels[val], spec.link) - single_ll
    return {
        "annotators": float(len({a for a in split.annotators if a is not None})),
        "annotators_modelled": float(len(modelled)),
        "validation_loglik_single": float(single_ll.mean()),
        "validation_loglik_annotator": float((single_ll + gain).mean()),
        "validation_loglik_gain": float(gain.mean()),
        "validation_loglik_gain_stderr": float(gain.std() / math.sqrt(len(gain)))
        if len(gain) > 1
        else math.nan,
    }


def train_bradley_terry(cfg: TrainRewardConfig) -> dict[str, float]:
    """Train the head (or ensemble, ``model.ensemble_size``) on frozen CLIP features; save the
    model; return held-out metrics, with :func:`misspecification_report`'s when the pairs name
    their annotators (its single model: member 0)."""
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
    heads = fit_heads(emb, pairs, labels, split.train, spec, cfg, accelerator)
    with torch.no_grad():
        margin = heads(emb[pairs[:, 0]]) - heads(emb[pairs[:, 1]])
    metrics = split.metrics(margin, spec.link)
    if any(a is not None for a in split.annotators):
        metrics |= misspecification_report(emb, split, HeadEnsemble([heads.members[0]]), spec, cfg)
    if accelerator.is_main_process:
        cfg.output_dir.mkdir(parents=True, exist_ok=True)
        (cfg.output_dir / SPEC_FILE).write_text(json.dumps(asdict(spec), indent=2))
        save_file(heads.file_state(), str(cfg.output_dir / HEAD_FILE))
        (cfg.output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
