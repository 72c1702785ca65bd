"""Tokens per second of a DPO step on the tiny causal LM: diffalign's text_preference next to TRL's
DPOTrainer, same model, data, batch, learning rate and precision, measured in one run.

    PYTHONPATH=<folder with trl> python scripts/bench_text_dpo.py [--out outputs/bench_text_dpo.json]

TRL is not a dependency: install it for this measurement only (for example
``pip install --no-deps --target /tmp/trl trl`` and ``PYTHONPATH=/tmp/trl``); without it the
script measures diffalign alone and says so. Both sides run ``--steps`` optimiser steps with a
frozen reference copy; the first ``--warmup`` steps are not timed. Tokens are the prompt and
completion tokens (no padding) of the chosen and rejected sequences, counted once per step.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from diffalign.text.tiny import build_tiny_causal_lm, synthetic_preferences


def _tokens_per_pair(model_path: Path, data: Path) -> float:
    from transformers import AutoTokenizer

    from diffalign.text.data import read_text_preferences
    from diffalign.text.logps import Tokenization, encode_candidates

    tok = AutoTokenizer.from_pretrained(model_path)
    records = read_text_preferences(data)
    total = sum(
        len(ids)
        for r in records
        for ids, _ in encode_candidates(tok, r.prompt, r.completions, Tokenization())
    )
    return total / len(records)


def bench_diffalign(model_path: Path, data: Path, out: Path, args: argparse.Namespace) -> float:
    """Seconds per timed step, from the loop's own cumulative pairs/s at the warmup and last steps."""
    from diffalign.api import train
    from diffalign.config import load_config
    from diffalign.training.config import TrainConfig

    config = Path(__file__).resolve().parents[1] / "configs" / "text" / "dpo.yaml"
    steps = args.warmup + args.steps
    cfg = load_config(TrainConfig, config, [
        f"model.pretrained={model_path}", f"data.path={data}", f"output_dir={out}", f"max_steps={steps}",
        f"batch_size={args.batch}", "log_every=1", f"checkpoint_every={steps}", "report_to=[]",
        f"optim.lr={args.lr}", "optim.max_grad_norm=1.0",
    ])  # fmt: skip
    train(cfg)
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rate = {m["step"]: m["samples_per_second"] for m in log}
    pairs = {s: s * args.batch for s in rate}
    elapsed = pairs[steps] / rate[steps] - pairs[args.warmup] / rate[args.warmup]
    return elapsed / args.steps


def bench_trl(model_path: Path, data: Path, out: Path, args: argparse.Namespace) -> float:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, *_args: object, **_kwargs: object) -> None:
            stamps.append(time.perf_counter())

    rows = [json.loads(line) for line in data.read_text().splitlines()]
    config = DPOConfig(
        output_dir=str(out), per_device_train_batch_size=args.batch, max_steps=args.warmup + args.steps,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, beta=0.1, max_length=1024,
        logging_steps=args.warmup + args.steps, save_strategy="no", report_to=[], use_cpu=True, seed=0,
        max_grad_norm=1.0, dataloader_drop_last=True,
    )  # fmt: skip
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_path),
        ref_model=AutoModelForCausalLM.from_pretrained(model_path),
        args=config,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(model_path),
        callbacks=[Stamp()],
    )
    trainer.train()
    return (stamps[-1] - stamps[args.warmup - 1]) / args.steps


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_text_dpo.json"), help="result JSON")
    parser.add_argument("--steps", type=int, default=40, help="timed optimiser steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed first steps")
    parser.add_argument("--batch", type=int, default=8, help="pairs per step")
    parser.add_argument("--hidden", type=int, default=32, help="hidden size of the tiny Llama")
    parser.add_argument("--lr", type=float, default=1e-4, help="learning rate (both sides)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_path = build_tiny_causal_lm(root / "lm", hidden=args.hidden)
        data = synthetic_preferences(root / "pairs.jsonl", rows=(args.warmup + args.steps) * args.batch)
        tokens_per_step = _tokens_per_pair(model_path, data) * args.batch
        result: dict = {
            "model": f"tiny Llama, 2 layers, hidden {args.hidden}",
            "batch_pairs": args.batch, "timed_steps": args.steps, "warmup_steps": args.warmup,
            "tokens_per_step": tokens_per_step, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "machine": platform.machine(),
        }  # fmt: skip
        ours = bench_diffalign(model_path, data, root / "ours", args)
        result["diffalign_tokens_per_second"] = tokens_per_step / ours
        try:
            import trl
        except ImportError:
            result["trl"] = "not installed: diffalign measured alone"
        else:
            theirs = bench_trl(model_path, data, root / "trl", args)
            result["trl"] = trl.__version__
            result["trl_tokens_per_second"] = tokens_per_step / theirs
            result["ratio_diffalign_over_trl"] = theirs / ours
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
