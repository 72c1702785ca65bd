"""A two-process CPU run (gloo, ``accelerate launch --multi_gpu --num_processes 2``) and a
one-process run of the same global batch end with the same weights and optimiser state (1e-6):
Diffusion-DPO (noise, timesteps, caption dropout and VAE samples drawn per sample), the text method
and DDPO (rollouts, per-prompt advantages over the gathered batch, trained steps per sample).

Run as a script, this file is the worker: ``python tests/test_distributed_equivalence.py SPEC OUT``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from test_exact_resume import _checkpoint_contents, _train

WORKER = Path(__file__).resolve()
COMMON = {"max_steps": 3, "checkpoint_every": 1, "seed": 5, "optim": {"lr": 1e-3}}


def _diffusion_dpo(root: Path, pipelines: dict[str, str]) -> dict[str, Any]:
    from script_loader import load_script

    data = load_script("make_tiny_assets").make_pairs(root / "pairs", n_pairs=8)
    return {
        "method": "diffusion_dpo", "model": {"pretrained": pipelines["sd"]}, "batch_size": 4,
        "data": {"path": str(data), "resolution": 32, "caption_dropout": 0.5, "hflip": True},
    }  # fmt: skip


def _text_dpo(root: Path, pipelines: dict[str, str]) -> dict[str, Any]:
    from diffalign.text.tiny import build_tiny_causal_lm, synthetic_preferences

    lm = build_tiny_causal_lm(root / "lm")
    data = synthetic_preferences(root / "pairs.jsonl", rows=12)
    return {
        "method": "text_preference", "model": {"pretrained": str(lm)}, "data": {"path": str(data)},
        "objective": {"name": "dpo"}, "batch_size": 4,
    }  # fmt: skip


def _ddpo(root: Path, pipelines: dict[str, str]) -> dict[str, Any]:
    prompts = root / "prompts.txt"
    prompts.write_text("a red ball\na blue cube\na green cone\na white star\n")
    options = {
        "reward": "rl_rewards:BrightnessDigit", "samples_per_prompt": 2, "train_timesteps": 2,
        "rollout_steps": 4, "rollout_guidance": 2.0, "advantages": "per_prompt", "stat_min_count": 2,
        "stat_buffer_size": 4,
    }  # fmt: skip
    return {
        "float64": True, "method": "ddpo", "model": {"pretrained": pipelines["sd"]},
        "method_options": options, "data": {"path": str(prompts), "resolution": 32}, "batch_size": 2,
        "gradient_accumulation_steps": 2,
    }  # fmt: skip


METHODS = {"diffusion_dpo": _diffusion_dpo, "text_dpo": _text_dpo, "ddpo": _ddpo}


def _run(spec: dict[str, Any], out: Path) -> None:
    """``_train`` in float64 when the spec says so (parameters and activations)."""
    spec = dict(spec)
    dtype = torch.float64 if spec.pop("float64", False) else torch.float32
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        _train(spec, out)
    finally:
        torch.set_default_dtype(default)


def _two_processes(spec: dict[str, Any], out: Path, tmp_path: Path) -> None:
    half = {**spec, "batch_size": spec["batch_size"] // 2}  # per process: the same global batch
    (tmp_path / "half.json").write_text(json.dumps(half))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(WORKER), str(tmp_path / "half.json"), str(out),
    ]  # fmt: skip
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_two_processes_train_as_one_with_the_same_global_batch(
    method: str, tiny_pipelines, tmp_path: Path
) -> None:
    spec = {**COMMON, **METHODS[method](tmp_path, tiny_pipelines)}
    _run(spec, tmp_path / "one")
    _two_processes(spec, tmp_path / "two", tmp_path)
    final = f"checkpoints/checkpoint-{COMMON['max_steps']}"
    one, two = (_checkpoint_contents(tmp_path / run / final) for run in ("one", "two"))
    first = _checkpoint_contents(tmp_path / "one" / "checkpoints/checkpoint-1")
    compared = [k for k in one if k.startswith(("model", "optimizer.bin", "ema"))]
    assert any(k.startswith("optimizer.bin") for k in compared)
    assert any(not torch.equal(one[k], first[k]) for k in compared if k.startswith("model"))  # it trained
    gaps = {k: _gap(one[k], two[k]) for k in compared}
    assert max(gaps.values()) <= 1e-6, {k: g for k, g in gaps.items() if g > 1e-6}


def _gap(a: Any, b: Any) -> float:
    if isinstance(a, torch.Tensor):
        return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
    return 0.0 if a == b else float("inf")


if __name__ == "__main__":
    spec_file, out = sys.argv[1:]
    _run(json.loads(Path(spec_file).read_text()), Path(out))
