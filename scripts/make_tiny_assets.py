"""Make the tiny models and small synthetic preference datasets that the tiny configs use.

    python scripts/make_tiny_assets.py [OUT_DIR] [--kind sd|sdxl|text] [--pairs 64]

sd / sdxl (OUT_DIR default outputs/tiny): OUT_DIR/pipeline (a ~1M-parameter diffusers pipeline
built from configs) and OUT_DIR/pairs.jsonl with OUT_DIR/images/*.png (32x32 images; the chosen
image of each pair is the brighter one).

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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path, nargs="?", default=None, help="output folder")
    parser.add_argument("--kind", choices=["sd", "sdxl", "text"], default="sd", help="model kind")
    parser.add_argument("--pairs", type=int, default=64, help="number of preference pairs (rows)")
    args = parser.parse_args()
    out = args.out or Path("outputs/tiny_text" if args.kind == "text" else "outputs/tiny")
    if args.kind == "text":
        build_tiny_causal_lm(out / "lm")
        synthetic_preferences(out / "pairs.jsonl", args.pairs, rewards=True)
        synthetic_preferences(out / "candidates.jsonl", args.pairs, candidates=4)
    else:
        build_tiny_pipeline(out / "pipeline", kind=args.kind)
        make_pairs(out, args.pairs)
    print(out)


if __name__ == "__main__":
    main()
