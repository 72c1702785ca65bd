"""The evaluation table a paper prints (``diffalign eval``).

One or more models (a pipeline folder; or a base pipeline with a LoRA (``adapter``) or a full
fine-tune's ``unet`` export) sample every prompt of a prompt set
(:func:`~diffalign.data.prompts.read_prompt_set`: PartiPrompts TSV, HPDv2 JSON, DrawBench CSV, a
text file) ``samples_per_prompt`` times, image ``i`` of every model from the same seeded noise
(:func:`~diffalign.evaluation.image_seed`; checked before any comparison). The samples are saved
as PNG under ``output_dir/images/<model>/``; then each reward loads once and scores every model's
stored images in batches. For each reward and model the report gives the mean and median score
and, against the first model, the win-rate (a tie counts half) with its 95% Wilson interval, as
the Diffusion-DPO, SmPO and Diffusion-DRO papers report them.

Written to ``output_dir``: ``results.json``, ``results.md`` (the markdown table), ``scores.png``
(score distributions per reward and model), ``win_rates.png`` (win-rates with their intervals) and
``grid_<category>.png`` (the first ``grid_prompts`` prompts of each category, a row per model).
"""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffalign.config import AT_LEAST_ONE, NON_NEGATIVE, ConfigError, Range, check_ranges

__all__ = ["EvalConfig", "ModelSpec", "markdown_table", "run_eval"]


@dataclass
class ModelSpec:
    """One evaluated model: a pipeline, optionally with a LoRA fused in or its UNet replaced."""

    pipeline: str = field(metadata={"help": "a diffusers pipeline folder (or hub id)"})
    adapter: str | None = field(default=None, metadata={"help": "a LoRA fused into its UNet"})
    unet: str | None = field(
        default=None,
        metadata={"help": "a fine-tuned UNet: a checkpoint export (with unet/) or a UNet folder"},
    )


@dataclass
class EvalConfig:
    """What ``diffalign eval`` samples and scores (every key in ``diffalign eval --help``).

    Raises:
        ConfigError: no model or reward; two model names that map to one image folder; options
            for a reward not listed; a value out of its range.
    """

    models: dict[str, ModelSpec] = field(
        metadata={"help": "name -> {pipeline, adapter, unet}; the first is the one others are compared with"}
    )
    prompts: Path = field(metadata={"help": "prompt set: .tsv (PartiPrompts), .json (HPDv2), .csv, .txt"})
    output_dir: Path = field(metadata={"help": "report folder"})
    rewards: list[str] = field(default_factory=list, metadata={"help": "registry rewards to score with"})
    reward_kwargs: dict[str, dict[str, Any]] = field(
        default_factory=dict, metadata={"help": "reward name -> options for its constructor"}
    )
    samples_per_prompt: int = 1
    max_prompts: int | None = field(default=None, metadata={"help": "only the first N prompts"})
    seed: int = 0
    steps: int = field(default=20, metadata={"help": "DDIM steps (eta 0)"})
    guidance_scale: float = 5.0
    batch_size: int = field(default=16, metadata={"help": "images per sampling and scoring batch"})
    grid_prompts: int = field(default=8, metadata={"help": "prompts per category in the image grids"})
    device: str | None = field(default=None, metadata={"help": "cuda if available, else cpu"})

    ranges: ClassVar[dict[str, Range]] = {
        "samples_per_prompt": AT_LEAST_ONE, "max_prompts": AT_LEAST_ONE, "steps": AT_LEAST_ONE,
        "guidance_scale": NON_NEGATIVE, "batch_size": AT_LEAST_ONE, "grid_prompts": AT_LEAST_ONE,
    }  # fmt: skip

    def __post_init__(self) -> None:
        check_ranges(self)
        if not self.models:
            raise ConfigError("models: give at least one model, e.g. models='{base: {pipeline: PATH}}'")
        folders = [_safe(name) for name in self.models]
        if len(set(folders)) < len(folders):
            raise ConfigError(f"models: two names share an image folder name ({', '.join(folders)})")
        if not self.rewards:
            raise ConfigError("rewards: give at least one reward, e.g. rewards=[pickscore]")
        unknown = sorted(set(self.reward_kwargs) - set(self.rewards))
        if unknown:
            raise ConfigError(f"reward_kwargs: options for '{unknown[0]}', which is not among the rewards")


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    """Sample, score and compare (see the module); returns what ``results.json`` holds.

    Raises:
        FileNotFoundError: a missing prompt file, pipeline, adapter or UNet.
        ValueError: a prompt file it cannot read (named), an inpainting model or a reward that
            needs masks (text-to-image evaluation), models that drew different seeds, a
            non-finite score.
    """
    from diffalign.data.prompts import read_prompt_set
    from diffalign.evaluation import win_rate
    from diffalign.rewards import reward_class

    items = read_prompt_set(cfg.prompts)[: cfg.max_prompts]
    masked = [r for r in cfg.rewards if reward_class(r).needs_masks]
    if masked:  # before any model samples
        raise ValueError(
            f"reward '{masked[0]}' scores inpaintings (it needs masks); eval scores text-to-image samples"
        )
    prompts = [item.prompt for item in items for _ in range(cfg.samples_per_prompt)]
    categories = [item.category for item in items for _ in range(cfg.samples_per_prompt)]
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    seeds = {name: _sample_model(cfg, name, spec, prompts, device) for name, spec in cfg.models.items()}
    first = next(iter(cfg.models))
    differ = [name for name, s in seeds.items() if s != seeds[first]]
    if differ:
        raise ValueError(
            f"model '{differ[0]}' drew other seeds than '{first}': its samples are not comparable"
        )
    scores = {reward: _score_all(cfg, reward, prompts, device) for reward in cfg.rewards}
    table = {
        reward: {
            name: {
                "mean": float(s.mean()), "median": statistics.median(s.tolist()),
                **(win_rate(s, by_model[first]) if name != first else {}),
            }
            for name, s in by_model.items()
        }
        for reward, by_model in scores.items()
    }  # fmt: skip
    results = {
        "output_dir": str(cfg.output_dir), "prompts": str(cfg.prompts), "n_prompts": len(items),
        "samples_per_prompt": cfg.samples_per_prompt,
        "seed": cfg.seed, "steps": cfg.steps, "guidance_scale": cfg.guidance_scale, "compared_with": first,
        "models": {name: _spec(m) for name, m in cfg.models.items()},
        "image_seeds_equal": True, "rewards": table,
    }  # fmt: skip
    (cfg.output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (cfg.output_dir / "results.md").write_text(markdown_table(results))
    _plots(cfg, scores, table, first)
    _grids(cfg, items, categories)
    return results


def _spec(model: ModelSpec) -> dict[str, str]:
    return {k: v for k, v in vars(model).items() if v is not None}


def _load_model(spec: ModelSpec, device: torch.device) -> Any:
    from diffusers import UNet2DConditionModel

    from diffalign.diffusion.policy import DiffusionPolicy

    policy = DiffusionPolicy.from_pretrained(spec.pipeline, adapter=spec.adapter, device=device)
    if spec.unet is not None:
        folder = Path(spec.unet)
        folder = folder / "unet" if (folder / "unet").is_dir() else folder
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"unet: {spec.unet} holds neither unet/ nor a UNet's config.json")
        policy.unet = UNet2DConditionModel.from_pretrained(folder).to(device)
    if policy.is_inpainting:
        raise ValueError(f"{spec.pipeline}: an inpainting pipeline; eval samples text-to-image models")
    return policy


def _sample_model(
    cfg: EvalConfig, name: str, spec: ModelSpec, prompts: list[str], device: torch.device
) -> list[int]:
    """Sample ``prompts`` with model ``name`` into ``images/<name>/<i>.png``; returns the seeds of
    the images' noise."""
    from diffalign.evaluation import image_seed, sample_images
    from diffalign.images import to_pil

    policy = _load_model(spec, device)
    folder = cfg.output_dir / "images" / _safe(name)
    folder.mkdir(parents=True, exist_ok=True)
    seeds = []
    for start in range(0, len(prompts), cfg.batch_size):
        part = prompts[start : start + cfg.batch_size]
        images = sample_images(
            policy,
            part,
            cfg.seed,
            cfg.steps,
            cfg.guidance_scale,
            cfg.batch_size,
            f"sampling ({name})",
            first=start,
        )
        seeds += [image_seed(cfg.seed, start + i) for i in range(len(part))]
        for i, image in enumerate(to_pil(images)):
            image.save(folder / f"{start + i:06d}.png")
    return seeds


def _score_all(
    cfg: EvalConfig, reward_name: str, prompts: list[str], device: torch.device
) -> dict[str, Tensor]:
    """Load ``reward_name`` once and score every model's stored images with it."""
    from diffalign.rewards import load_reward

    reward = load_reward(reward_name, **cfg.reward_kwargs.get(reward_name, {})).to(device)
    out = {}
    for name in cfg.models:
        folder, scores = cfg.output_dir / "images" / _safe(name), []
        for start in tqdm(
            range(0, len(prompts), cfg.batch_size), desc=f"{reward_name} on {name}", unit="batch"
        ):
            rows = range(start, min(start + cfg.batch_size, len(prompts)))
            images = torch.stack([_read(folder / f"{i:06d}.png") for i in rows]).to(device)
            texts = [prompts[i] for i in rows] if reward.needs_prompts else None
            scores.append(reward(images, texts).double().cpu())
        out[name] = torch.cat(scores)
    return out


def _read(path: Path) -> Tensor:
    from diffalign.data.preference import load_image

    return load_image(path, str(path))


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]", "_", name)


def markdown_table(results: dict[str, Any]) -> str:
    """``results``' table in markdown: a row per model, per reward its mean, median and win-rate
    against the first model with the 95% interval."""
    rewards = list(results["rewards"])
    head = "| model | " + " | ".join(f"{r} mean | {r} median | {r} win-rate [95% CI]" for r in rewards) + " |"
    lines = [head, "|---" * (1 + 3 * len(rewards)) + "|"]
    for name in results["models"]:
        cells = []
        for r in rewards:
            m = results["rewards"][r][name]
            win = (
                "-"
                if "win_rate" not in m
                else f"{m['win_rate']:.3f} [{m['win_rate_95ci'][0]:.3f}, {m['win_rate_95ci'][1]:.3f}]"
            )
            cells += [f"{m['mean']:.4g}", f"{m['median']:.4g}", win]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    note = (
        f"\n{results['n_prompts']} prompts of {results['prompts']} x {results['samples_per_prompt']} "
        "samples, "
        f"seed {results['seed']}, {results['steps']} DDIM steps, guidance {results['guidance_scale']}; "
        f"win-rates against {results['compared_with']} (ties count half)\n"
    )
    return "\n".join(lines) + "\n" + note


def _plots(cfg: EvalConfig, scores: dict[str, dict[str, Tensor]], table: dict, first: str) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    names = list(cfg.models)
    fig = Figure(figsize=(4 * len(scores), 3.5), layout="constrained")
    for ax, (reward, by_model) in zip(
        fig.subplots(1, len(scores), squeeze=False)[0], scores.items(), strict=True
    ):
        ax.boxplot([by_model[n].numpy() for n in names], tick_labels=names)
        ax.set(title=reward, ylabel="score")
        ax.grid(alpha=0.3, axis="y")
    fig.savefig(cfg.output_dir / "scores.png")
    others = names[1:]
    if not others:
        return
    fig = Figure(figsize=(4 * len(scores), 3.5), layout="constrained")
    for ax, reward in zip(fig.subplots(1, len(scores), squeeze=False)[0], scores, strict=True):
        rates = [table[reward][n]["win_rate"] for n in others]
        # max(0, .): at a win-rate of 0 or 1 the interval's end can miss it by a rounding error
        low = [max(0.0, r - table[reward][n]["win_rate_95ci"][0]) for r, n in zip(rates, others, strict=True)]
        high = [
            max(0.0, table[reward][n]["win_rate_95ci"][1] - r) for r, n in zip(rates, others, strict=True)
        ]
        ax.errorbar(others, rates, yerr=[low, high], fmt="o", capsize=4)
        ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
        ax.set(title=f"{reward}: win-rate vs {first}", ylabel="win-rate (95% CI)", ylim=(0, 1))
    fig.savefig(cfg.output_dir / "win_rates.png")


def _grids(cfg: EvalConfig, items: list[Any], categories: list[str]) -> None:
    """Per category, the first sample of its first ``grid_prompts`` prompts, a row per model."""
    from matplotlib.figure import Figure

    names = list(cfg.models)
    for category in dict.fromkeys(item.category for item in items):
        index = [i for i, c in enumerate(categories) if c == category][:: cfg.samples_per_prompt][
            : cfg.grid_prompts
        ]
        fig = Figure(figsize=(1.6 * len(index), 1.8 * len(names)), layout="constrained")
        axes = fig.subplots(len(names), len(index), squeeze=False)
        for r, name in enumerate(names):
            for c, i in enumerate(index):
                ax = axes[r][c]
                ax.imshow(
                    _read(cfg.output_dir / "images" / _safe(name) / f"{i:06d}.png").permute(1, 2, 0).numpy()
                )
                ax.set_xticks([])
                ax.set_yticks([])
                if c == 0:
                    ax.set_ylabel(name)
                if r == 0:
                    ax.set_title(items[i // cfg.samples_per_prompt].prompt[:24], fontsize=7)
        fig.savefig(cfg.output_dir / f"grid_{_safe(category or 'all')}.png")
