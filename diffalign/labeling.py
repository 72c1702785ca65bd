"""Preference data from your own prompts: sample, score, pair (``diffalign label``,
``scripts/make_pairs.py``).

For every prompt of a prompt set (:func:`~diffalign.data.prompts.read_prompt_set`),
``samples_per_prompt`` seeded samples of a local pipeline (SD, SDXL; a LoRA by ``adapter``) are
scored under one or more registry rewards; for an inpainting pipeline, ``examples`` (image, mask,
prompt: :func:`~diffalign.data.inpainting.read_inpainting_examples`) take the prompts' place, each
example inpainted ``samples_per_prompt`` times (with the input pasted back outside the mask, as
users receive inpaintings, unless ``keep_unmasked`` is false), and rewards that need masks
(PrefPaint's) get the mask and the masked input; their weighted sum orders the samples, and
:func:`~diffalign.objectives.pairs_from_scores` pairs them (best against worst, every pair apart by
a margin, or RSO's accepted samples; ``max_pairs_per_prompt`` keeps a seeded random subset of a
prompt's pairs: on the demo world, 96 of each prompt's ~1,060 margin pairs trained a better
model at the same steps than all of them). The pairs are written as Pick-a-Pic-format parquet shards,
which the training methods read as they are (``data.path`` = the output folder):

- ``caption``, ``jpg_0``, ``jpg_1`` (PNG bytes: lossless, so the stored image is the scored one),
  ``label_0``, ``label_1`` (1 for the chosen side; which side holds the chosen image is drawn per
  pair, so that a model trained on the file cannot learn a side);
- ``<reward>_0``, ``<reward>_1`` for each reward (its score of that side's image; ``reward`` the
  registry name with any character outside ``[A-Za-z0-9_]`` replaced by ``_``), and ``score_0``,
  ``score_1``, the weighted sum that ordered the pair (SmPO: ``data.score_prefix=score``);
- ``prompt_index`` and ``category`` (the prompt set's, "" if none); for inpainting, ``mask`` (PNG
  bytes, white = repainted), which :func:`~diffalign.data.preference.read_preference_pairs` gives
  as the pair's mask.

Kills and restarts: prompts go in shards of ``prompts_per_shard``; a shard is written whole
(a temporary file, then a rename) and a restarted run skips the shards on disk. Sample ``j`` of
prompt ``p`` starts from noise seeded by ``(seed, p * samples_per_prompt + j)``, and each prompt's
pairing draws from its own stream, so a run killed and restarted writes the same files as one
that was not. ``label.json`` holds the settings that decide the content; a restart with other
settings is refused, naming them.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffalign.config import (
    AT_LEAST_ONE,
    NON_NEGATIVE,
    POSITIVE,
    ConfigError,
    Range,
    check_ranges,
    claim_settings,
    to_dict,
)
from diffalign.objectives.sampling import PairRule, pairs_from_scores

__all__ = ["LabelConfig", "LabelReport", "label_prompts", "score_column"]

SETTINGS_FILE = "label.json"
_RUN_ONLY = ("output_dir", "batch_size", "device")  # how the run goes, not what it writes


@dataclass
class LabelConfig:
    """What ``diffalign label`` samples, scores and pairs (every key in ``diffalign label --help``).

    Raises:
        ConfigError: neither or both of ``prompts`` and ``examples``; no reward; options for a
            reward not listed; ``rso_accepted`` odd or above ``samples_per_prompt``; a value out
            of its range.
    """

    pipeline: str = field(metadata={"help": "a diffusers pipeline folder (or a hub id, with a network)"})
    output_dir: Path = field(metadata={"help": "folder of parquet shards (and label.json)"})
    prompts: Path | None = field(
        default=None, metadata={"help": "prompt set: .txt, .tsv (PartiPrompts), .csv, .json, ..."}
    )
    examples: Path | None = field(
        default=None, metadata={"help": "inpainting examples (image, mask, prompt) instead of prompts"}
    )
    rewards: dict[str, float] = field(
        default_factory=dict, metadata={"help": "reward name -> weight in the score that orders samples"}
    )
    reward_kwargs: dict[str, dict[str, Any]] = field(
        default_factory=dict, metadata={"help": "reward name -> options for its constructor"}
    )
    keep_unmasked: bool = field(
        default=True,
        metadata={"help": "inpainting: score and store samples with the input pasted back outside the mask"},
    )
    adapter: Path | None = field(default=None, metadata={"help": "a LoRA fused into the pipeline's UNet"})
    samples_per_prompt: int = field(default=4, metadata={"help": "samples of each prompt"})
    pairing: PairRule = field(default="best_worst", metadata={"help": "best_worst, margin or rso"})
    margin: float = field(default=0.0, metadata={"help": "least score gap of a pair (always > 0)"})
    max_pairs_per_prompt: int | None = field(
        default=None, metadata={"help": "keep at most N of a prompt's pairs, drawn at random (none: all)"}
    )
    rso_accepted: int = field(default=2, metadata={"help": "rso: samples accepted per prompt (even)"})
    rso_beta: float = field(default=0.5, metadata={"help": "rso: rejection sampling temperature"})
    prompts_per_shard: int = field(default=16, metadata={"help": "prompts per parquet shard"})
    max_prompts: int | None = field(default=None, metadata={"help": "only the first N prompts"})
    seed: int = 0
    steps: int = field(default=20, metadata={"help": "DDIM steps (eta 0)"})
    guidance_scale: float = 5.0
    batch_size: int = field(default=16, metadata={"help": "images per sampling and scoring batch"})
    device: str | None = field(default=None, metadata={"help": "cuda if available, else cpu"})

    ranges: ClassVar[dict[str, Range]] = {
        "samples_per_prompt": Range(2), "margin": NON_NEGATIVE, "rso_accepted": Range(2),
        "max_pairs_per_prompt": AT_LEAST_ONE, "rso_beta": POSITIVE, "prompts_per_shard": AT_LEAST_ONE,
        "max_prompts": AT_LEAST_ONE,
        "steps": AT_LEAST_ONE, "guidance_scale": NON_NEGATIVE, "batch_size": AT_LEAST_ONE,
    }  # fmt: skip

    def __post_init__(self) -> None:
        check_ranges(self)
        if (self.prompts is None) == (self.examples is None):
            raise ConfigError("give prompts (text-to-image) or examples (inpainting), not both or neither")
        if not self.rewards:
            raise ConfigError("rewards: give at least one reward, e.g. rewards='{pickscore: 1.0}'")
        unknown = sorted(set(self.reward_kwargs) - set(self.rewards))
        if unknown:
            raise ConfigError(f"reward_kwargs: options for '{unknown[0]}', which is not among the rewards")
        if self.pairing == "rso" and (self.rso_accepted % 2 or self.rso_accepted > self.samples_per_prompt):
            raise ConfigError(
                f"rso_accepted must be even and at most samples_per_prompt ({self.samples_per_prompt}), "
                f"got {self.rso_accepted}"
            )


@dataclass
class LabelReport:
    """What a ``label_prompts`` run wrote."""

    output_dir: Path
    prompts: int
    pairs: int  # in all shards, those of earlier runs included
    shards_written: int  # by this run
    shards_found: int  # on disk from an earlier run, skipped


def score_column(reward: str) -> str:
    """The column prefix of a reward's scores: its name with ``[^A-Za-z0-9_]`` replaced by ``_``."""
    return re.sub(r"\W", "_", reward, flags=re.ASCII)


def label_prompts(cfg: LabelConfig) -> LabelReport:
    """Run the module's pipeline for ``cfg``; returns what was written.

    Raises:
        FileNotFoundError: a missing pipeline, prompt or examples file.
        ValueError: a prompt or examples file it cannot read (named); prompts for an inpainting
            pipeline or examples for a text-to-image one; a reward that needs masks without
            examples; a reward score that is not finite.
        ConfigError: ``output_dir`` holds shards labelled with other settings.
    """
    from diffalign.diffusion.policy import DiffusionPolicy
    from diffalign.rewards import load_reward

    items, records = _inputs(cfg)
    rewards = {name: load_reward(name, **cfg.reward_kwargs.get(name, {})) for name in cfg.rewards}
    masked = [name for name, reward in rewards.items() if reward.needs_masks]
    if masked and records is None:
        raise ValueError(
            f"reward '{masked[0]}' scores inpaintings (it needs masks): give inpainting examples and an "
            "inpainting pipeline, or a reward that scores images and prompts"
        )
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    policy = DiffusionPolicy.from_pretrained(cfg.pipeline, device=device, adapter=cfg.adapter)
    if policy.is_inpainting != (records is not None):
        kind = "an inpainting" if policy.is_inpainting else "a text-to-image"
        needs = "examples (image, mask, prompt)" if policy.is_inpainting else "prompts"
        raise ValueError(f"{cfg.pipeline}: {kind} pipeline samples from {needs}")
    _claim_output(cfg)  # only once the run can start: a refused run leaves no settings behind
    starts = range(0, len(items), cfg.prompts_per_shard)
    found = written = 0
    for shard, start in enumerate(tqdm(starts, desc="labelling", unit="shard")):
        path = cfg.output_dir / f"pairs-{shard:05d}.parquet"
        if path.is_file():
            found += 1
            continue
        part = slice(start, start + cfg.prompts_per_shard)
        rows = _label_shard(
            cfg, policy, rewards, items[part], None if records is None else records[part], start
        )
        _write_shard(rows, path, list(rewards), inpainting=records is not None)
        written += 1
    pairs = sum(_count_rows(p) for p in sorted(cfg.output_dir.glob("pairs-*.parquet")))
    return LabelReport(cfg.output_dir, len(items), pairs, written, found)


def _inputs(cfg: LabelConfig) -> tuple[list[Any], list[Any] | None]:
    """The prompts (``PromptItem``s) and, for inpainting, the example records (not yet decoded)."""
    from diffalign.data.inpainting import read_inpainting_examples
    from diffalign.data.prompts import PromptItem, read_prompt_set

    if cfg.prompts is not None:
        return read_prompt_set(cfg.prompts)[: cfg.max_prompts], None
    records = read_inpainting_examples(cfg.examples)[: cfg.max_prompts]
    return [PromptItem(r.prompt, "") for r in records], records


def _claim_output(cfg: LabelConfig) -> None:
    """Write ``label.json`` with the settings that decide the content, or check it against them."""
    settings = {k: v for k, v in to_dict(cfg).items() if k not in _RUN_ONLY}
    if claim_settings(cfg.output_dir, SETTINGS_FILE, settings, "pairs"):
        for stale in cfg.output_dir.glob(".pairs-*.tmp"):  # a killed run's unfinished shard
            stale.unlink()


def _label_shard(
    cfg: LabelConfig,
    policy: Any,
    rewards: dict[str, Any],
    items: list[Any],
    records: list[Any] | None,
    first: int,
) -> list[dict[str, Any]]:
    """Sample, score and pair the prompts (or examples) ``first``, ``first + 1``, ...: Pick-a-Pic rows."""
    from diffalign.evaluation import sample_images
    from diffalign.rng import stream_seeds

    k = cfg.samples_per_prompt
    prompts = [item.prompt for item in items for _ in range(k)]
    inpaint = _decoded(records, policy, k)
    sampled = sample_images(
        policy,
        prompts,
        cfg.seed,
        cfg.steps,
        cfg.guidance_scale,
        cfg.batch_size,
        "sampling",
        first=first * k,
        keep_unmasked=cfg.keep_unmasked and records is not None,
        **inpaint,
    )
    images = _as_stored(sampled)
    scores = {name: _scores(r, name, images, prompts, inpaint, cfg.batch_size) for name, r in rewards.items()}
    total = sum(cfg.rewards[name] * s for name, s in scores.items())
    columns = {"score": total, **{score_column(name): s for name, s in scores.items()}}
    encoded: dict[int, bytes] = {}  # a sample in several pairs is encoded once

    def png(n: int) -> bytes:
        return encoded[n] if n in encoded else encoded.setdefault(n, _png(images[n]))

    rows = []
    for i, item in enumerate(items):
        generator = torch.Generator().manual_seed(stream_seeds(cfg.seed, first + i, 1)[0])
        block = range(i * k, (i + 1) * k)
        pairs = pairs_from_scores(
            total[block.start : block.stop],
            cfg.pairing,
            cfg.margin,
            cfg.rso_accepted,
            cfg.rso_beta,
            generator,
        )
        if cfg.max_pairs_per_prompt is not None and len(pairs) > cfg.max_pairs_per_prompt:
            keep = torch.randperm(len(pairs), generator=generator)[: cfg.max_pairs_per_prompt]
            pairs = [pairs[j] for j in sorted(keep.tolist())]
        for chosen, rejected in pairs:
            # the chosen image's side is drawn, so that a model trained on the file cannot learn a side
            swap = bool(torch.rand((), generator=generator) >= 0.5)
            sides = (block[rejected], block[chosen]) if swap else (block[chosen], block[rejected])
            row = {"caption": item.prompt, "prompt_index": first + i, "category": item.category}
            if inpaint:
                row["mask"] = _png(inpaint["masks"][block.start].expand(3, -1, -1))
            for side, n in enumerate(sides):
                row.update({f"jpg_{side}": png(n), f"label_{side}": float(n == block[chosen])})
                row.update({f"{name}_{side}": float(values[n]) for name, values in columns.items()})
            rows.append(row)
    return rows


def _decoded(records: list[Any] | None, policy: Any, k: int) -> dict[str, Tensor]:
    """Inpainting inputs for ``sample_images``: each example's image and mask, ``k`` times each."""
    from diffalign.data.inpainting import InpaintingDataset, collate_inpainting

    if records is None:
        return {}
    side = policy.unet.config.sample_size * policy.vae_scale_factor
    dataset = InpaintingDataset(records, resolution=side)
    batch = collate_inpainting([dataset[i] for i in range(len(records))])
    return {
        "images": batch["images"].repeat_interleave(k, 0),
        "masks": batch["masks"].repeat_interleave(k, 0),
    }


def _as_stored(images: Tensor) -> Tensor:
    """The images as an 8-bit PNG holds them (what the file gives back), so scores match the file."""
    return (images.float().clamp(0, 1) * 255).round() / 255


def _scores(
    reward: Any, name: str, images: Tensor, prompts: list[str], inpaint: dict[str, Tensor], batch_size: int
) -> Tensor:
    """``reward``'s scores (N,) of ``images`` in batches; an inpainting reward gets the masks and
    the masked inputs."""
    from diffalign.images import masked_for_reward

    out = []
    for start in range(0, len(images), batch_size):
        part = slice(start, start + batch_size)
        context = {}
        if reward.needs_masks:
            masks = inpaint["masks"][part]
            context = {"masks": masks, "masked_images": masked_for_reward(inpaint["images"][part], masks)}
        texts = prompts[part] if reward.needs_prompts else None
        out.append(reward(images[part], texts, **context).double().cpu())
    scores = torch.cat(out)
    bad = (~scores.isfinite()).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"reward '{name}' gave a non-finite score ({float(scores[bad[0]])}) to '{prompts[bad[0]]}'"
        )
    return scores


def _png(image: Tensor) -> bytes:
    from diffalign.images import to_pil

    buffer = io.BytesIO()
    to_pil(image[None])[0].save(buffer, format="PNG")
    return buffer.getvalue()


def _write_shard(rows: list[dict[str, Any]], path: Path, rewards: list[str], inpainting: bool) -> None:
    """Write the shard under a temporary name, then rename it: a shard on disk is whole."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns: dict[str, Any] = {
        "caption": pa.string(), "jpg_0": pa.binary(), "jpg_1": pa.binary(), "label_0": pa.float64(),
        "label_1": pa.float64(), "score_0": pa.float64(), "score_1": pa.float64(),
        **{f"{score_column(r)}_{s}": pa.float64() for r in rewards for s in (0, 1)},
        "prompt_index": pa.int64(), "category": pa.string(), **({"mask": pa.binary()} if inpainting else {}),
    }  # fmt: skip
    schema = pa.schema(list(columns.items()))
    table = pa.Table.from_pylist(rows, schema=schema)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _count_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows
