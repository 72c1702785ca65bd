"""Convert a released pickle checkpoint of a reward model to safetensors, once.

The pickle is read with ``torch.load(weights_only=True)``: tensors and plain containers only,
never arbitrary code. Keys are renamed to diffalign's modules where they differ.

    python scripts/convert_reward_weights.py aesthetic sac+logos+ava1-l14-linearMSE.pth OUT_DIR
    python scripts/convert_reward_weights.py hpsv2 HPS_v2.1_compressed.pt OUT_DIR
    python scripts/convert_reward_weights.py prefpaint prefpaint_reward.pt OUT_DIR

Writes ``aesthetic_mlp.safetensors``, ``hps.safetensors`` or ``prefpaint_head.safetensors`` in
OUT_DIR: pass OUT_DIR as the reward's ``head=`` / ``weights=``. For PrefPaint only the head is
converted; its CLIP ViT-B/32 loads from a transformers folder (``clip=``).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from diffalign_rewards._weights import load_state_dict

OUTPUT = {
    "aesthetic": "aesthetic_mlp.safetensors",
    "hpsv2": "hps.safetensors",
    "prefpaint": "prefpaint_head.safetensors",
}


def prefpaint_head(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official ``InpaintReward`` keys (``mlp.layers.N``, ``mlp.last_layer``,
    ``vit_block.transformer_encoder.layers.0.*``) to ``PrefPaintHead``'s."""
    out = {}
    for key, value in state.items():
        if key.startswith("clip_model."):
            continue
        new = re.sub(r"^vit_block\.transformer_encoder\.layers\.0\.", "block.", key)
        new = re.sub(r"^mlp\.layers\.", "mlp.", new)
        new = re.sub(r"^mlp\.last_layer\.", "last_layer.", new)
        if new == key and not key.startswith(("block.", "mlp.", "last_layer.")):
            raise KeyError(f"unexpected key in a PrefPaint checkpoint: {key}")
        out[new] = value
    return out


def convert(kind: str, source: Path, out_dir: Path) -> Path:
    state = load_state_dict(source)  # weights_only=True for pickles
    if kind == "prefpaint":
        state = prefpaint_head(state)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / OUTPUT[kind]
    save_file({k: v.contiguous() for k, v in state.items()}, str(target))
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("kind", choices=sorted(OUTPUT), help="which reward the checkpoint belongs to")
    parser.add_argument("source", type=Path, help="the released .pt/.pth/.bin checkpoint")
    parser.add_argument("out_dir", type=Path, help="folder to write the safetensors file into")
    args = parser.parse_args(argv)
    print(convert(args.kind, args.source, args.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
