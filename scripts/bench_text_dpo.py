"""Tokens per second of a DPO optimiser step on a causal LM: diffalign's text_preference next to
TRL's DPOTrainer, same model, rows, batch, learning rate and precision, measured in one run.

    PYTHONPATH=<folder with trl> python scripts/bench_text_dpo.py [--smoke] [--output FILE.json]

TRL is not a dependency: install it for this measurement only (for example
``pip install --no-deps --target /tmp/trl trl`` and ``PYTHONPATH=/tmp/trl``); without it the
script measures diffalign alone and says so. TRL is measured twice: as its ``DPOConfig`` comes
(``gradient_checkpointing=True`` by default in TRL 1.16, which recomputes the forward in the
backward) and with ``gradient_checkpointing=False``, the same work as diffalign's step (whose
``model.gradient_checkpointing`` is off by default). A step is the method's forward of chosen and
rejected with a frozen reference copy, the DPO loss (beta 0.1), backward and AdamW: diffalign's
``step`` with the loop's optimiser, TRL's ``training_step`` with the trainer's. The sides run
interleaved (``bench_common.interleaved``: ``--repeats`` rounds of windows of at least
``--min-seconds`` and ``--min-steps``), on a model where compute dominates the step (by default
4 layers of width 512, every sequence 256 tokens: a 64-token prompt and 192-token completions).
Tokens are the prompt and completion tokens of both sequences, as the tokenizer counts them.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bench_common as bench
import torch

from diffalign.text.tiny import NO, TOPICS, YES, build_tiny_causal_lm


def long_rows(path: Path, rows: int, prompt_words: int, answer_words: int) -> Path:
    """Pairs whose every prompt and completion has a fixed number of words (one token each)."""
    rng = random.Random(0)
    vocab = [*TOPICS, *YES, *NO]
    lines = []
    for _ in range(rows):
        prompt, chosen, rejected = (
            " ".join(rng.choices(vocab, k=n)) for n in (prompt_words, answer_words, answer_words)
        )
        # completions open with a space: TRL joins prompt and completion as they are
        lines.append(json.dumps({"prompt": prompt, "chosen": f" {chosen}", "rejected": f" {rejected}"}))
    path.write_text("\n".join(lines) + "\n")
    return path


def diffalign_side(model: Path, data: Path, args: argparse.Namespace) -> Callable[[], None]:
    from diffalign.config import load_config
    from diffalign.methods import get_method
    from diffalign.training.config import TrainConfig
    from diffalign.training.loop import make_optimizer

    config = Path(__file__).resolve().parents[1] / "configs" / "text" / "dpo.yaml"
    cfg = load_config(TrainConfig, config, [
        f"model.pretrained={model}", f"data.path={data}", f"output_dir={data.parent / 'ours'}",
        f"batch_size={args.batch}", "report_to=[]", f"optim.lr={args.lr}",
    ])  # fmt: skip
    method = get_method(cfg.method)(cfg)
    method.setup(torch.device("cpu"), torch.float32)
    module = method.trainable_module()
    method.use_prepared(module)
    module.train()
    optimizer = make_optimizer(cfg.optim, [p for p in module.parameters() if p.requires_grad], args.lr)
    dataset, collate = method.dataset()
    batch = collate([dataset[i] for i in range(args.batch)])

    def step() -> None:
        loss, _ = method.step(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def trl_side(
    model: Path, data: Path, args: argparse.Namespace, gradient_checkpointing: bool
) -> Callable[[], None]:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(line) for line in data.read_text().splitlines()]
    config = DPOConfig(
        output_dir=str(data.parent / "trl"), per_device_train_batch_size=args.batch, learning_rate=args.lr,
        beta=0.1, max_length=1024, save_strategy="no", report_to=[], use_cpu=True, seed=0,
        gradient_checkpointing=gradient_checkpointing,
    )  # fmt: skip
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model),
        ref_model=AutoModelForCausalLM.from_pretrained(model),
        args=config,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(model),
    )
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # what Trainer's own loop sets before stepping
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()

    def step() -> None:
        trainer.training_step(trainer.model, batch)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()

    return step


def tokens_per_step(model: Path, data: Path, batch: int) -> float:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    rows = [json.loads(line) for line in data.read_text().splitlines()][:batch]
    count = lambda text: len(tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
    return float(sum(2 * count(r["prompt"]) + count(r["chosen"]) + count(r["rejected"]) for r in rows))


def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/bench_text_dpo_cpu.json"))
    parser.add_argument("--batch", type=int, default=4, help="pairs per step")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--completion-tokens", type=int, default=192)
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-seconds", type=float, default=10.0)
    parser.add_argument("--min-steps", type=int, default=50)
    parser.add_argument("--smoke", action="store_true", help="a tiny model and a few steps: the JSON only")
    args = parser.parse_args()
    if args.smoke:
        args.hidden, args.layers, args.prompt_tokens, args.completion_tokens = 32, 2, 8, 8
        args.repeats, args.min_seconds, args.min_steps = 2, 0.0, 2
    length = args.prompt_tokens + args.completion_tokens
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_tiny_causal_lm(
            root / "lm", hidden=args.hidden, layers=args.layers, max_positions=length + 8
        )
        data = long_rows(root / "pairs.jsonl", 4 * args.batch, args.prompt_tokens, args.completion_tokens)
        sides = {"diffalign": diffalign_side(model, data, args)}
        try:
            import trl
        except ImportError:
            trl = None
        else:
            sides["trl"] = trl_side(model, data, args, gradient_checkpointing=True)
            sides["trl_no_checkpointing"] = trl_side(model, data, args, gradient_checkpointing=False)
        tokens = tokens_per_step(model, data, args.batch)
        results = bench.interleaved(
            sides, dict.fromkeys(sides, tokens), "cpu", args.repeats, args.min_seconds, args.min_steps
        )
    report: dict[str, Any] = {
        "unit": "tokens per second", "model": f"Llama, {args.layers} layers, hidden {args.hidden}",
        "sequence_tokens": length, "batch_pairs": args.batch, "tokens_per_step": tokens,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "repeats": args.repeats,
        "min_seconds": args.min_seconds, "min_steps": args.min_steps, "sides": results,
    }  # fmt: skip
    if trl is None:
        report["trl"] = "not installed: diffalign measured alone"
    else:
        report["trl"] = trl.__version__
        report["diffalign_over_trl"] = bench.ratio(results, "diffalign", "trl")
        report["diffalign_over_trl_no_checkpointing"] = bench.ratio(
            results, "diffalign", "trl_no_checkpointing"
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
