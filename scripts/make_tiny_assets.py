"""Make the tiny models and small synthetic preference datasets that the tiny configs use.

    python scripts/make_tiny_assets.py [OUT_DIR] [--kind sd|sdxl|inpaint|text] [--pairs 64]

sd / sdxl (OUT_DIR default outputs/tiny): OUT_DIR/pipeline (a ~1M-parameter diffusers pipeline
built from configs) and OUT_DIR/pairs.jsonl with OUT_DIR/images/*.png (32x32 images; the chosen
image of each pair is the brighter one).

inpaint (OUT_DIR default outputs/tiny_inpaint; configs/prefpaint/tiny.yaml): OUT_DIR/pipeline (a
9-channel SD inpainting pipeline), OUT_DIR/examples.jsonl (masked 32x32 pictures), OUT_DIR/pairs.jsonl
(two fills of each hole, the brighter chosen, with its mask) and OUT_DIR/reward (a small PrefPaint
reward trained on them by scripts/train_reward.py's code, with V^-1).

text (OUT_DIR default outputs/tiny_text; configs/text/*.yaml): OUT_DIR/lm (a tiny Llama and a
word-level tokenizer), OUT_DIR/pairs.jsonl (prompt, chosen, rejected, chosen_reward,
rejected_reward) and OUT_DIR/candidates.jsonl (prompt, 4 completions, rewards).

Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from diffalign.diffusion.tiny import build_tiny_pipeline
from diffalign.images import to_pil
from diffalign.text.tiny import build_tiny_causal_lm, synthetic_preferences


def make_pairs(out: Path, n_pairs: int, seed: int = 0, size: int = 32) -> Path:
    g = torch.Generator().manual_seed(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    prompts = ["a red square", "a blue circle", "a green triangle", "a yellow star"]
    for i in range(n_pairs):
        pair = []
        for side in range(2):
            image = torch.rand(3, size, size, generator=g) * (0.5 + 0.5 * torch.rand(1, generator=g))
            name = f"images/{i}_{side}.png"
            to_pil(image[None])[0].save(out / name)
            pair.append((float(image.mean()), name))
        (_, chosen), (_, rejected) = sorted(pair, reverse=True)
        rows.append({"prompt": prompts[i % len(prompts)], "chosen": chosen, "rejected": rejected})
    path = out / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def make_inpainting(out: Path, n: int, seed: int = 0, size: int = 32) -> Path:
    """Masked pictures, inpainting pairs (the brighter fill of the hole chosen) and a PrefPaint reward
    trained on them; returns the reward folder."""
    from diffalign.config import load_config, packaged_config
    from diffalign.data.inpainting import write_inpainting_examples
    from diffalign_rewards.bradley_terry import TrainRewardConfig
    from diffalign_rewards.prefpaint_training import train_prefpaint

    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, size, size, generator=g)
    masks = torch.zeros(n, 1, size, size)
    masks[:, :, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
    write_inpainting_examples(out, images, masks, ["a red square"] * n)
    rows = []
    for i in range(n):
        fills = [images[i] * (1 - masks[i]) + masks[i] * level for level in (0.8, 0.3)]
        for side, fill in enumerate(fills):
            to_pil(fill[None])[0].save(out / "images" / f"{i}_fill{side}.png")
        rows.append({"prompt": "", "chosen": f"images/{i}_fill0.png", "rejected": f"images/{i}_fill1.png",
                     "mask": f"images/{i}.mask.png"})  # fmt: skip
    (out / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    reward_cfg = load_config(
        TrainRewardConfig, packaged_config("rewards", "prefpaint_demo.yaml"),
        [f"data={out / 'pairs.jsonl'}", f"output_dir={out / 'reward'}", "epochs=2"],
    )  # fmt: skip
    train_prefpaint(reward_cfg)
    return out / "reward"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path, nargs="?", default=None, help="output folder")
    parser.add_argument("--kind", choices=["sd", "sdxl", "inpaint", "text"], default="sd", help="model kind")
    parser.add_argument("--pairs", type=int, default=64, help="number of preference pairs (rows)")
    args = parser.parse_args()
    default = {"text": "outputs/tiny_text", "inpaint": "outputs/tiny_inpaint"}.get(args.kind, "outputs/tiny")
    out = args.out or Path(default)
    if args.kind == "inpaint":
        build_tiny_pipeline(out / "pipeline", kind="inpaint")
        make_inpainting(out, args.pairs)
    elif args.kind == "text":
        build_tiny_causal_lm(out / "lm")
        synthetic_preferences(out / "pairs.jsonl", args.pairs, rewards=True)
        synthetic_preferences(out / "candidates.jsonl", args.pairs, candidates=4)
    else:
        build_tiny_pipeline(out / "pipeline", kind=args.kind)
        make_pairs(out, args.pairs)
    print(out)


if __name__ == "__main__":
    main()
