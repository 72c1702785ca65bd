"""Train a reward model on preference pairs: diffalign's ``bradley_terry`` reward, or PrefPaint's
architecture (``architecture=prefpaint``) with its trust matrix ``V^-1``.

    accelerate launch scripts/train_reward.py --config configs/rewards/bradley_terry.yaml [key=value ...]
    accelerate launch scripts/train_reward.py --config configs/rewards/prefpaint.yaml [key=value ...]
    python scripts/train_reward.py data=pairs.jsonl output_dir=outputs/bt model.backbone_path=DIR

    python scripts/train_reward.py data=pairs.jsonl output_dir=outputs/bt_ensemble \
        model.backbone_path=DIR model.ensemble_size=5 model.link=thurstone

Prints the held-out metrics as JSON and writes the model folder that
``load_reward("bradley_terry", path=output_dir)`` or ``load_reward("prefpaint",
weights=output_dir)`` reads. ``model.ensemble_size`` >= 2 trains the ensemble whose disagreement
``scripts/select_pairs.py`` uses (BAL-PM); ``model.link`` chooses the logistic (Bradley-Terry) or
Thurstone (probit) likelihood; pairs that name their annotators (``user_id`` / ``annotator``) add
a misspecification report to the metrics (``diffalign_rewards.bradley_terry.misspecification_report``).
"""

from __future__ import annotations

import argparse
import json
import sys

from diffalign.config import add_config_arguments, config_from_args
from diffalign_rewards.bradley_terry import TrainRewardConfig, train_bradley_terry
from diffalign_rewards.prefpaint_training import train_prefpaint

TRAINERS = {"bradley_terry": train_bradley_terry, "prefpaint": train_prefpaint}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_config_arguments(parser, TrainRewardConfig)
    cfg = config_from_args(TrainRewardConfig, parser.parse_args(argv), "train_reward")
    print(json.dumps(TRAINERS[cfg.architecture](cfg), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
