"""Run under `accelerate launch`: train the tiny config, then each rank records its weights.

ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 tests/ddp_worker.py PIPELINE PAIRS OUT
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
from accelerate import PartialState

from diffalign.config import load_config
from diffalign.methods import get_method
from diffalign.training.config import TrainConfig
from diffalign.training.loop import run_training


def main() -> None:
    pipeline, pairs, out = sys.argv[1:4]
    cfg = load_config(TrainConfig, None, [
        "method=diffusion_dpo", f"model.pretrained={pipeline}", f"data.path={pairs}", "data.resolution=32",
        f"output_dir={out}", "max_steps=3", "batch_size=2", "checkpoint_every=3", "log_every=1",
        "optim.lr=1e-4", "optim.warmup_steps=0", "optim.schedule=constant", "report_to=[]",
    ])  # fmt: skip
    method = get_method(cfg.method)(cfg)
    initial = torch.cat([p.detach().flatten() for p in method.policy.unet.parameters()]).clone()
    result = run_training(method)
    state = PartialState()
    weights = torch.cat([p.detach().flatten() for p in method.policy.unet.parameters()])
    record = {
        "rank": state.process_index,
        "world": state.num_processes,
        "sha256": hashlib.sha256(weights.numpy().tobytes()).hexdigest(),
        "moved": float((weights - initial).abs().max()),
        "step": result.global_step,
    }
    Path(out, f"rank-{state.process_index}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
