"""``diffalign demo --method prefpaint``: PrefPaint in the demo world's inpainting variant.

1. the inpainting base model (``PretrainConfig(inpainting=True)``) and the fidelity classifier
   come from the cache, or are trained first;
2. reward-model data: the base inpaints ``reward_examples`` masked pictures ``inpaintings_per_example``
   times each; the simulated annotator (the text-to-image demo's, on the demo reward) labels every
   pair of inpaintings of one masked input; the pairs (with their masks) are written as JSONL + PNGs;
3. the PrefPaint reward model trains on them through ``scripts/train_reward.py``'s code path
   (``configs/rewards/prefpaint_demo.yaml``: a small CLIP-like ViT trained with its head), which
   also writes V^-1; its held-out pair accuracy goes into the report;
4. PrefPaint trains (``configs/demo/prefpaint.yaml``) on ``train_examples`` other masked pictures
   with that reward and its trust weights;
5. base and aligned models inpaint held-out masked pictures (``eval_examples``, each
   ``eval_samples_per_example`` times, the same seeds for both) and are compared by the demo
   reward (the "human" preference the reward model only approximates): win-rate, reward,
   fidelity, diversity among one masked input's inpaintings; and how often the learned reward
   ranks two inpaintings of one masked picture as the demo reward does, on each model's samples.

Every inpainting (reward data, rollouts, evaluation) has the input pasted back outside the hole,
as ``InpaintingAligner.inpaint`` returns it by default: the UNet regenerates the whole picture,
and changes there that no user keeps should neither be judged nor rewarded. The report's
``raw_output`` compares the UNet's outputs as drawn, without the paste.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from diffalign.demo.world import InpaintingExamples, World

__all__ = ["run_inpainting_demo"]

REWARD_EXAMPLES, TRAIN_EXAMPLES, EVAL_EXAMPLES = 384, 256, 64
INPAINTINGS_PER_EXAMPLE, EVAL_SAMPLES_PER_EXAMPLE = 4, 4


def _examples(seed: int, n: int) -> InpaintingExamples:
    return World(seed).inpainting(n, torch.Generator().manual_seed(seed))


def _repeat(ex: InpaintingExamples, k: int) -> InpaintingExamples:
    return InpaintingExamples(
        ex.images.repeat_interleave(k, 0), ex.masks.repeat_interleave(k, 0),
        ex.masked_images.repeat_interleave(k, 0), [p for p in ex.prompts for _ in range(k)],
    )  # fmt: skip


def _reward_model(cfg: Any, base: Any, out: Path, folder: Path) -> dict:
    """Steps 2-3: annotated inpainting pairs, and the PrefPaint reward trained on them."""
    from diffalign.config import load_config, packaged_config
    from diffalign.demo.run import _annotate
    from diffalign.evaluation import sample_images
    from diffalign.rewards import load_reward
    from diffalign_rewards.bradley_terry import TrainRewardConfig
    from diffalign_rewards.prefpaint_training import train_prefpaint

    ex = _repeat(_examples(cfg.seed + 20_000, REWARD_EXAMPLES), INPAINTINGS_PER_EXAMPLE)
    images = sample_images(
        base, ex.prompts, cfg.seed + 1, cfg.sampler_steps, cfg.guidance_scale, images=ex.images,
        masks=ex.masks, desc="inpainting with the base model (reward data)", keep_unmasked=True,
    )  # fmt: skip
    groups = [i // INPAINTINGS_PER_EXAMPLE for i in range(len(ex.prompts))]
    pairs = out / "data" / "reward_pairs.jsonl"
    annotation = _annotate(images, load_reward("demo_size"), ex.prompts, cfg, pairs, groups, ex.masks)
    reward_cfg = load_config(
        TrainRewardConfig, packaged_config("rewards", "prefpaint_demo.yaml"),
        [f"data={pairs}", f"output_dir={folder}", f"seed={cfg.seed}"],
    )  # fmt: skip
    return {"annotation": annotation, "reward_model": train_prefpaint(reward_cfg)}


def _reward_agreement(cfg: Any, folder: Path, held: InpaintingExamples, measured: dict) -> dict:
    """How often the learned reward orders two inpaintings of one held-out masked picture as the
    demo reward does (gaps under the annotator's tie margin left out), on each model's samples:
    on the aligned model's, a fall means the policy found what the reward model gets wrong."""
    from diffalign.evaluation import input_groups, ranking_agreement
    from diffalign.images import masked_for_reward
    from diffalign.rewards import load_reward

    learned = load_reward("prefpaint", weights=str(folder))
    context = {"masks": held.masks, "masked_images": masked_for_reward(held.images, held.masks)}
    groups = input_groups(held.prompts, held.images, held.masks)
    agreement = {}
    for name, ev in measured.items():
        scores = learned(ev.images, None, **context).float().cpu()
        agreement[name] = ranking_agreement(scores, ev.scores, groups, cfg.tie_margin)
    return {f"reward_model_agreement_{name}": a for name, (a, _) in agreement.items()} | {
        f"reward_model_agreement_{name}_pairs": n for name, (_, n) in agreement.items()
    }


def _held_out(
    cfg: Any, models: dict[str, Any], held: InpaintingExamples, classifier: Any
) -> tuple[dict, dict]:
    """Step 5 for each model: its inpaintings of ``held`` (the same seeds for all) under the demo
    reward, with the input pasted back outside the hole, and (reported as ``raw_output``) the same
    samples as the UNet drew them."""
    from diffalign.evaluation import measure, sample_images
    from diffalign.images import paste_unmasked
    from diffalign.rewards import load_reward

    seed, reward, pasted, raw = cfg.seed + 1000, load_reward("demo_size"), {}, {}
    for name, model in models.items():
        samples = sample_images(
            model, held.prompts, seed, cfg.sampler_steps, cfg.guidance_scale,
            desc=f"inpainting with the {name} model (held-out)", images=held.images, masks=held.masks,
        )  # fmt: skip
        for out, images in ((raw, samples), (pasted, paste_unmasked(samples, held.images, held.masks))):
            out[name] = measure(
                images, held.prompts, reward, seed, classifier.accuracy, held.images, held.masks
            )
    return pasted, raw


def run_inpainting_demo(cfg: Any) -> dict:
    """The steps above for ``cfg`` (a :class:`~diffalign.demo.run.DemoConfig`); writes and returns
    the report."""
    from diffalign.data.inpainting import write_inpainting_examples
    from diffalign.demo.pretrain import base_folder, pretrained_base, trained_classifier
    from diffalign.demo.run import _load_export, _plots_and_report, _timed_train, _train_config
    from diffalign.diffusion.policy import DiffusionPolicy
    from diffalign.evaluation import compare

    started, out = time.perf_counter(), cfg.output_dir
    pretrain = dataclasses.replace(cfg.pretrain, inpainting=True)
    base_path = base_folder(pretrain)
    reward_folder = out / "reward_model"
    data = out / "data" / "train"
    train_cfg = _train_config(
        cfg, base_path, data / "examples.jsonl", [f"method_options.reward_kwargs.weights={reward_folder}"]
    )
    out.mkdir(parents=True, exist_ok=True)
    pretrained_base(pretrain)
    classifier, classifier_accuracy = trained_classifier(pretrain.seed, cfg.classifier_steps)
    base = DiffusionPolicy.from_pretrained(base_path)
    reward_report = _reward_model(cfg, base, out, reward_folder)
    ex = _examples(cfg.seed + 10_000, TRAIN_EXAMPLES)
    write_inpainting_examples(data, ex.images, ex.masks, ex.prompts)
    shutil.rmtree(train_cfg.output_dir, ignore_errors=True)
    result, training_seconds = _timed_train(train_cfg)
    aligned = DiffusionPolicy.from_pretrained(base_path)
    _load_export(aligned, out / "training" / "checkpoints" / f"checkpoint-{result.global_step}" / "export")
    held = _repeat(_examples(cfg.seed + 30_000, EVAL_EXAMPLES), EVAL_SAMPLES_PER_EXAMPLE)
    models = {"base": base, "aligned": aligned}
    measured, raw = _held_out(cfg, models, held, classifier)
    report = {
        "method": cfg.method, "objective": train_cfg.objective, "seed": cfg.seed,
        "held_out": f"{EVAL_EXAMPLES} unseen masked pictures x {EVAL_SAMPLES_PER_EXAMPLE} samples",
        **reward_report, **_reward_agreement(cfg, reward_folder, held, measured),
        "classifier_accuracy_on_real_images": classifier_accuracy,
        "base": measured["base"].summary(), "aligned": measured["aligned"].summary(),
        **compare(measured["base"], measured["aligned"]),
        "raw_output": {**{n: ev.summary() for n, ev in raw.items()}, **compare(raw["base"], raw["aligned"])},
        "training_steps": result.global_step,
        "trust_weights": train_cfg.method_options.get("trust_weights"),
        "training_seconds": training_seconds, "seconds": time.perf_counter() - started,
    }  # fmt: skip
    return _plots_and_report(cfg, measured, train_cfg, report, EVAL_SAMPLES_PER_EXAMPLE, EVAL_EXAMPLES)
