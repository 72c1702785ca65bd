"""``diffalign demo``: pretrain (or load) the base model, collect preferences, align, evaluate.

1. the base model and the fidelity classifier come from the cache, or are trained first;
2. the base model samples ``samples_per_prompt`` images for each training prompt; a simulated
   annotator labels same-prompt pairs through a Bradley-Terry model of the demo reward (label
   noise from its temperature, near-ties marked as ties); the pairs are written as JSONL + PNGs;
3. the method trains through ``scripts/train.py``'s code path (``diffalign.api.train``) with the
   config ``configs/demo/<method>.yaml``;
4. base and aligned models sample held-out prompts with held-out seeds (the same seeds for
   both) and are compared: mean reward, win-rate of aligned over base (95% Wilson interval),
   diversity (mean pairwise distance among one prompt's samples), prompt fidelity (the
   classifier's accuracy);
5. a report folder: before/after grids, reward and loss curves, ``report.json``.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffalign.demo.pretrain import PretrainConfig, base_folder, pretrained_base, trained_classifier
from diffalign.demo.world import prompts
from diffalign.evaluation import compare, evaluate, sample_images
from diffalign.images import save_grid, to_pil

__all__ = ["DemoConfig", "run_demo"]


@dataclass
class DemoConfig:
    method: str = field(
        default="diffusion_dpo", metadata={"help": "method to align with (configs/demo/<method>.yaml)"}
    )
    objective: str | None = field(
        default=None,
        metadata={
            "help": "objective replacing the method config's, which keeps the config's hyper-parameters "
            "it takes (beta); train_overrides still win (none: the config's objective)"
        },
    )
    output_dir: Path = field(default=Path("outputs/demo"), metadata={"help": "report folder"})
    seed: int = field(default=0, metadata={"help": "seed of sampling, annotation and training"})
    pretrain: PretrainConfig = field(
        default_factory=PretrainConfig, metadata={"help": "base model pretraining"}
    )
    classifier_steps: int = field(default=800, metadata={"help": "training steps of the fidelity classifier"})
    held_out_prompts: list[str] = field(
        default_factory=lambda: ["a red ring", "a green cross", "a blue circle"],
        metadata={"help": "prompts never seen in the preference data (evaluation)"},
    )
    samples_per_prompt: int = field(default=48, metadata={"help": "base samples per training prompt"})
    pairs_per_prompt: int = field(default=96, metadata={"help": "annotated pairs per training prompt"})
    annotator_temperature: float = field(
        default=0.05, metadata={"help": "Bradley-Terry temperature (label noise)"}
    )
    tie_margin: float = field(
        default=0.01, metadata={"help": "reward gap under which the annotator says 'tie'"}
    )
    eval_samples_per_prompt: int = field(default=64, metadata={"help": "evaluation samples per prompt"})
    guidance_scale: float = field(default=2.0, metadata={"help": "classifier-free guidance when sampling"})
    sampler_steps: int = field(default=20, metadata={"help": "DDIM steps when sampling"})
    train_overrides: list[str] = field(
        default_factory=list, metadata={"help": "key=value for the method config"}
    )


def _annotate(
    images: torch.Tensor,
    reward: Any,
    prompt_list: list[str],
    cfg: DemoConfig,
    pairs_file: Path,
    groups: list[Any] | None = None,
    masks: torch.Tensor | None = None,
) -> dict:
    """Writes the images (and ``masks``, for inpainting pairs) to ``pairs_file``'s folder and the
    annotator's pairs, with the reward's scores of both images, to ``pairs_file``. Pairs are drawn
    within a group: a prompt's samples (default), or one masked input's inpaintings (``groups``:
    one key per image; every pair of a group is labelled once)."""
    scores = reward(images, prompt_list)
    g = torch.Generator().manual_seed(cfg.seed + 7)
    folder = pairs_file.parent / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(to_pil(images)):
        im.save(folder / f"{i}.png")
    if masks is not None:
        for i, im in enumerate(to_pil(masks.expand(-1, 3, -1, -1))):
            im.convert("L").save(folder / f"{i}.mask.png")

    def row(prompt: str, chosen: int, rejected: int) -> dict:
        # the reward's scores ride along for the objectives that weigh pairs by them (mappo, ...)
        mask = {} if masks is None else {"mask": f"images/{chosen}.mask.png"}
        return {
            "prompt": prompt, "chosen": f"images/{chosen}.png", "rejected": f"images/{rejected}.png",
            "chosen_reward": float(scores[chosen]), "rejected_reward": float(scores[rejected]), **mask,
        }  # fmt: skip

    rows, disagree, ties = [], 0, 0
    by_group: dict[Any, list[int]] = {}
    for i, key in enumerate(groups or prompt_list):
        by_group.setdefault(key, []).append(i)
    for idx in by_group.values():
        # a prompt's pairs are drawn at random (in the order the text-to-image demos were measured in)
        every = itertools.combinations(idx, 2) if groups is not None else [None] * cfg.pairs_per_prompt
        for pair in every:
            a, b = pair or (idx[k] for k in torch.randperm(len(idx), generator=g)[:2].tolist())
            p = prompt_list[a]
            gap = float(scores[a] - scores[b])
            if abs(gap) < cfg.tie_margin:
                ties += 1
                rows.append({**row(p, a, b), "label": 0.5})
                continue
            a_wins = torch.rand(1, generator=g).item() < 1 / (1 + math.exp(-gap / cfg.annotator_temperature))
            disagree += int(a_wins != (gap > 0))
            w, lo = (a, b) if a_wins else (b, a)
            rows.append(row(p, w, lo))
    pairs_file.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return {"pairs": len(rows), "ties": ties, "label_noise": disagree / max(1, len(rows) - ties)}


def _curve(log: list[dict], key: str, path: Path, title: str) -> None:
    """``key`` of the logged metrics against the optimiser step, as a PNG at ``path``."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    points = [(m["step"], m[key]) for m in log if key in m]
    fig = Figure(figsize=(6, 3), dpi=100, layout="constrained")
    ax = fig.subplots()
    ax.plot([s for s, _ in points], [v for _, v in points], marker="." if len(points) < 30 else None)
    ax.set(title=title, xlabel="optimiser step", ylabel=key)
    ax.grid(alpha=0.3)
    fig.savefig(path)


def _timed_train(train_cfg: Any) -> tuple[Any, float]:
    """``diffalign.api.train(train_cfg)``'s result and its wall time in seconds (the report's
    ``training_seconds``, for comparisons at equal wall time)."""
    from diffalign.api import train

    started = time.perf_counter()
    result = train(train_cfg)
    return result, time.perf_counter() - started


def run_demo(cfg: DemoConfig) -> dict:
    from diffalign.demo.inpainting import run_inpainting_demo
    from diffalign.diffusion.policy import DiffusionPolicy
    from diffalign.methods import METHODS, get_method
    from diffalign.rewards import load_reward

    if cfg.method in METHODS and getattr(get_method(cfg.method), "inpainting", False):
        return run_inpainting_demo(cfg)
    started = time.perf_counter()
    out, base_path = cfg.output_dir, base_folder(cfg.pretrain)
    data = out / "data" / "pairs.jsonl"
    # read first, so that a wrong key fails now, not after minutes of pretraining
    train_cfg = _train_config(cfg, base_path, data)
    out.mkdir(parents=True, exist_ok=True)
    pretrained_base(cfg.pretrain)
    classifier, classifier_accuracy = trained_classifier(cfg.pretrain.seed, cfg.classifier_steps)
    base = DiffusionPolicy.from_pretrained(base_path)
    reward = load_reward("demo_size")

    annotation = _collect_preferences(cfg, base, reward, data)
    if train_cfg.output_dir == out / "training":  # the demo's own: a rerun trains afresh, not on top
        shutil.rmtree(train_cfg.output_dir, ignore_errors=True)
    result, training_seconds = _timed_train(train_cfg)
    aligned = DiffusionPolicy.from_pretrained(base_path)
    export = out / "training" / "checkpoints" / f"checkpoint-{result.global_step}" / "export"
    _load_export(aligned, export)

    measured = _evaluate_both(cfg, {"base": base, "aligned": aligned}, reward, classifier.accuracy)
    report = {
        "method": cfg.method,
        "objective": train_cfg.objective,
        "seed": cfg.seed,
        "held_out_prompts": cfg.held_out_prompts,
        "annotation": annotation,
        "classifier_accuracy_on_real_images": classifier_accuracy,
        "base": measured["base"].summary(),
        "aligned": measured["aligned"].summary(),
        **compare(measured["base"], measured["aligned"]),
        "training_steps": result.global_step,
        "training_seconds": training_seconds,
        "seconds": time.perf_counter() - started,
    }
    groups = len(cfg.held_out_prompts)
    return _plots_and_report(cfg, measured, train_cfg, report, cfg.eval_samples_per_prompt, groups)


def _plots_and_report(
    cfg: DemoConfig, measured: dict, train_cfg: Any, report: dict, per: int, groups: int
) -> dict:
    """The plots (:func:`_plots`; ``groups`` held-out inputs of ``per`` samples each) and
    ``report.json`` (``report`` with the demo's config)."""
    metrics = (train_cfg.output_dir / "metrics.jsonl").read_text().splitlines()
    _plots(cfg, measured, [json.loads(line) for line in metrics], per, groups)
    report = {**report, "config": json.loads(json.dumps(asdict(cfg), default=str))}
    (cfg.output_dir / "report.json").write_text(json.dumps(report, indent=2))
    return report


def _train_config(cfg: DemoConfig, base_path: Path, data: Path, extra: Sequence[str] = ()) -> Any:
    """The method's demo config, pointed at the demo's model and pairs, with ``cfg.objective``
    swapped in (keeping the hyper-parameters it takes) and the user's overrides on top.

    Raises:
        FileNotFoundError: the method has no demo config.
        ConfigError: a key, value or objective the config cannot take.
    """
    from diffalign.config import ConfigError, load_config, packaged_config
    from diffalign.methods import get_method
    from diffalign.objectives import objective_spec
    from diffalign.training.config import TrainConfig, with_method_defaults

    try:
        config_file = packaged_config("demo", f"{cfg.method}.yaml")
    except FileNotFoundError as err:
        raise FileNotFoundError(f"no demo config for method '{cfg.method}': {err}") from err
    demo_keys = [
        f"model.pretrained={base_path}", f"data.path={data}", f"output_dir={cfg.output_dir / 'training'}",
        f"seed={cfg.seed}",
    ]  # fmt: skip
    if cfg.objective is not None:
        configured = load_config(TrainConfig, config_file, demo_keys).objective or {}
        try:  # the demo's beta suits its likelihood scale, whichever objective weighs it
            swapped = objective_spec(cfg.objective, carried=configured)
        except KeyError as err:
            raise ConfigError(f"objective: {err.args[0]}") from err
        demo_keys.append(f"objective={json.dumps(swapped)}")
    train_cfg = load_config(TrainConfig, config_file, [*demo_keys, *extra, *cfg.train_overrides])
    return with_method_defaults(train_cfg, train_cfg.method, get_method(train_cfg.method).defaults)


def _collect_preferences(cfg: DemoConfig, base: Any, reward: Any, data: Path) -> dict:
    """Base samples of every training prompt, annotated into pairs at ``data``."""
    train_prompts = [p for p in prompts() if p not in cfg.held_out_prompts]
    sample_prompts = [p for p in train_prompts for _ in range(cfg.samples_per_prompt)]
    images = sample_images(
        base, sample_prompts, cfg.seed + 1, cfg.sampler_steps, cfg.guidance_scale,
        desc="sampling the base model (training prompts)",
    )  # fmt: skip
    return _annotate(images, reward, sample_prompts, cfg, data)


def _evaluate_both(cfg: DemoConfig, models: dict[str, Any], reward: Any, fidelity: Any) -> dict:
    """Each model sampled on the held-out prompts with the same seeds, and measured."""
    eval_prompts = [p for p in cfg.held_out_prompts for _ in range(cfg.eval_samples_per_prompt)]
    return {
        name: evaluate(
            model,
            eval_prompts,
            reward,
            cfg.seed + 1000,
            fidelity,
            cfg.sampler_steps,
            cfg.guidance_scale,
            desc=f"sampling the {name} model (held-out prompts)",
        )
        for name, model in models.items()
    }


def _plots(cfg: DemoConfig, measured: dict, log: list[dict], per: int, groups: int) -> None:
    """Before/after grid (per held-out input a base row above an aligned row, same seed in each
    column; ``groups`` inputs of ``per`` samples, up to 8 shown) and the training curves."""
    k, out = min(8, per), cfg.output_dir
    pair = (measured["base"].images, measured["aligned"].images)
    rows = [imgs[i * per : i * per + k] for i in range(min(groups, 8)) for imgs in pair]
    save_grid(rows, out / "before_after.png", scale=4)
    _curve(log, "loss", out / "loss.png", "training loss")
    curves = {  # preference methods' implicit reward; RL methods' rollout reward
        "rewards/margins": ("reward_margin.png", "implicit reward margin"),
        "reward/mean": ("rollout_reward.png", "mean reward of the rollouts"),
    }
    for key, (name, title) in curves.items():
        if any(key in m for m in log):
            _curve(log, key, out / name, title)


def _load_export(policy: Any, export: Path) -> None:
    from diffusers import UNet2DConditionModel

    if not (export / "unet").is_dir():
        raise FileNotFoundError(f"{export}: no unet/ export (the demo configs fine-tune the full UNet)")
    policy.unet = UNet2DConditionModel.from_pretrained(export / "unet")
