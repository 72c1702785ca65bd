"""Choose which pairs of an unlabelled pool to send for labelling: BAL-PM (Melo et al. 2024).

    python scripts/select_pairs.py reward=outputs/bt_ensemble pool=pool.jsonl labelled=pairs.jsonl \
        batch=64 output=selected.json
    python scripts/select_pairs.py reward=outputs/bt_ensemble pool=pool_features.safetensors batch=64 \
        output=selected.json

``reward`` is a Bradley-Terry ensemble trained by ``scripts/train_reward.py`` with
``model.ensemble_size`` >= 2: its members' disagreement on a pair is the pair's BALD. The pool is

- image pairs, as ``diffalign.data.read_preference_pairs`` reads them (``chosen`` / ``rejected``
  only name the two images; labels are ignored): each image is embedded by the reward's own
  frozen CLIP tower, and a pair's feature for the prompt-entropy term is the mean of its two
  embeddings (BAL-PM embeds the prompt with the LLM; the images of one prompt stand in for it);
  ``labelled`` (optional, same formats) are the pairs already labelled, which only count in
  the entropy term;
- or a ``.safetensors`` file of features: ``first`` and ``second`` (N, E), finite, what the
  reward's heads read for each pair's two sides (E: the heads' input width); optional ``prompt``
  (N, D), the entropy features (default: the mean of ``first`` and ``second``), and ``labelled``
  (N,) (1: labelled, 0: not), which replaces the ``labelled`` option (refused with a features file).

Writes ``output``: JSON with the chosen pool rows in pick order (``index``, the row's ``where``
for image pairs, its ``bald``) and the settings used.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

from diffalign.acquisition import BETA, D_ENT, K_NEIGHBOURS, balpm_select, binary_bald
from diffalign.config import add_config_arguments, config_from_args
from diffalign.data.preference import read_preference_pairs
from diffalign_rewards.bradley_terry import (
    HEAD_FILE,
    BradleyTerryReward,
    HeadEnsemble,
    TrainRewardConfig,
    embed_pair_images,
    index_pair_images,
    load_heads,
    preference_probability,
)


@dataclass
class SelectPairsConfig:
    reward: Path = field(metadata={"help": "ensemble folder written by scripts/train_reward.py"})
    pool: Path = field(metadata={"help": "unlabelled pairs: a pairs file or a .safetensors features file"})
    output: Path = field(metadata={"help": "JSON file for the chosen rows"})
    batch: int = field(metadata={"help": "pairs to choose"})
    labelled: Path | None = field(
        default=None,
        metadata={"help": "pairs already labelled (image pools only: refused with a features file)"},
    )
    k: int = field(
        default=K_NEIGHBOURS, metadata={"help": "neighbour rank of the entropy estimate (main run)"}
    )
    beta: float = field(
        default=BETA, metadata={"help": "weight of the prompt entropy (main run 0.01; 0: BALD)"}
    )
    d_ent: float = field(default=D_ENT, metadata={"help": "divisor of the digamma term (official 1)"})
    standardize: bool = field(default=True, metadata={"help": "z-score entropy features first"})
    normalize_entropy: bool = field(
        default=False, metadata={"help": "z-score the entropy over candidates each pick (parser default)"}
    )


class Pool(NamedTuple):
    """Per row (of an image pool: its rows, then the labelled file's): its two sides as the heads
    read them (N, E), its entropy feature (N, D), whether it is labelled (N,), where it is from."""

    first: Tensor
    second: Tensor
    prompt: Tensor
    labelled: Tensor
    where: list[str]


def _head_width(folder: Path) -> int:
    # the input width of the heads' first Linear ("0.weight", or "0.0.weight" for an ensemble),
    # read before load_heads, whose mismatch is a bare torch "size mismatch"
    with safe_open(str(folder / HEAD_FILE), "pt") as f:
        weight = min(k for k in f.keys() if k.endswith(".weight"))  # noqa: SIM118 (safe_open is no dict)
        return f.get_slice(weight).get_shape()[1]


def features_pool(cfg: SelectPairsConfig) -> tuple[Pool, HeadEnsemble, str]:
    if cfg.labelled is not None:
        raise ValueError(
            f"labelled={cfg.labelled}: only for image pools; a features pool marks its labelled rows "
            f"with its own `labelled` tensor ({cfg.pool})"
        )
    tensors = load_file(str(cfg.pool))
    for key in ("first", "second"):
        if key not in tensors:
            raise ValueError(f"{cfg.pool}: no tensor '{key}' (need first, second; optional prompt, labelled)")
    first, second = tensors["first"].double(), tensors["second"].double()
    if first.dim() != 2 or first.shape != second.shape:
        raise ValueError(
            f"{cfg.pool}: first and second must be (N, E) alike, got "
            f"{tuple(first.shape)} and {tuple(second.shape)}"
        )
    if not bool(torch.isfinite(first).all() & torch.isfinite(second).all()):
        raise ValueError(f"{cfg.pool}: `first` and `second` must be finite (NaN or inf found)")
    n, width = first.shape
    if width != (expects := _head_width(cfg.reward)):
        raise ValueError(f"{cfg.pool}: pool has E={width} features but reward {cfg.reward} expects {expects}")
    prompt = tensors.get("prompt", (first + second) / 2).double()
    labelled = tensors.get("labelled", torch.zeros(n))
    if not bool(((labelled == 0) | (labelled == 1)).all()):
        raise ValueError(f"{cfg.pool}: `labelled` must hold 0 (unlabelled) or 1 (labelled) only")
    for key, tensor, dims, shape in (("prompt", prompt, 2, "(N, D)"), ("labelled", labelled, 1, "(N,)")):
        if tensor.dim() != dims:
            raise ValueError(f"{cfg.pool}: `{key}` must be {shape}, got shape {tuple(tensor.shape)}")
        if len(tensor) != n:
            raise ValueError(f"{cfg.pool}: `{key}` has {len(tensor)} rows but the pool has {n} pairs")
    spec, heads = load_heads(cfg.reward, width)
    return (
        Pool(first, second, prompt, labelled.bool(), [str(i) for i in range(n)]),
        heads.double(),
        spec.link,
    )


def image_pool(cfg: SelectPairsConfig) -> tuple[Pool, HeadEnsemble, str]:
    records = list(read_preference_pairs(cfg.pool, ties="half"))
    n = len(records)
    if n == 0:
        raise ValueError(f"{cfg.pool}: the pool has no pairs")
    reward = BradleyTerryReward(cfg.reward)
    if cfg.labelled is not None:
        records += read_preference_pairs(cfg.labelled, ties="half")
    images, index = index_pair_images(records, reward.spec.inpainting)
    read = TrainRewardConfig(data=cfg.pool, output_dir=cfg.output.parent)
    emb, _ = embed_pair_images(
        images, reward.embed, reward.embed.image_size, reward.spec.inpainting, read, "cpu"
    )
    emb = emb.flatten(1).double()
    first, second = emb[index[:, 0]], emb[index[:, 1]]
    labelled = torch.arange(len(records)) >= n
    return (
        Pool(first, second, (first + second) / 2, labelled, [r.where for r in records]),
        reward.head.double(),
        reward.spec.link,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_config_arguments(parser, SelectPairsConfig)
    cfg = config_from_args(SelectPairsConfig, parser.parse_args(argv), "select_pairs")
    for path in (cfg.reward, cfg.pool, cfg.labelled):
        if path is not None and not path.exists():
            raise FileNotFoundError(f"select_pairs: {path} does not exist")
    pool, heads, link = (features_pool if cfg.pool.suffix == ".safetensors" else image_pool)(cfg)
    if len(heads.members) < 2:
        raise ValueError(
            f"{cfg.reward}: one head has no disagreement to measure; train with model.ensemble_size >= 2"
        )
    free = int((~pool.labelled).sum())
    if free == 0:
        raise ValueError(f"{cfg.pool}: the pool has no unlabelled pairs")
    if not 1 <= cfg.batch <= free:
        raise ValueError(f"batch={cfg.batch}: must be between 1 and the pool's {free} unlabelled pairs")
    with torch.no_grad():
        margin = heads.member_scores(pool.first) - heads.member_scores(pool.second)
    bald = binary_bald(preference_probability(margin, link))
    picks = balpm_select(
        bald, pool.prompt, pool.labelled, cfg.batch, cfg.k, cfg.beta, cfg.d_ent, cfg.standardize,
        cfg.normalize_entropy,
    )  # fmt: skip
    chosen = [{"index": i, "where": pool.where[i], "bald": float(bald[i])} for i in picks.tolist()]
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}
    cfg.output.parent.mkdir(parents=True, exist_ok=True)
    cfg.output.write_text(json.dumps({"selected": chosen, "settings": settings}, indent=2))
    print(f"select_pairs: {len(chosen)} of {free} unlabelled pairs -> {cfg.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
