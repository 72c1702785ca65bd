"""Convert a released pickle checkpoint of a reward model to safetensors, once.

The pickle is read with ``torch.load(weights_only=True)``: tensors and plain containers only,
never arbitrary code. Keys are renamed to diffalign's modules where they differ.

    python scripts/convert_reward_weights.py aesthetic sac+logos+ava1-l14-linearMSE.pth OUT_DIR
    python scripts/convert_reward_weights.py hpsv2 HPS_v2.1_compressed.pt OUT_DIR
    python scripts/convert_reward_weights.py prefpaint prefpaintReward.pt OUT_DIR

Writes ``aesthetic_mlp.safetensors``, ``hps.safetensors`` or ``prefpaint.safetensors`` in OUT_DIR:
pass OUT_DIR as the reward's ``head=`` / ``weights=``. PrefPaint's file keeps the checkpoint's own
CLIP ViT-B/32 beside the head (``clip.*`` and ``head.*``). The output is written only after it
loaded strictly into its reward (``--model-name``, ``--heads``, ``--ff-dim`` for other sizes).
Each reward also loads the released file as it is; converting saves reading a pickle each time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from safetensors.torch import save_file

from diffalign_rewards._weights import WeightsError, load_into, load_state_dict
from diffalign_rewards.clip_rewards import AestheticMLP, OpenClipTowers
from diffalign_rewards.prefpaint import PrefPaintReward, read_prefpaint_weights

OUTPUT = {
    "aesthetic": "aesthetic_mlp.safetensors",
    "hpsv2": "hps.safetensors",
    "prefpaint": "prefpaint.safetensors",
}


def check_fits(kind: str, source: Path, state: dict, options: dict) -> None:
    """Load the weights strictly into the reward they are for, naming ``source`` when they do not fit."""
    if kind == "aesthetic":
        first = state.get("layers.0.weight")
        if first is None:
            raise WeightsError(f"{source}: no layers.0.weight; not an aesthetic predictor head")
        load_into(AestheticMLP(first.shape[1]), state, source, "aesthetic head")
    elif kind == "hpsv2":
        OpenClipTowers(options.get("model_name", "ViT-H-14"), source, "HPSv2 weights")
    else:
        PrefPaintReward(weights=source, **options)


def convert(kind: str, source: Path, out_dir: Path, **options: object) -> Path:
    """Write ``source`` (read with ``weights_only=True``) as OUT_DIR/OUTPUT[kind], once it loaded
    strictly into its reward (``options``: ``model_name`` for hpsv2 and prefpaint, ``heads`` and
    ``ff_dim`` for prefpaint). PrefPaint's official key layout is mapped to diffalign's. Nothing
    is written when a check fails; the file appears whole or not at all.

    Raises:
        WeightsError: naming ``source``: unreadable, unknown keys, or weights that do not fit.
    """
    state = read_prefpaint_weights(source) if kind == "prefpaint" else load_state_dict(source)
    check_fits(kind, source, state, options)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / OUTPUT[kind]
    partial = target.with_name(f".{target.name}.partial")
    save_file({k: v.contiguous() for k, v in state.items()}, str(partial))
    partial.replace(target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("kind", choices=sorted(OUTPUT), help="which reward the checkpoint belongs to")
    parser.add_argument("source", type=Path, help="the released .pt/.pth/.bin checkpoint")
    parser.add_argument("out_dir", type=Path, help="folder to write the safetensors file into")
    parser.add_argument(
        "--model-name", help="open_clip architecture (hpsv2: ViT-H-14; prefpaint: ViT-B-32-quickgelu)"
    )
    parser.add_argument("--heads", type=int, help="prefpaint: attention heads of its encoder layer (16)")
    parser.add_argument(
        "--ff-dim", type=int, help="prefpaint: feed-forward width of its encoder layer (1024)"
    )
    parser.add_argument(
        "--open-clip-config", type=Path, help="a folder or .json of open_clip model configs, for --model-name"
    )
    args = parser.parse_args(argv)
    if args.open_clip_config is not None:
        import open_clip

        open_clip.add_model_config(args.open_clip_config)
    if not args.source.is_file():
        parser.error(f"source: no such file: {args.source}")
    options = {"model_name": args.model_name, "heads": args.heads, "ff_dim": args.ff_dim}
    try:
        target = convert(args.kind, args.source, args.out_dir, **{k: v for k, v in options.items() if v})
    except (OSError, ValueError, TypeError) as err:  # WeightsError is a ValueError
        parser.error(str(err))
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
