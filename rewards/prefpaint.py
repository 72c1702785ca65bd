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

The trust matrix ``V^-1`` (``self.v_inverse``, (256, 256)): the official RL script
(``train_inpainting_model.py``) weights each sample's loss by the bound
``b = ||f V^-1||`` (:func:`trust_bounds`), ``clamp(exp(-0.05 b + 0.7), 1, 2.21)``, with
``V^-1`` read from ``checkpoint/V_inverse.pt``; the release does not include the code that made
that file. :func:`trust_matrix` computes ``(F^T F / N + ridge I)^-1`` over the training images'
features ``F``. That form is inferred from the released matrix, not from released code: its
diagonal is near 99.6 and its inverse ``V`` has eigenvalues from 0.00997 to 97.9, nearly all at
0.0100, as an uncentred second moment of low rank plus a ridge of 0.01 gives (the reward
checkpoint named in the official ``configs/config.yaml``, ``256_001_NOR_best.pt``, may say
"256 features, 0.01" too).

A model trained by ``scripts/train_reward.py architecture=prefpaint`` is a folder:
``prefpaint.safetensors`` (``clip.*``, ``head.*``), ``prefpaint.json`` (:class:`PrefPaintSpec`)
and ``v_inverse.safetensors``; ``load_reward("prefpaint", weights=FOLDER)`` reads it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from diffalign.config import build
from diffalign.images import masked_for_reward
from diffalign.rewards import RewardModel
from diffalign_rewards._weights import (
    WeightsError,
    load_into,
    load_state_dict,
    optional_file,
    require_weights,
    resolve_file,
)
from diffalign_rewards.clip_rewards import OpenClipTowers
from diffalign_rewards.preprocessing import clip_pixels

MEAN, STD = 0.4064, 2.3021
WEIGHT_FILES = ("prefpaint.safetensors", "prefpaintReward.pt")
SPEC_FILE = "prefpaint.json"
# diffalign's (one tensor under V_INVERSE_KEY) and the official release's (a bare tensor)
V_INVERSE_FILES = ("v_inverse.safetensors", "V_inverse.pt")
V_INVERSE_KEY = "v_inverse"
OFFICIAL_PREFIXES = (
    ("clip_model.", "clip."),
    ("vit_block.transformer_encoder.layers.0.", "head.block."),
    ("mlp.layers.", "head.mlp."),
    ("mlp.last_layer.", "head.last_layer."),
)


class PrefPaintHead(torch.nn.Module):
    """The official head on two CLIP embeddings (N, embed_dim) each: one transformer encoder
    layer over the concatenation, ``Linear(2 embed_dim, hidden_dim) -> Dropout(mlp_dropout) ->
    Linear(hidden_dim, feature_dim)`` to the features ``f``, a bias-free ``Linear(feature_dim, 1)``
    to the score. Official sizes: 512, 16 heads, ff 1024, hidden 512, features 256."""

    def __init__(
        self,
        embed_dim: int = 512,
        heads: int = 16,
        ff_dim: int = 1024,
        dropout: float = 0.1,
        hidden_dim: int = 512,
        feature_dim: int = 256,
        mlp_dropout: float = 0.2,
    ) -> None:
        super().__init__()
        width = 2 * embed_dim
        self.block = torch.nn.TransformerEncoderLayer(width, heads, ff_dim, dropout, batch_first=True)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(width, hidden_dim),
            torch.nn.Dropout(mlp_dropout),
            torch.nn.Linear(hidden_dim, feature_dim),
        )
        self.last_layer = torch.nn.Linear(feature_dim, 1, bias=False)

    def forward(self, inpainted: Tensor, masked: Tensor) -> tuple[Tensor, Tensor]:
        """Scores (N,) and features (N, feature_dim) of (inpainted, masked-input) embeddings."""
        x = self.block(torch.cat([inpainted, masked], dim=-1).unsqueeze(1)).squeeze(1)
        features = self.mlp(x)
        return self.last_layer(features).squeeze(-1), features

    def reset_like_official(self) -> None:
        """The official ``MLP.__init__`` (``InpaintReward.py``): every MLP and last-layer weight
        ~ N(0, 1 / (width + 1)) with ``width`` the MLP's input width (the same std for every
        layer, as there), biases 0. The encoder layer keeps PyTorch's initialisation, as there."""
        std = 1.0 / (self.mlp[0].in_features + 1)
        for layer in (self.mlp[0], self.mlp[2], self.last_layer):
            torch.nn.init.normal_(layer.weight, mean=0.0, std=std)
            if layer.bias is not None:
                torch.nn.init.zeros_(layer.bias)


@dataclass
class PrefPaintArchitecture:
    """The shape of a PrefPaint reward model; official values by default."""

    model_name: str = field(
        default="ViT-B-32-quickgelu", metadata={"help": "open_clip model name of the CLIP tower"}
    )
    open_clip_config: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "open_clip model config (embed_dim, vision_cfg, text_cfg) registered as model_name "
            "before building, for a model open_clip does not know"
        },
    )
    heads: int = field(default=16, metadata={"help": "attention heads of the head's encoder layer"})
    ff_dim: int = field(default=1024, metadata={"help": "feed-forward width of the head's encoder layer"})
    hidden_dim: int = field(default=512, metadata={"help": "width of the MLP's hidden layer"})
    feature_dim: int = field(default=256, metadata={"help": "width of the features f (and of V^-1)"})


@dataclass
class PrefPaintSpec(PrefPaintArchitecture):
    """What ``prefpaint.json`` holds: the architecture (``open_clip_config`` always written, so
    that a fresh process can rebuild a model open_clip does not know) and the score statistics
    ``normalize=True`` uses. The official constants are the defaults; the trainer writes the mean
    and std of its model's scores over the training images (the official ones presumably came
    from their training images too)."""

    score_mean: float = MEAN
    score_std: float = STD

    def __post_init__(self) -> None:
        if not self.score_std > 0:
            raise ValueError(f"score_std must be positive, got {self.score_std}")


@dataclass
class PrefPaintTrainSpec(PrefPaintArchitecture):
    """The ``prefpaint.*`` keys of ``scripts/train_reward.py``: the architecture and where its
    training starts (``diffalign_rewards.prefpaint_training``). Dropout defaults are the
    official module's (``InpaintReward.py``); its reward-training code is not released."""

    init_weights: str | None = field(
        default=None,
        metadata={
            "help": "PrefPaint weights to start from, CLIP and head: the official prefpaintReward.pt, a "
            "hub repo or folder holding it (kd5678/prefpaintReward), or a trained folder"
        },
    )
    clip_weights: str | None = field(
        default=None,
        metadata={
            "help": "instead, open_clip weights for the CLIP alone (file, folder, hub repo, or a "
            "pretrained tag such as 'openai'); the head starts as the official MLP init. Neither: "
            "all random (tests, demos)"
        },
    )
    train_backbone: bool = field(
        default=False,
        metadata={
            "help": "train the CLIP image tower too (every image is kept in memory as 8-bit pixels); "
            "false: frozen, each image embedded once"
        },
    )
    backbone_lr: float | None = field(
        default=None, metadata={"help": "AdamW learning rate of a trained CLIP tower; none: lr"}
    )
    dropout: float = field(default=0.1, metadata={"help": "dropout of the head's encoder layer"})
    mlp_dropout: float = field(default=0.2, metadata={"help": "dropout between the MLP's two layers"})
    ridge: float = field(default=0.01, metadata={"help": "ridge of V = F^T F / N + ridge I (trust matrix)"})
    augment: Literal["none", "hflip", "dihedral"] = field(
        default="none",
        metadata={
            "help": "random transform of each training image with its masked input (needs "
            "train_backbone): horizontal flip, or any of the 8 flips and quarter turns (for rewards "
            "that no such move changes)"
        },
    )

    def __post_init__(self) -> None:
        if self.init_weights is not None and self.clip_weights is not None:
            raise ValueError("give init_weights (CLIP and head) or clip_weights (CLIP only), not both")
        if self.augment != "none" and not self.train_backbone:
            raise ValueError(
                f"augment={self.augment!r} needs train_backbone=true: a frozen tower embeds each image once"
            )
        if not self.ridge > 0:
            raise ValueError(f"ridge must be positive, got {self.ridge}")


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


def register_open_clip_config(name: str, config: dict[str, Any] | None, where: str) -> None:
    """Make open_clip know ``config`` as ``name`` (open_clip's ``add_model_config`` reads it
    from a ``{name}.json`` file, as the tests' tiny configs are registered). Nothing happens
    when ``config`` is None or open_clip already holds the same config under ``name``.

    Raises:
        ValueError: naming ``where``: ``name`` cannot be a file name, the config lacks
            ``embed_dim``, ``vision_cfg`` or ``text_cfg`` (open_clip would skip it silently),
            or open_clip holds a different config under ``name``.
    """
    import open_clip

    if config is None:
        return
    config = json.loads(json.dumps(config))  # tuples -> lists, as open_clip's own JSON configs
    known = open_clip.get_model_config(name)
    if known == config:
        return
    if known is not None:
        raise ValueError(f"{where}: open_clip already has a different model config named '{name}'")
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in config]
    if missing:
        raise ValueError(f"{where}: open_clip config for '{name}' lacks {', '.join(missing)}")
    if not re.fullmatch(r"[\w.-]+", name):
        raise ValueError(f"{where}: '{name}' cannot name an open_clip config (letters, digits, _ . -)")
    with tempfile.TemporaryDirectory() as folder:
        file = Path(folder) / f"{name}.json"
        file.write_text(json.dumps(config))
        # open_clip keeps what it read; a later rescan skips the deleted file
        open_clip.add_model_config(file)


def read_spec(weights: Path) -> tuple[PrefPaintSpec | None, Path | None]:
    """``prefpaint.json`` beside ``weights`` (a file) and its path, or (None, None) without one.

    Raises:
        WeightsError: naming the file: not JSON, or keys and types :class:`PrefPaintSpec` lacks.
    """
    path = weights.parent / SPEC_FILE
    if not path.is_file():
        return None, None
    try:
        return build(PrefPaintSpec, json.loads(path.read_text()), source=str(path)), path
    except ValueError as err:  # ConfigError and JSONDecodeError are ValueErrors
        raise WeightsError(f"{path}: not a PrefPaint model description ({err})") from err


def merge_architecture(spec: PrefPaintSpec | None, where: Path | None, **given: Any) -> PrefPaintSpec:
    """``spec`` (or the official architecture) with the constructor's arguments that are not
    None; an argument that contradicts ``prefpaint.json`` is an error, not a silent choice.

    Raises:
        ValueError: naming ``where`` and the argument.
    """
    chosen = {k: v for k, v in given.items() if v is not None}
    for name, value in chosen.items():
        if spec is not None and getattr(spec, name) != value:
            raise ValueError(
                f"{where}: the model has {name}={getattr(spec, name)!r}, but {name}={value!r} was "
                f"passed; leave {name} out to use the model's"
            )
    return dataclasses.replace(spec or PrefPaintSpec(), **chosen)


def read_v_inverse(path: Path, dim: int) -> Tensor:
    """The trust matrix in ``path``: diffalign's ``.safetensors`` (key ``v_inverse``) or the
    official ``V_inverse.pt`` (a bare tensor, read with ``weights_only=True``), as float32.

    Raises:
        WeightsError: naming ``path``: unreadable, no ``v_inverse`` key, not a ``(dim, dim)``
            floating tensor, or a NaN or infinite entry.
    """
    if path.suffix == ".safetensors":
        state = load_state_dict(path)
        if V_INVERSE_KEY not in state:
            raise WeightsError(f"{path}: no tensor '{V_INVERSE_KEY}' (has {', '.join(state) or 'none'})")
        matrix = state[V_INVERSE_KEY]
    else:
        try:
            matrix = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            reason = str(err).splitlines()[0] if str(err) else "empty or truncated"
            raise WeightsError(
                f"{path}: not a weights-only tensor file ({type(err).__name__}: {reason})"
            ) from err
    if not isinstance(matrix, Tensor) or not matrix.is_floating_point() or matrix.shape != (dim, dim):
        got = f"{tuple(matrix.shape)} {matrix.dtype}" if isinstance(matrix, Tensor) else type(matrix).__name__
        raise WeightsError(
            f"{path}: V^-1 must be a float ({dim}, {dim}) tensor (the features' width), got {got}"
        )
    if not bool(matrix.isfinite().all()):
        raise WeightsError(f"{path}: V^-1 has NaN or infinite entries")
    return matrix.float().contiguous()


def find_v_inverse(v_inverse: str | Path | None, weights: str | Path | None) -> Path | None:
    """``v_inverse`` (a file, or a folder holding one of :data:`V_INVERSE_FILES`), else one of
    those files beside ``weights`` (a file, folder or hub repo), else None.

    Raises:
        FileNotFoundError: ``v_inverse`` given but not found.
        WeightsError: both files beside ``weights``.
    """
    if v_inverse is not None:
        return resolve_file(v_inverse, V_INVERSE_FILES, "PrefPaint V^-1")
    if weights is None:
        return None
    found = [path for name in V_INVERSE_FILES if (path := optional_file(weights, name)) is not None]
    if len(found) > 1:
        raise WeightsError(
            f"PrefPaint V^-1: {' and '.join(map(str, found))} are both beside the weights; pass v_inverse="
        )
    return found[0] if found else None


def trust_matrix(features: Tensor, ridge: float = 0.01) -> Tensor:
    """``V^-1 = (F^T F / N + ridge I)^-1`` (D, D) float32, from features ``F`` (N, D) of the
    training images, computed in float64. The form (uncentred second moment, ridge 0.01) is
    inferred from the official ``V_inverse.pt``'s spectrum (module docstring), not from released
    code.

    Raises:
        ValueError: ``features`` not (N, D) with N >= 1, non-finite features, ``ridge`` <= 0.
    """
    if features.dim() != 2 or features.shape[0] < 1:
        raise ValueError(f"features must be (N, D) with N >= 1, got shape {tuple(features.shape)}")
    if not bool(features.isfinite().all()):
        raise ValueError("features contain NaN or inf")
    if not (ridge > 0 and math.isfinite(ridge)):
        raise ValueError(f"ridge must be a positive number, got {ridge}")
    f = features.double()
    second_moment = f.T @ f / f.shape[0]
    eye = torch.eye(f.shape[1], dtype=f.dtype, device=f.device)
    # symmetric positive definite (ridge > 0): the Cholesky inverse is exact-symmetric
    return torch.cholesky_inverse(torch.linalg.cholesky(second_moment + ridge * eye)).float().contiguous()


def trust_bounds(features: Tensor, v_inverse: Tensor) -> Tensor:
    """``||f V^-1||`` (N,) float32 for features (N, D): the official RL script's ``boundary``
    (``sqrt(sum((last_features @ V_inverse) ** 2, dim=1))``); large far from the training data."""
    return torch.linalg.vector_norm(features.float() @ v_inverse.float(), dim=-1)


class PrefPaintReward(RewardModel):
    """Inpainting reward: needs ``masks`` (N, 1, H, W; 1 = inpainted region).

    ``weights``: the official ``prefpaintReward.pt`` (hub repo ``kd5678/prefpaintReward``, the
    default), its conversion ``prefpaint.safetensors`` by ``scripts/convert_reward_weights.py``,
    a folder holding either, or a folder written by ``scripts/train_reward.py
    architecture=prefpaint``; CLIP and head come from the same file. The architecture
    (``model_name``: open_clip name of the CLIP; ``heads``, ``ff_dim``, ``hidden_dim``,
    ``feature_dim``: the head's) comes from ``prefpaint.json`` beside the weights when there is
    one (an argument that contradicts it is an error), else the arguments, else the official
    values. ``masked_images``: the masked input, black in the hole as the reward was trained
    (:func:`~diffalign.images.masked_for_reward`; the official data is the original image so
    blacked out), not the grey input of the inpainting UNet; by default the inpainted image with
    ``masks`` blacked out. ``normalize``: scores ``(s - mean) / std`` (the official constants, or
    those in ``prefpaint.json``).

    ``v_inverse``: the trust matrix file; by default ``v_inverse.safetensors`` or the official
    ``V_inverse.pt`` beside the weights (none is looked for with ``random_weights``).
    ``self.v_inverse`` (feature_dim, feature_dim) float32 buffer, or None without a file.

    Raises:
        WeightsError: naming the file: weights, ``prefpaint.json`` or V^-1 that cannot be read
            or do not fit.
        ValueError: an argument that contradicts ``prefpaint.json``.
    """

    needs_masks = True
    differentiable = True
    masked_fill = 0.0

    def __init__(
        self,
        weights: str | Path | None = "kd5678/prefpaintReward",
        model_name: str | None = None,
        normalize: bool = False,
        device: str | torch.device | None = None,
        heads: int | None = None,
        ff_dim: int | None = None,
        random_weights: bool = False,
        v_inverse: str | Path | None = None,
        hidden_dim: int | None = None,
        feature_dim: int | None = None,
    ) -> None:
        super().__init__()
        state, path, spec, spec_path = None, "PrefPaint weights", None, None
        if not random_weights:
            example = "prefpaintReward.pt from kd5678/prefpaintReward, or its conversion"
            weights = require_weights(weights, "PrefPaint weights", "weights", example)
            path = resolve_file(weights, WEIGHT_FILES, "PrefPaint weights")
            state = read_prefpaint_weights(path)
            spec, spec_path = read_spec(path)
        arch = merge_architecture(
            spec, spec_path, model_name=model_name, heads=heads, ff_dim=ff_dim,
            hidden_dim=hidden_dim, feature_dim=feature_dim,
        )  # fmt: skip
        register_open_clip_config(arch.model_name, arch.open_clip_config, str(spec_path or path))
        self.spec = arch
        self.build_modules(state, path, official=spec is None)
        found = find_v_inverse(v_inverse, None if random_weights else weights)
        matrix = None if found is None else read_v_inverse(found, arch.feature_dim)
        # not in state_dict: V^-1 is saved in its own file
        self.register_buffer("v_inverse", matrix, persistent=False)
        self.normalize = normalize
        self.to(device)

    def build_modules(self, state: dict[str, Tensor] | None, path: Path | str, official: bool) -> None:
        """CLIP towers and head of ``self.spec``, loaded from ``state`` (``clip.*``, ``head.*``)
        unless None. An official checkpoint's CLIP is OpenAI's (checked to be QuickGELU);
        diffalign's trained CLIP is whatever ``prefpaint.json`` says."""
        arch = self.spec
        clip_state = None if state is None else {k[5:]: v for k, v in state.items() if k.startswith("clip.")}
        self.towers = OpenClipTowers(
            arch.model_name, path, "PrefPaint CLIP", openai_state=clip_state if official else None,
            random_weights=True,
        )  # fmt: skip
        if clip_state is not None and not official:
            load_into(self.towers.model, clip_state, path, "PrefPaint CLIP")
        self.head = PrefPaintHead(
            self.towers.dim, arch.heads, arch.ff_dim, hidden_dim=arch.hidden_dim, feature_dim=arch.feature_dim
        )
        if state is not None:
            head_state = {k[5:]: v for k, v in state.items() if k.startswith("head.")}
            load_into(self.head, head_state, path, "PrefPaint head")
        self.head.requires_grad_(False).eval()

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
            scores = (scores - self.spec.score_mean) / self.spec.score_std
        return scores, features

    def score(
        self, images: Tensor, prompts: list[str] | None, masks: Tensor, masked_images: Tensor | None = None
    ) -> Tensor:
        return self.scores_and_features(images, masks, masked_images)[0]
