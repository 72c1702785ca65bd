"""Each method, killed with SIGKILL after a random optimiser step and resumed from its last
checkpoint, ends bit-identical (CPU, fixed seed) to the run that was never killed: every tensor
of the final checkpoint (weights, optimiser moments, schedule, EMA, each rank's method state)
and of its export. Diffusion-DRO's buffer and lagged copy: ``test_dro.py``.

Run as a script, this file is the killed worker: ``python tests/test_exact_resume.py CONFIG KILL_AT``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from diffalign.config import build, to_dict
from diffalign.methods import get_method
from diffalign.training.config import TrainConfig
from diffalign.training.loop import run_training
from diffalign.training.state_files import load_state

WORKER = Path(__file__).resolve()
MAX_STEPS, CHECKPOINT_EVERY = 6, 2
# random draws in every part: caption dropout and flips, warmup (scheduler state), an EMA,
# accumulation windows, and each method's own state
COMMON = {
    "max_steps": MAX_STEPS, "checkpoint_every": CHECKPOINT_EVERY, "keep_checkpoints": 10, "log_every": 1,
    "ema_decay": 0.9, "report_to": [], "seed": 3,
    "optim": {"lr": 1e-3, "schedule": "constant_with_warmup", "warmup_steps": 2},
}  # fmt: skip


def _diffusion_dpo(root: Path, pipelines: dict[str, str]) -> dict[str, Any]:
    from script_loader import load_script

    data = load_script("make_tiny_assets").make_pairs(root / "pairs", n_pairs=8)
    return {
        "method": "diffusion_dpo", "model": {"pretrained": pipelines["sd"]}, "batch_size": 2,
        "data": {"path": str(data), "resolution": 32, "caption_dropout": 0.3, "hflip": True},
        "gradient_accumulation_steps": 2,
    }  # fmt: skip


def _smpo(root: Path, pipelines: dict[str, str]) -> dict[str, Any]:
    from test_smpo import pairs

    data = pairs(root / "pairs", [(0.9, 0.1), (0.3, 0.6), (0.5, 0.4), (0.2, 0.8)])
    return {
        "method": "smpo", "model": {"pretrained": pipelines["sd"]}, "batch_size": 2,
        "data": {"path": str(data), "resolution": 32, "caption_dropout": 0.3},
        "method_options": {"inversion_steps": 2, "renoise_steps": 1},
    }  # fmt: skip


def _ddpo(root: Path, pipelines: dict[str, str]) -> dict[str, Any]:
    from test_policy_gradient import ddpo_config, prompt_file

    cfg = ddpo_config(pipelines["sd"], prompt_file(root / "prompts"), root / "unused")
    cfg.method_options |= {"advantages": "per_prompt", "stat_min_count": 2, "sync_every": 2}
    return _spec(cfg)


def _prefpaint(root: Path, pipelines: dict[str, str]) -> dict[str, Any]:
    from test_policy_gradient import inpainting_examples, prefpaint_config

    cfg = prefpaint_config(pipelines["inpaint"], inpainting_examples(root / "examples"), root / "unused")
    return _spec(cfg)


def _spec(cfg: TrainConfig) -> dict[str, Any]:
    """What a test's config sets that this file's runs keep (they set the rest in COMMON)."""
    kept = ("method", "model", "data", "method_options", "batch_size", "gradient_accumulation_steps")
    return {k: v for k, v in to_dict(cfg).items() if k in kept}


def _text_dpo(root: Path, pipelines: dict[str, str]) -> dict[str, Any]:
    from diffalign.text.tiny import build_tiny_causal_lm, synthetic_preferences

    lm = build_tiny_causal_lm(root / "lm")
    data = synthetic_preferences(root / "pairs.jsonl", rows=12)
    return {
        "method": "text_preference", "model": {"pretrained": str(lm)}, "data": {"path": str(data)},
        "objective": {"name": "dpo"}, "batch_size": 4, "gradient_accumulation_steps": 2,
    }  # fmt: skip


METHODS: dict[str, Callable[[Path, dict[str, str]], dict[str, Any]]] = {
    "diffusion_dpo": _diffusion_dpo,
    "smpo": _smpo,
    "ddpo": _ddpo,
    "prefpaint": _prefpaint,
    "text_dpo": _text_dpo,
}


def _train(spec: dict[str, Any], out: Path, resume: bool = False, kill_at: int | None = None) -> None:
    resume_from = {"resume_from": "latest"} if resume else {}
    cfg = build(TrainConfig, {**COMMON, **spec, "output_dir": str(out), **resume_from})

    def kill(step: int, metrics: dict[str, float]) -> None:
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    run_training(get_method(cfg.method)(cfg), callbacks=[kill])


def _flat(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}.{key}").items()}
    if isinstance(value, (list, tuple)):
        return {k: v for i, item in enumerate(value) for k, v in _flat(item, f"{prefix}[{i}]").items()}
    return {prefix: value}


def _checkpoint_contents(folder: Path) -> dict[str, Any]:
    """Every tensor and number of a checkpoint, by file and key."""
    out: dict[str, Any] = {}
    for file in sorted(folder.rglob("*")):
        name = file.relative_to(folder).as_posix()
        if file.name.startswith("method_state") or file.name == "ema.safetensors":
            out |= _flat(load_state(file), name)
        elif file.suffix == ".safetensors":
            out |= _flat(load_file(file), name)
        elif file.name in ("optimizer.bin", "scheduler.bin"):
            out |= _flat(torch.load(file, weights_only=True), name)
        elif file.name == "trainer_state.json":
            out |= _flat(json.loads(file.read_text()), name)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_killed_run_resumes_bit_identical(method: str, tiny_pipelines, tmp_path: Path) -> None:
    spec = METHODS[method](tmp_path, tiny_pipelines)
    _train(spec, tmp_path / "full")
    kill_at = random.choice([s for s in range(2, MAX_STEPS) if s % CHECKPOINT_EVERY])
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    command = [
        sys.executable,
        str(WORKER),
        str(tmp_path / "spec.json"),
        str(tmp_path / "killed"),
        str(kill_at),
    ]
    killed = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    saved = sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir())
    assert saved == [f"checkpoint-{s}" for s in range(CHECKPOINT_EVERY, kill_at, CHECKPOINT_EVERY)]
    _train(spec, tmp_path / "killed", resume=True)
    final = f"checkpoints/checkpoint-{MAX_STEPS}"
    whole, resumed = (_checkpoint_contents(tmp_path / run / final) for run in ("full", "killed"))
    assert whole.keys() == resumed.keys() and any(k.startswith("optimizer.bin") for k in whole)
    for key, value in whole.items():
        same = torch.equal(value, resumed[key]) if isinstance(value, torch.Tensor) else value == resumed[key]
        assert same, (method, key, kill_at)
    first = _checkpoint_contents(tmp_path / "full" / f"checkpoints/checkpoint-{CHECKPOINT_EVERY}")
    assert any(  # the comparison has teeth: training moved the weights between checkpoints
        not torch.equal(v, first[k]) for k, v in whole.items() if k.startswith("model") and k in first
    )


if __name__ == "__main__":
    spec_file, out, kill = sys.argv[1:]
    _train(json.loads(Path(spec_file).read_text()), Path(out), kill_at=int(kill))
