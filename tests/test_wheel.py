"""An installed wheel, outside the checkout, finds what a checkout finds: the CLI and every
method's demo config (shipped as package data)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_wheel_runs_the_demo_help_and_finds_every_demo_config(tmp_path: Path) -> None:
    pip = [sys.executable, "-m", "pip"]
    build = subprocess.run(
        [*pip, "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    (wheel,) = tmp_path.glob("diffalign-*.whl")
    target = tmp_path / "site"
    install = subprocess.run(
        [*pip, "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    run = subprocess.run(
        [sys.executable, "-m", "diffalign.cli", "demo", "--help"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert run.returncode == 0 and "--method" in run.stdout, run.stderr
    check = (
        "import diffalign, pathlib; from diffalign.config import packaged_config;"
        "names = sorted(p.stem for p in packaged_config('demo', 'diffusion_dpo.yaml').parent.glob('*.yaml'));"
        "print(diffalign.__file__); print(*[packaged_config('demo', n + '.yaml') for n in names], sep='\\n')"
    )
    run = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.split()
    assert all(line.startswith(str(target)) for line in lines), lines  # the wheel's, not the checkout's
    shipped = {Path(line).stem for line in lines[1:]}
    assert shipped == {p.stem for p in (ROOT / "configs" / "demo").glob("*.yaml")}
