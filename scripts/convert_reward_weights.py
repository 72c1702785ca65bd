"""Convert a released pickle checkpoint of a reward model to safetensors, once.

The pickle is read with ``torch.load(weights_only=True)``: tensors and plain containers only,
never arbitrary code. Keys are renamed to diffalign's modules where they differ.

    python scripts/convert_reward_weights.py aesthetic sac+logos+ava1-l14-linearMSE.pth OUT_DIR
    python scripts/convert_reward_weights.py hpsv2 HPS_v2.1_compressed.pt OUT_DIR
    python scripts/convert_reward_weights.py prefpaint prefpaintReward.pt OUT_DIR

Writes ``aesthetic_mlp.safetensors``, ``hps.safetensors`` or ``prefpaint.safetensors`` in OUT_DIR:
pass OUT_DIR as the reward's ``head=`` / ``weights=``. PrefPaint's file keeps the checkpoint's own
CLIP ViT-B/32 beside the head (``clip.*`` and ``head.*``). Each reward also loads the released
file as it is; converting saves reading a pickle each time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from safetensors.torch import save_file

from diffalign_rewards._weights import load_state_dict
from diffalign_rewards.prefpaint import read_prefpaint_weights

OUTPUT = {
    "aesthetic": "aesthetic_mlp.safetensors",
    "hpsv2": "hps.safetensors",
    "prefpaint": "prefpaint.safetensors",
}


def convert(kind: str, source: Path, out_dir: Path) -> Path:
    """Write ``source`` (read with ``weights_only=True``) as OUT_DIR/OUTPUT[kind]; PrefPaint's
    official key layout is mapped to diffalign's (raising ``KeyError`` on an unknown key)."""
    state = read_prefpaint_weights(source) if kind == "prefpaint" else load_state_dict(source)
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
