"""RSO's data step: sample from a policy, score with a reward, rejection-sample preference pairs.

    python scripts/rso_data.py --model outputs/tiny_text/lm --prompts prompts.jsonl \
        --reward diffalign.text.tiny:yes_fraction --out rso_pairs.jsonl [--num-candidates 64 ...]

``--prompts`` is a JSONL with a ``prompt`` column (or any dataset ``diffalign.data.rows`` reads);
``--reward`` a ``module:function`` taking (prompts, completions) and returning one score each.
The output JSONL trains with ``configs/text/rso.yaml`` (set data.path to it).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from diffalign.data.rows import read_rows
from diffalign.text.rso import rso_pairs
from diffalign.text.sampling import load_text_reward


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", required=True, help="causal LM folder (or hub id when online), or a peft adapter folder"
    )
    parser.add_argument("--prompts", required=True, help="JSONL / parquet / dataset with a 'prompt' column")
    parser.add_argument("--reward", required=True, help="module:function scoring (prompts, completions)")
    parser.add_argument("--out", type=Path, required=True, help="output JSONL")
    parser.add_argument("--num-candidates", type=int, default=64, help="samples per prompt (paper: 64)")
    parser.add_argument("--num-accepted", type=int, default=8, help="accepted per prompt (paper: 8)")
    parser.add_argument("--beta", type=float, default=0.5, help="rejection-sampling temperature (paper: 0.5)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="completion length limit")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    parser.add_argument("--seed", type=int, default=0, help="seed of sampling and acceptance")
    args = parser.parse_args(argv)

    from diffalign.text.loading import load_causal_lm

    prompts = []
    for where, row in read_rows(args.prompts, columns=("prompt",), what="prompts"):
        if not str(row["prompt"]).strip():
            raise ValueError(f"{where}: empty prompt")
        prompts.append(row["prompt"])
    model, tokenizer = load_causal_lm(args.model)  # an SFT adapter folder is merged into its base
    model.eval()
    rows = rso_pairs(
        model, tokenizer, prompts, load_text_reward(args.reward), args.num_candidates, args.num_accepted,
        args.beta, args.max_new_tokens, args.temperature, args.seed,
    )  # fmt: skip
    if not rows:
        raise SystemExit("no pairs: every prompt's accepted samples tied or were empty")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    tmp.replace(args.out)
    print(f"{len(rows)} pairs from {len(prompts)} prompts: {args.out}")
    return args.out


if __name__ == "__main__":
    main()
