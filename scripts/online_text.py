"""Online preference optimisation of a causal LM: rounds of sample, score, pair (filter), train.

    python scripts/online_text.py --config configs/text/vpo_online.yaml [key=value ...]
    python scripts/online_text.py --config configs/text/upo.yaml [key=value ...]

Each round samples from the current policy, scores with ``reward`` (``module:function``), pairs,
optionally keeps the pairs UPO's uncertainty filter trusts (``upo``), and trains one round of
``text_preference`` against the previous round's model (:mod:`diffalign.text.online`). Prints
one JSON summary per round.
"""

from __future__ import annotations

import argparse
import json

from diffalign.config import add_config_arguments, config_from_args
from diffalign.text.online import OnlineTextConfig, run_online


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="online_text.py", description=__doc__)
    add_config_arguments(parser, OnlineTextConfig, required=True)
    cfg = config_from_args(OnlineTextConfig, parser.parse_args(argv), "online_text.py")
    summaries = run_online(cfg)
    print(json.dumps(summaries))
    return summaries


if __name__ == "__main__":
    main()
