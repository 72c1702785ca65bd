"""The selfcheck trains a toy policy with every objective; it must also be able to fail."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from diffalign.cli import main
from diffalign.objectives import DPO, register_objective
from diffalign.objectives.base import _REGISTRY
from diffalign.selfcheck import SelfCheckConfig, run_selfcheck, unexpected


def test_every_objective_aligns_the_toy_policy(tmp_path: Path) -> None:
    results = run_selfcheck(SelfCheckConfig(output=tmp_path / "report.json"))
    assert not unexpected(results), unexpected(results)
    # discopop at TRL's defaults descends towards the rejected answer (its docstring): it must fail
    (discopop,) = [r for r in results if r["objective"] == "discopop"]
    assert discopop["expected_reward_after"] < discopop["expected_reward_before"]
    assert len(results) >= 18
    report = json.loads((tmp_path / "report.json").read_text())
    assert {r["objective"] for r in report} == {r["objective"] for r in results}


def test_an_objective_that_prefers_the_rejected_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    @dataclass
    class AntiDPO(DPO):
        def pair_losses(self, chosen: torch.Tensor, rejected: torch.Tensor, x):  # type: ignore[override]
            return super().pair_losses(rejected, chosen, x)

    monkeypatch.setitem(_REGISTRY, "anti_dpo", AntiDPO)
    register_objective("anti_dpo")(AntiDPO)
    (result,) = run_selfcheck(SelfCheckConfig(objectives=["anti_dpo"], steps=50))
    assert not result["passed"]
    assert result["expected_reward_after"] < result["expected_reward_before"]


def test_cli_selfcheck_and_config_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["selfcheck", "objectives=[dpo, nca]", "steps=60"]) == 0
    assert "selfcheck: 2 passed, 0 failed, 0 known failures" in capsys.readouterr().out
    assert main(["selfcheck", "step=3"]) == 2
    assert "unknown key 'step'; did you mean 'steps'" in capsys.readouterr().err


def test_cli_lists_objectives(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["objectives"]) == 0
    out = capsys.readouterr().out
    assert "smoothed_dpo" in out and "gamma=10.0" in out
