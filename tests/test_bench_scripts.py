"""The benchmark scripts run and write the JSON they promise (their numbers are not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_trajectory_writes_its_report(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_trajectory.py"), "--steps", "2", "--batch", "1",
         "--repeats", "1", "--output", str(out)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert report["sampling"]["pipeline_seconds"] > 0 and report["sampling"]["trajectory_seconds"] > 0
    assert set(report["inversion"]) == {"ddim_same_steps", "renoise_k1_same_steps", "ddim_same_unet_calls"}
    assert (
        report["inversion"]["renoise_k1_same_steps"]["unet_calls"]
        == 2 * report["inversion"]["ddim_same_steps"]["unet_calls"]
    )


def test_bench_smpo_writes_its_report(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_smpo.py"), "--steps", "1", "--warmup", "0",
         "--batch", "1", "--output", str(out)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    report = json.loads(out.read_text())["seconds_per_step"]
    assert set(report) == {"diffusion_dpo", "smpo_policy_inversion", "smpo_reference_inversion_cached"}
    assert report["diffusion_dpo"]["ratio_to_diffusion_dpo"] == 1.0
    assert all(r["median"] > 0 for r in report.values())
