"""PLaD's data step: pseudo-preference pairs, teacher's sample over student's, for distillation.

    python scripts/plad_pairs.py --teacher path/to/teacher --student path/to/student \
        --prompts prompts.jsonl --out plad_pairs.jsonl [--score module:function --margin 0.1]

``--teacher`` and ``--student`` are local causal-LM folders (or peft adapter folders);
``--prompts`` a JSONL with a ``prompt`` column (or any dataset ``diffalign.data.rows`` reads);
``--score`` an optional ``module:function`` taking (prompts, completions) and returning one score
each, which filters the pairs by ``--margin`` (:func:`diffalign.text.plad.plad_pairs`). The output
JSONL trains the student with ``configs/text/plad.yaml`` (set data.path to it and
model.pretrained to the student).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diffalign.text.online import read_prompts, write_rows
from diffalign.text.plad import plad_pairs
from diffalign.text.sampling import load_text_reward


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--teacher", required=True, help="teacher causal LM folder (or peft adapter folder)")
    parser.add_argument("--student", required=True, help="student causal LM folder (the model PLaD trains)")
    parser.add_argument("--prompts", required=True, help="JSONL / parquet / dataset with a 'prompt' column")
    parser.add_argument("--out", type=Path, required=True, help="output JSONL")
    parser.add_argument("--score", default=None, help="module:function scoring (prompts, completions)")
    parser.add_argument("--margin", type=float, default=0.0, help="keep pairs with score gap >= this")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="completion length limit")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    parser.add_argument("--seed", type=int, default=0, help="seed of both models' sampling")
    args = parser.parse_args(argv)

    from diffalign.text.loading import load_causal_lm

    prompts = read_prompts(args.prompts)
    teacher, student = load_causal_lm(args.teacher), load_causal_lm(args.student)
    for model, _ in (teacher, student):
        model.eval()
    score = load_text_reward(args.score) if args.score else None
    rows = plad_pairs(
        teacher, student, prompts, args.max_new_tokens, args.temperature, args.seed, score, args.margin
    )
    if not rows:
        raise SystemExit("no pairs: every prompt's samples were empty, equal or under the margin")
    write_rows(rows, args.out)
    print(f"{len(rows)} pairs from {len(prompts)} prompts: {args.out}")
    return args.out


if __name__ == "__main__":
    main()
