"""Make the tiny pipeline and a small synthetic preference dataset that configs/*/tiny.yaml use.

    python scripts/make_tiny_assets.py [OUT_DIR] [--kind sd|sdxl] [--pairs 64]

Writes OUT_DIR/pipeline (a ~1M-parameter diffusers pipeline built from configs) and
OUT_DIR/pairs.jsonl with OUT_DIR/images/*.png (32x32 images; the chosen image of each pair is
the brighter one). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from diffalign.diffusion.tiny import build_tiny_pipeline
from diffalign.images import to_pil


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
    parser.add_argument("out", type=Path, nargs="?", default=Path("outputs/tiny"), help="output folder")
    parser.add_argument("--kind", choices=["sd", "sdxl"], default="sd", help="pipeline layout")
    parser.add_argument("--pairs", type=int, default=64, help="number of preference pairs")
    args = parser.parse_args()
    build_tiny_pipeline(args.out / "pipeline", kind=args.kind)
    make_pairs(args.out, args.pairs)
    print(args.out)


if __name__ == "__main__":
    main()
