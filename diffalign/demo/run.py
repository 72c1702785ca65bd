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

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from diffalign.demo.pretrain import PretrainConfig, base_folder, pretrained_base, trained_classifier
from diffalign.demo.world import prompts
from diffalign.images import save_grid, to_pil

__all__ = ["DemoConfig", "run_demo"]


@dataclass
class DemoConfig:
    method: str = field(
        default="diffusion_dpo", metadata={"help": "method to align with (configs/demo/<method>.yaml)"}
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


def _sample(policy: Any, prompt_list: list[str], seed: int, cfg: DemoConfig, desc: str) -> torch.Tensor:
    from diffalign.diffusion.sampling import sample_with_trajectory

    out = []
    for start in tqdm(range(0, len(prompt_list), 128), desc=desc, unit="batch"):
        chunk = prompt_list[start : start + 128]
        g = torch.Generator().manual_seed(seed * 100_003 + start)
        traj = sample_with_trajectory(
            policy,
            chunk,
            num_inference_steps=cfg.sampler_steps,
            guidance_scale=cfg.guidance_scale,
            eta=0.0,
            generator=g,
        )
        out.append(traj.images)
    return torch.cat(out)


def _annotate(images: torch.Tensor, prompt_list: list[str], cfg: DemoConfig, pairs_file: Path) -> dict:
    """Writes the images to ``pairs_file``'s folder and the annotator's pairs to ``pairs_file``."""
    from diffalign.rewards import load_reward

    reward = load_reward("demo_size")
    scores = reward(images, prompt_list)
    g = torch.Generator().manual_seed(cfg.seed + 7)
    folder = pairs_file.parent / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(to_pil(images)):
        im.save(folder / f"{i}.png")
    rows, disagree, ties = [], 0, 0
    by_prompt: dict[str, list[int]] = {}
    for i, p in enumerate(prompt_list):
        by_prompt.setdefault(p, []).append(i)
    for p, idx in by_prompt.items():
        for _ in range(cfg.pairs_per_prompt):
            a, b = (idx[k] for k in torch.randperm(len(idx), generator=g)[:2].tolist())
            gap = float(scores[a] - scores[b])
            if abs(gap) < cfg.tie_margin:
                ties += 1
                rows.append(
                    {"prompt": p, "chosen": f"images/{a}.png", "rejected": f"images/{b}.png", "label": 0.5}
                )
                continue
            a_wins = torch.rand(1, generator=g).item() < 1 / (1 + math.exp(-gap / cfg.annotator_temperature))
            disagree += int(a_wins != (gap > 0))
            w, lo = (a, b) if a_wins else (b, a)
            rows.append({"prompt": p, "chosen": f"images/{w}.png", "rejected": f"images/{lo}.png"})
    pairs_file.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return {"pairs": len(rows), "ties": ties, "label_noise": disagree / max(1, len(rows) - ties)}


def _wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def _diversity(images: torch.Tensor, prompt_list: list[str]) -> float:
    values = []
    for p in dict.fromkeys(prompt_list):
        group = images[[i for i, q in enumerate(prompt_list) if q == p]].flatten(1)
        d = torch.cdist(group, group)
        values.append(float(d.sum() / (len(group) * (len(group) - 1))))
    return sum(values) / len(values)


def _evaluate(
    policy: Any, classifier: Any, cfg: DemoConfig, seed: int, name: str
) -> tuple[dict, torch.Tensor, list[str], torch.Tensor]:
    from diffalign.rewards import load_reward

    eval_prompts = [p for p in cfg.held_out_prompts for _ in range(cfg.eval_samples_per_prompt)]
    images = _sample(policy, eval_prompts, seed, cfg, f"sampling the {name} model (held-out prompts)")
    scores = load_reward("demo_size")(images, eval_prompts)
    stats = {
        "reward": float(scores.mean()),
        "fidelity": classifier.accuracy(images, eval_prompts),
        "diversity": _diversity(images, eval_prompts),
    }
    return stats, scores, eval_prompts, images


def _curve(values: list[float], path: Path, title: str) -> None:
    """A plain line plot with PIL (no plotting dependency)."""
    w, h, pad = 480, 240, 30
    image = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(image)
    draw.text((pad, 5), title, fill="black")
    if len(values) >= 2:
        lo, hi = min(values), max(values)
        span = hi - lo or 1.0
        points = [
            (pad + i * (w - 2 * pad) / (len(values) - 1), h - pad - (v - lo) / span * (h - 2 * pad))
            for i, v in enumerate(values)
        ]
        draw.line(points, fill="navy", width=2)
        draw.text((2, pad - 10), f"{hi:.3g}", fill="black")
        draw.text((2, h - pad), f"{lo:.3g}", fill="black")
    draw.rectangle([pad, pad, w - pad, h - pad], outline="grey")
    image.save(path)


def run_demo(cfg: DemoConfig) -> dict:
    from diffalign.api import train
    from diffalign.config import load_config, packaged_config
    from diffalign.diffusion.policy import DiffusionPolicy
    from diffalign.training.config import TrainConfig

    started = time.perf_counter()
    try:
        config_file = packaged_config("demo", f"{cfg.method}.yaml")
    except FileNotFoundError as err:
        raise FileNotFoundError(f"no demo config for method '{cfg.method}': {err}") from err
    out, base_path = cfg.output_dir, base_folder(cfg.pretrain)
    data = out / "data" / "pairs.jsonl"
    # loaded first so that a wrong key fails now, not after minutes of pretraining
    train_cfg = load_config(TrainConfig, config_file, [
        f"model.pretrained={base_path}", f"data.path={data}", f"output_dir={out / 'training'}",
        f"seed={cfg.seed}", *cfg.train_overrides,
    ])  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    pretrained_base(cfg.pretrain)
    classifier, classifier_accuracy = trained_classifier(cfg.pretrain.seed, cfg.classifier_steps)
    base = DiffusionPolicy.from_pretrained(base_path)

    train_prompts = [p for p in prompts() if p not in cfg.held_out_prompts]
    sample_prompts = [p for p in train_prompts for _ in range(cfg.samples_per_prompt)]
    images = _sample(base, sample_prompts, cfg.seed + 1, cfg, "sampling the base model (training prompts)")
    annotation = _annotate(images, sample_prompts, cfg, data)
    metrics_file = out / "training" / "metrics.jsonl"
    # the training loop appends (it may resume); a rerun into this folder plots only its own steps
    earlier = len(metrics_file.read_text().splitlines()) if metrics_file.is_file() else 0
    result = train(train_cfg)
    aligned = DiffusionPolicy.from_pretrained(base_path)
    export = out / "training" / "checkpoints" / f"checkpoint-{result.global_step}" / "export"
    _load_export(aligned, export)

    base_stats, base_scores, eval_prompts, base_images = _evaluate(
        base, classifier, cfg, cfg.seed + 1000, "base"
    )
    aligned_stats, aligned_scores, _, aligned_images = _evaluate(
        aligned, classifier, cfg, cfg.seed + 1000, "aligned"
    )
    wins = float(
        (aligned_scores > base_scores).float().sum() + 0.5 * (aligned_scores == base_scores).float().sum()
    )
    n = len(eval_prompts)
    low, high = _wilson(wins, n)
    log = [json.loads(line) for line in metrics_file.read_text().splitlines()[earlier:]]
    per, k, n_prompts = (
        cfg.eval_samples_per_prompt,
        min(8, cfg.eval_samples_per_prompt),
        len(cfg.held_out_prompts),
    )
    # per held-out prompt, a base row above an aligned row: same prompt and seed in each column
    rows = [imgs[i * per : i * per + k] for i in range(n_prompts) for imgs in (base_images, aligned_images)]
    save_grid(rows, out / "before_after.png", scale=4)
    _curve([m["loss"] for m in log], out / "loss.png", "training loss")
    _curve(
        [m["rewards/margins"] for m in log if "rewards/margins" in m],
        out / "reward_margin.png",
        "implicit reward margin",
    )
    report = {
        "method": cfg.method,
        "objective": train_cfg.objective,
        "seed": cfg.seed,
        "held_out_prompts": cfg.held_out_prompts,
        "annotation": annotation,
        "classifier_accuracy_on_real_images": classifier_accuracy,
        "base": base_stats,
        "aligned": aligned_stats,
        "win_rate": wins / n,
        "win_rate_95ci": [low, high],
        "fidelity_drop_points": 100 * (base_stats["fidelity"] - aligned_stats["fidelity"]),
        "diversity_ratio": aligned_stats["diversity"] / base_stats["diversity"],
        "training_steps": result.global_step,
        "seconds": time.perf_counter() - started,
        "config": json.loads(json.dumps(asdict(cfg), default=str)),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def _load_export(policy: Any, export: Path) -> None:
    from diffusers import UNet2DConditionModel

    if not (export / "unet").is_dir():
        raise FileNotFoundError(f"{export}: no unet/ export (the demo configs fine-tune the full UNet)")
    policy.unet = UNet2DConditionModel.from_pretrained(export / "unet")
