"""The benchmark scripts run and write the JSON they promise (their numbers are not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_bench(script: str, out: Path, *args: str) -> dict:
    """Run ``scripts/<script>`` with ``args`` and ``--output out``; return the JSON it wrote."""
    command = [sys.executable, str(ROOT / "scripts" / script), *args, "--output", str(out)]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    return json.loads(out.read_text())


def test_bench_trajectory_writes_its_report(tmp_path: Path) -> None:
    args = ("--steps", "2", "--batch", "1", "--repeats", "2", "--min-seconds", "0", "--min-steps", "2")
    report = run_bench("bench_trajectory.py", tmp_path / "bench.json", *args)
    rates = report["sampling"]["images_per_second"]
    assert set(rates) == {"pipeline", "sample_with_trajectory"}
    assert all(len(r["windows"]) == 2 and r["units_per_second"]["min"] > 0 for r in rates.values())
    overhead = report["sampling"]["overhead"]
    assert overhead["min"] <= overhead["median"] <= overhead["max"]
    assert set(report["inversion"]) == {"ddim_same_steps", "renoise_k1_same_steps", "ddim_same_unet_calls"}
    assert (
        report["inversion"]["renoise_k1_same_steps"]["unet_calls"]
        == 2 * report["inversion"]["ddim_same_steps"]["unet_calls"]
    )


def test_bench_smpo_writes_its_report(tmp_path: Path) -> None:
    args = ("--steps", "2", "--warmup", "0", "--batch", "1")
    report = run_bench("bench_smpo.py", tmp_path / "bench.json", *args)["seconds_per_step"]
    assert set(report) == {"diffusion_dpo", "smpo_policy_inversion", "smpo_reference_inversion_cached"}
    assert report["diffusion_dpo"]["ratio_to_diffusion_dpo"] == 1.0
    assert all(0 < r["min"] <= r["median"] <= r["max"] for r in report.values())


def test_bench_dro_writes_its_report(tmp_path: Path) -> None:
    args = ("--steps", "2", "--warmup", "0", "--batch", "2", "--rollout-steps", "3")
    report = run_bench("bench_dro.py", tmp_path / "bench.json", *args)
    assert set(report["seconds"]) == {"dro_rollout", "dro_training", "diffusion_dpo"}
    parts = report["seconds"]["dro_rollout"]["median"] + report["seconds"]["dro_training"]["median"]
    assert report["dro_step_median"] == parts
    assert 0 < report["rollout_share_of_dro_step"] < 1
    assert report["dro_step_ratio_to_diffusion_dpo"] == parts / report["seconds"]["diffusion_dpo"]["median"]


def test_bench_dpo_smoke_writes_its_report(tmp_path: Path) -> None:
    report = run_bench("bench_dpo.py", tmp_path / "bench.json", "--smoke")
    sides = report["sides"]
    assert set(sides) == {"official_full", "diffusers_lora", "diffalign_full", "diffalign_lora"}
    for side in sides.values():
        rate = side["units_per_second"]
        assert len(side["windows"]) == report["repeats"] and rate["min"] <= rate["median"] <= rate["max"]
        assert side["flops_per_step"] > 0 and 0 < side["mfu"] < 1
    # the same work on both sides of each comparison: full fine-tuning counts the same FLOPs
    assert sides["official_full"]["flops_per_step"] == sides["diffalign_full"]["flops_per_step"]
    assert sides["diffusers_lora"]["flops_per_step"] < sides["official_full"]["flops_per_step"]
    ratio = report["full_over_official"]
    assert ratio["min"] <= ratio["median"] <= ratio["max"] and not (ratio["faster"] and ratio["slower"])
    others = report["methods_over_diffusion_dpo"]
    assert set(others["steps_per_second"]) == {"diffusion_dpo", "smpo", "dro", "ddpo"}
    assert all(others[name]["min"] > 0 for name in ("smpo", "dro", "ddpo"))


def test_bench_text_dpo_smoke_writes_its_report(tmp_path: Path) -> None:
    report = run_bench("bench_text_dpo.py", tmp_path / "bench.json", "--smoke")
    ours = report["sides"]["diffalign"]
    assert len(ours["windows"]) == 2 and ours["units_per_second"]["min"] > 0
    assert report["tokens_per_step"] == 4 * 4 * 8  # 4 pairs x (2 prompts + 2 completions) x 8 tokens
    if "trl" in report["sides"]:  # TRL present (it is not a dependency): the ratios are reported
        assert set(report["sides"]) == {"diffalign", "trl", "trl_no_checkpointing"}
        for baseline in ("trl", "trl_no_checkpointing"):
            ratio = report[f"diffalign_over_{baseline}"]
            assert ratio["min"] <= ratio["median"] <= ratio["max"]
    else:
        assert report["trl"] == "not installed: diffalign measured alone"
