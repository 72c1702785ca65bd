"""Train a Bradley-Terry reward model on preference pairs (diffalign's ``bradley_terry`` reward).

    accelerate launch scripts/train_reward.py --config configs/rewards/bradley_terry.yaml [key=value ...]
    python scripts/train_reward.py data=pairs.jsonl output_dir=outputs/bt model.backbone_path=DIR

Prints the held-out metrics as JSON and writes the model folder that
``load_reward("bradley_terry", path=output_dir)`` reads.
"""

from __future__ import annotations

import argparse
import json
import sys

from diffalign.config import ConfigError, describe, load_config
from diffalign_rewards.bradley_terry import TrainRewardConfig, train_bradley_terry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (YAML or key=value):\n" + describe(TrainRewardConfig),
    )
    parser.add_argument("--config", default=None, help="YAML file with the keys below")
    parser.add_argument(
        "overrides", nargs="*", help="key=value overrides (dotted keys: model.hidden_dim=128)"
    )
    args = parser.parse_args(argv)
    try:
        cfg = load_config(TrainRewardConfig, args.config, args.overrides)
    except ConfigError as err:
        print(f"train_reward: config error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(train_bradley_terry(cfg), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
