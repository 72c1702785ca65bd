"""Score every image of a preference dataset with a reward and save the scores as new columns.

    python scripts/score_dataset.py data=pickapic.parquet output=scored.parquet reward=pickscore \
        reward_options='{model: /models/PickScore_v1, processor: /models/CLIP-ViT-H-14}'

A Pick-a-Pic-style parquet gets ``{column_prefix}_0`` and ``{column_prefix}_1`` (the scores of
``jpg_0`` and ``jpg_1``) next to its columns; a JSONL file of pairs becomes a parquet with
``prompt``, ``chosen``, ``rejected`` (image paths, rewritten relative to the output's folder) and
``{column_prefix}_chosen`` / ``{column_prefix}_rejected``. ``diffalign.data.read_preference_pairs``
reads both back (``score_prefix=column_prefix``; ``method_options.score_prefix`` of
``diffusion_dpo``).
Work is cached in ``<output>.parts/<key>/`` one chunk at a time, so a run that stops resumes where
it left off; the parts are merged into ``output`` at the end. The key is a fingerprint of
everything the scores depend on (the data file's size and modification time; the reward, its
options, weights and config, and the files its options name; the chunking and image size), so a
rerun with another reward or retrained weights at the same path starts afresh instead of reusing
stale scores. SmPO's soft labels, Diffusion-DRO's expert ranking, MaPPO's and MADPO's reward
inputs read these columns.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm import tqdm

from diffalign.config import add_config_arguments, config_from_args, to_dict
from diffalign.data.preference import load_image
from diffalign.fingerprint import file_fingerprint, fingerprint, module_fingerprint
from diffalign.rewards import load_reward


@dataclass
class ScoreDatasetConfig:
    data: Path = field(metadata={"help": "a Pick-a-Pic-style .parquet or a .jsonl of pairs"})
    output: Path = field(metadata={"help": "the scored .parquet to write"})
    reward: str = field(metadata={"help": "registered reward name or module:Class"})
    reward_options: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "constructor arguments of the reward (weights paths, ...)"}
    )
    column_prefix: str | None = field(
        default=None, metadata={"help": "name of the new columns (default: reward)"}
    )
    batch_size: int = field(default=16, metadata={"help": "images per reward call"})
    chunk_size: int = field(default=1024, metadata={"help": "rows per cached part (the unit of resumption)"})
    image_size: int | None = field(default=None, metadata={"help": "resize images to this square size first"})
    device: str | None = field(default=None, metadata={"help": "cuda, cpu, ... (default: cuda if available)"})
    on_bad_sample: Literal["error", "skip"] = field(
        default="error", metadata={"help": "a corrupt or missing image stops the run, or scores NaN"}
    )


def _chunks(cfg: ScoreDatasetConfig):  # type: ignore[no-untyped-def]
    """(index, table-like dict of columns, image refs of the two sides, row names) per chunk."""
    if cfg.data.suffix == ".parquet":
        import pyarrow.parquet as pq

        for c, batch in enumerate(pq.ParquetFile(cfg.data).iter_batches(batch_size=cfg.chunk_size)):
            columns = batch.to_pydict()
            for key in ("caption", "jpg_0", "jpg_1"):
                if key not in columns:
                    raise ValueError(f"{cfg.data}: missing column '{key}'")
            start = c * cfg.chunk_size
            names = [f"{cfg.data}:{start + i}" for i in range(len(columns["jpg_0"]))]
            yield c, columns, (columns["jpg_0"], columns["jpg_1"]), columns["caption"], ("_0", "_1"), names
        return
    rows = [json.loads(line) for line in cfg.data.read_text().splitlines() if line.strip()]
    for c in range(math.ceil(len(rows) / cfg.chunk_size)):
        part = rows[c * cfg.chunk_size : (c + 1) * cfg.chunk_size]
        for i, row in enumerate(part):
            for key in ("prompt", "chosen", "rejected"):
                if key not in row:
                    raise ValueError(f"{cfg.data}:{c * cfg.chunk_size + i + 1}: missing key '{key}'")
        columns = {k: [r[k] for r in part] for k in ("prompt", "chosen", "rejected")}
        refs = tuple([cfg.data.parent / r[k] for r in part] for k in ("chosen", "rejected"))
        names = [f"{cfg.data}:{c * cfg.chunk_size + i + 1}" for i in range(len(part))]
        yield c, columns, refs, columns["prompt"], ("_chosen", "_rejected"), names


def _score_side(reward, refs, prompts, names, cfg: ScoreDatasetConfig) -> list[float]:  # type: ignore[no-untyped-def]
    scores: list[float] = []
    for start in range(0, len(refs), cfg.batch_size):
        images, keep = [], []
        for k in range(start, min(start + cfg.batch_size, len(refs))):
            try:
                images.append(load_image(refs[k], names[k], cfg.image_size))
                keep.append(k)
            except (FileNotFoundError, ValueError):
                if cfg.on_bad_sample == "error":
                    raise
        batch_scores = [math.nan] * (min(start + cfg.batch_size, len(refs)) - start)
        if images:
            sizes = {tuple(im.shape) for im in images}
            if len(sizes) > 1:
                raise ValueError(f"{names[start]}: images of different sizes {sorted(sizes)}; set image_size")
            batch_prompts = [prompts[k] for k in keep] if reward.needs_prompts else None
            values = reward(torch.stack(images), batch_prompts).float().cpu().tolist()
            for k, v in zip(keep, values, strict=True):
                batch_scores[k - start] = v
        scores.extend(batch_scores)
    return scores


def score_dataset(cfg: ScoreDatasetConfig) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not cfg.data.is_file():
        raise FileNotFoundError(f"data not found: {cfg.data}")
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    reward = load_reward(cfg.reward, **cfg.reward_options).to(device)
    prefix = cfg.column_prefix or cfg.reward.replace(":", "_").replace(".", "_")
    settings = {k: v for k, v in to_dict(cfg).items() if k not in ("output", "batch_size", "device")}
    # weights a plug-in keeps outside its parameters still come from the files its options name
    named_files = [
        file_fingerprint(v) for v in cfg.reward_options.values() if isinstance(v, str) and Path(v).exists()
    ]
    key = fingerprint(settings, file_fingerprint(cfg.data), module_fingerprint(reward), named_files)
    parts_dir = cfg.output.with_name(cfg.output.name + ".parts") / key
    parts_dir.mkdir(parents=True, exist_ok=True)
    parts = []
    for c, columns, refs, prompts, suffixes, names in tqdm(_chunks(cfg), desc="scoring", unit="chunk"):
        part = parts_dir / f"part-{c:05d}.parquet"
        parts.append(part)
        if part.is_file():  # done in an earlier run
            continue
        for side, suffix in zip(refs, suffixes, strict=True):
            columns[prefix + suffix] = _score_side(reward, side, prompts, names, cfg)
        tmp = part.with_suffix(".tmp")
        pq.write_table(pa.table(columns), tmp)
        tmp.replace(part)  # a part is either complete or absent
    table = pa.concat_tables([pq.read_table(p) for p in parts])
    if cfg.data.suffix != ".parquet":  # the parts keep the JSONL's paths: the cache holds for any output
        table = _paths_relative_to(table, cfg.data.parent, cfg.output.parent)
    pq.write_table(table, cfg.output)
    return cfg.output


def _paths_relative_to(table: Any, source: Path, target: Path) -> Any:
    """``table`` with its ``chosen`` / ``rejected`` image paths (relative to ``source``) made
    relative to ``target``, where readers of the output look for them."""
    import pyarrow as pa

    for key in ("chosen", "rejected"):
        paths = [
            os.path.relpath((source / p).resolve(), target.resolve()) for p in table.column(key).to_pylist()
        ]
        table = table.set_column(table.schema.get_field_index(key), key, pa.array(paths, pa.string()))
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_config_arguments(parser, ScoreDatasetConfig)
    print(score_dataset(config_from_args(ScoreDatasetConfig, parser.parse_args(argv), "score_dataset")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
