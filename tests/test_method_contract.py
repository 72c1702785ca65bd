"""The Method contract's hooks for online methods: method state in checkpoints (each rank its own),
the per-optimiser-step hook, and methods that make several micro-batches of a loader batch. Each
resume must end bit-identical to the uninterrupted run.

Run as a script, this file is the worker that a test kills or launches on two ranks:
``python tests/test_method_contract.py OUT MAX_STEPS [--kill-at N] [--kill-while-saving] [--resume]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from diffalign.training.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
from diffalign.training.loop import Method, Stateful, run_training
from diffalign.training.state_files import load_state, save_state

WORKER = Path(__file__).resolve()


class ReplayBuffer:
    """The newest ``capacity`` samples (N, 4)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.samples = torch.empty(0, 4)

    def push(self, x: torch.Tensor) -> None:
        self.samples = torch.cat([self.samples, x])[-self.capacity :]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"samples": self.samples.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.samples = state["samples"]


class Online(Method):
    """A fake online method: each micro-batch samples from a lagged copy of the policy (with
    noise), pushes the samples into a replay buffer and regresses the policy on the whole buffer;
    the lagged copy takes the policy's weights every 3 optimiser steps."""

    def __init__(self, cfg: TrainConfig, kill_at: int | None = None, kill_while_saving: bool = False) -> None:
        super().__init__(cfg)
        self.policy = self.train_policy = torch.nn.Linear(4, 4)
        self.lagged = copy.deepcopy(self.policy).requires_grad_(False)
        self.buffer = ReplayBuffer(capacity=6)
        self.data = TensorDataset(torch.randn(10, 4))
        self.kill_at, self.kill_while_saving = kill_at, kill_while_saving
        self.hook_steps: list[int] = []

    def trainable_module(self) -> torch.nn.Module:
        return self.policy

    def use_prepared(self, module: torch.nn.Module) -> None:
        self.train_policy = module

    def dataset(self) -> tuple[TensorDataset, None]:
        return self.data, None

    def setup(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        pass

    def step(self, batch: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        (x,) = batch
        with torch.no_grad():
            self.buffer.push(self.lagged(x) + 0.1 * torch.randn_like(x))
        replay = self.buffer.samples
        return (self.train_policy(replay) - replay.flip(1)).pow(2).mean(), {}

    def on_optimizer_step(self, step: int) -> None:
        self.hook_steps.append(step)
        if step % 3 == 0:
            self.lagged.load_state_dict(self.policy.state_dict())
        if step == self.kill_at and not self.kill_while_saving:
            os.kill(os.getpid(), signal.SIGKILL)

    def state(self) -> dict[str, Stateful]:
        return {"buffer": self.buffer, "lagged": self.lagged}

    def export(self, path: Path) -> None:
        if self.kill_while_saving and self.hook_steps[-1] == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # after accelerate's state, before the checkpoint is whole
        path.mkdir(parents=True, exist_ok=True)
        torch.save(self.policy.state_dict(), path / "policy.pt")


class Stateless(Online):
    """The same method, keeping nothing in its checkpoints."""

    def state(self) -> dict[str, Stateful]:
        return {}


class Rollouts(Online):
    """Three micro-batches per loader batch, made in a generator with its own random draws."""

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        self.batch_steps: list[int] = []  # the ``step`` each loader batch arrived with
        self.micro_windows: list[int] = []  # for each micro-batch, the optimiser steps done before it

    def micro_batches(self, batch: list[torch.Tensor], step: int) -> Iterator[list[torch.Tensor]]:
        self.batch_steps.append(step)
        (x,) = batch
        for _ in range(3):
            yield [x + torch.randn_like(x)]

    def step(self, batch: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        self.micro_windows.append(len(self.hook_steps))
        return super().step(batch)


def _cfg(out: Path, *, max_steps: int, checkpoint_every: int, **extra: object) -> TrainConfig:
    return TrainConfig(
        method="online", model=ModelConfig(pretrained="none"), data=DataConfig(path=Path("none")),
        output_dir=out, max_steps=max_steps, batch_size=2, checkpoint_every=checkpoint_every,
        log_every=1, report_to=[],
        optim=OptimConfig(lr=1e-2, scale_lr=False, weight_decay=0.0, schedule="constant", warmup_steps=0),
        **{"keep_checkpoints": 10, **extra},
    )  # fmt: skip


def _final(method: Online) -> dict[str, torch.Tensor]:
    return {
        **{f"policy.{k}": v for k, v in method.policy.state_dict().items()},
        **{f"lagged.{k}": v for k, v in method.lagged.state_dict().items()},
        "buffer": method.buffer.samples,
    }


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _losses(out: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.parametrize("where", ["after_step", "while_saving", "while_saving_keeping_one"])
def test_a_killed_online_run_resumes_bit_identical(tmp_path: Path, where: str) -> None:
    """SIGKILL at a random step (after its hook, or while its checkpoint is being written, with
    every checkpoint kept or only the last), then ``resume_from: latest``: policy, lagged copy and
    replay buffer equal the uninterrupted run's."""
    full = Online(_cfg(tmp_path / "full", max_steps=20, checkpoint_every=5))
    run_training(full)
    # checkpoint-15 holds the state after hook 15, which synced the lagged copy
    at_15 = tmp_path / "full" / "checkpoints" / "checkpoint-15"
    lagged = load_state(at_15 / "method_state_0.safetensors")["lagged"]
    _assert_identical(lagged, torch.load(at_15 / "export" / "policy.pt"))
    saving = where.startswith("while_saving")
    kill_at = random.choice([10, 15] if saving else [s for s in range(6, 20) if s % 5])
    out = tmp_path / "killed"
    command = [sys.executable, str(WORKER), str(out), "20", "--kill-at", str(kill_at)]
    command += ["--kill-while-saving"] if saving else []
    command += ["--keep", "1"] if where == "while_saving_keeping_one" else []
    killed = subprocess.run(
        command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    latest = (kill_at - 1) // 5 * 5
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    expected = [
        f"checkpoint-{s}" for s in range(5 if where != "while_saving_keeping_one" else latest, latest + 1, 5)
    ]
    assert names == sorted(expected + ([f"checkpoint-{kill_at}.partial"] if saving else []))
    resumed = Online(_cfg(out, max_steps=20, checkpoint_every=5, resume_from="latest"))
    assert run_training(resumed).global_step == 20
    assert resumed.hook_steps == list(range(latest + 1, 21)), kill_at
    _assert_identical(_final(resumed), _final(full))  # killed at kill_at
    assert all(_losses(out)[s] == loss for s, loss in _losses(tmp_path / "full").items())
    assert not torch.equal(full.lagged.weight, full.policy.weight)  # the lag is real: step 20 is no sync

    # without its state the resumed run differs (so the equality above is not vacuous), and a
    # method that keeps state refuses a checkpoint without it
    bare = tmp_path / "bare" / "checkpoints" / f"checkpoint-{latest}"
    shutil.copytree(out / "checkpoints" / f"checkpoint-{latest}", bare)
    (bare / "method_state_0.safetensors").unlink()
    stateless = Stateless(_cfg(tmp_path / "bare", max_steps=20, checkpoint_every=5, resume_from="latest"))
    run_training(stateless)
    assert not torch.equal(stateless.policy.weight, full.policy.weight)
    cfg = _cfg(tmp_path / "bare", max_steps=25, checkpoint_every=5, resume_from="latest")
    with pytest.raises(ValueError, match=r"has no method state, and the method keeps \['buffer', 'lagged'\]"):
        run_training(Online(cfg))


def test_several_micro_batches_per_loader_batch(tmp_path: Path) -> None:
    """3 micro-batches per loader batch, 2 per optimiser step: 9 steps take 18 micro-batches (6
    loader batches, one epoch being 5), windows straddle loader batches and the epoch's end, and
    checkpoints are written at the loader-batch ends that close a window; resuming is exact."""
    full = Rollouts(_cfg(tmp_path / "full", max_steps=9, checkpoint_every=1, gradient_accumulation_steps=2))
    assert run_training(full).global_step == 9
    assert full.hook_steps == list(range(1, 10))
    assert full.micro_windows == [s for s in range(9) for _ in range(2)]
    assert full.batch_steps == [0, 1, 3, 4, 6, 7]
    ckpts = tmp_path / "full" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-3", "checkpoint-6", "checkpoint-9"]
    position = json.loads((ckpts / "checkpoint-6" / "trainer_state.json").read_text())
    assert position == {"global_step": 6, "loader_batches": 4, "processes": 1, "skipped_steps": 0}

    shutil.copytree(ckpts / "checkpoint-3", tmp_path / "cut" / "checkpoints" / "checkpoint-3")
    resumed = Rollouts(
        _cfg(
            tmp_path / "cut",
            max_steps=9,
            checkpoint_every=1,
            gradient_accumulation_steps=2,
            resume_from="latest",
        )
    )
    run_training(resumed)
    assert resumed.batch_steps == [3, 4, 6, 7] and resumed.hook_steps == list(range(4, 10))
    _assert_identical(_final(resumed), _final(full))


def test_kldo_resumes_with_its_running_average(tmp_path: Path) -> None:
    """text_preference with kldo: a run resumed from checkpoint-3 ends bit-identical to the
    uninterrupted one, weights and the objective's running denominator alike."""
    from diffalign.config import load_config
    from diffalign.methods.text_preference import TextPreference
    from diffalign.text.tiny import build_tiny_causal_lm, synthetic_preferences

    lm = build_tiny_causal_lm(tmp_path / "lm")
    data = synthetic_preferences(tmp_path / "d.jsonl", rows=12)
    config = WORKER.parents[1] / "configs" / "text" / "kldo.yaml"

    def train(out: Path, *extra: str, method: type[TextPreference] = TextPreference) -> TextPreference:
        cfg = load_config(TrainConfig, config, [
            f"model.pretrained={lm}", f"data.path={data}", f"output_dir={out}", "max_steps=6",
            "batch_size=4", "checkpoint_every=3", "log_every=1", "optim.lr=1e-2", "report_to=[]", *extra,
        ])  # fmt: skip
        trained = method(cfg)
        run_training(trained)
        return trained

    full = train(tmp_path / "full")
    checkpoint = tmp_path / "full" / "checkpoints" / "checkpoint-3"
    assert int(load_state(checkpoint / "method_state_0.safetensors")["objective"]["steps"]) == 3
    shutil.copytree(checkpoint, tmp_path / "cut" / "checkpoints" / "checkpoint-3")
    resumed = train(tmp_path / "cut", "resume_from=latest")
    for a, b in zip(resumed.model.parameters(), full.model.parameters(), strict=True):
        assert torch.equal(a, b)
    _assert_identical(resumed.objective.state_dict(), full.objective.state_dict())
    assert int(full.objective.state_dict()["steps"]) == 6

    class Forgetful(TextPreference):
        def state(self) -> dict[str, Stateful]:
            return {}

    shutil.copytree(checkpoint, tmp_path / "bare" / "checkpoints" / "checkpoint-3")
    (tmp_path / "bare" / "checkpoints" / "checkpoint-3" / "method_state_0.safetensors").unlink()
    restarted = train(tmp_path / "bare", "resume_from=latest", method=Forgetful)
    assert int(restarted.objective.state_dict()["steps"]) == 3  # the average restarted at resume
    assert not all(
        torch.equal(a, b) for a, b in zip(restarted.model.parameters(), full.model.parameters(), strict=True)
    )


def test_each_rank_resumes_its_own_method_state(tmp_path: Path) -> None:
    """Two ranks (gloo on CPU): each saves its own replay buffer, and a run resumed from
    checkpoint-5 gives every rank the buffer, lagged copy and weights of the uninterrupted run."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(WORKER),
    ]  # fmt: skip
    full = subprocess.run([*launch, str(tmp_path / "full"), "10"], env=env, capture_output=True, text=True)
    assert full.returncode == 0, full.stderr[-3000:]
    checkpoint = tmp_path / "full" / "checkpoints" / "checkpoint-5"
    shutil.copytree(checkpoint, tmp_path / "cut" / "checkpoints" / "checkpoint-5")
    cut = subprocess.run(
        [*launch, str(tmp_path / "cut"), "10", "--resume"], env=env, capture_output=True, text=True
    )
    assert cut.returncode == 0, cut.stderr[-3000:]
    finals = [torch.load(tmp_path / "full" / f"final-{rank}.pt") for rank in (0, 1)]
    for rank in (0, 1):
        _assert_identical(torch.load(tmp_path / "cut" / f"final-{rank}.pt"), finals[rank])
    # the ranks' buffers differ (one saved state for all would lose one), their weights do not
    assert not torch.equal(finals[0]["buffer"], finals[1]["buffer"])
    assert torch.equal(finals[0]["policy.weight"], finals[1]["policy.weight"])


class WarmingUp(Online):
    """Pushes one noisy copy of each loader batch into its buffer and yields nothing until the
    buffer holds 6 samples (3 loader batches): a replay buffer warming up."""

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        self.pushed: list[torch.Tensor] = []

    def micro_batches(self, batch: list[torch.Tensor], step: int) -> Iterator[list[torch.Tensor]]:
        noise = torch.randn_like(batch[0])
        self.pushed.append(noise)
        self.buffer.push(batch[0] + noise)
        if len(self.buffer.samples) >= 6:
            yield batch


class Never(Online):
    def micro_batches(self, batch: list[torch.Tensor], step: int) -> Iterator[list[torch.Tensor]]:
        yield from ()


def test_loader_batches_that_yield_nothing_draw_their_own_noise(tmp_path: Path) -> None:
    method = WarmingUp(_cfg(tmp_path / "warm", max_steps=2, checkpoint_every=2))
    assert run_training(method).global_step == 2
    assert len(method.pushed) == 4  # 3 warm-up batches, then one that trains
    for i, a in enumerate(method.pushed):
        assert not any(torch.equal(a, b) for b in method.pushed[i + 1 :]), i
    with pytest.raises(
        ValueError, match=r"Never.micro_batches made nothing to train on from a whole epoch of 5"
    ):
        run_training(Never(_cfg(tmp_path / "never", max_steps=2, checkpoint_every=2)))


def test_an_output_dir_in_use_is_refused_and_a_resume_relogs_its_steps(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_training(Online(_cfg(out, max_steps=6, checkpoint_every=3)))
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    # a fresh run would rotate the earlier run's checkpoints away and mix the metrics
    with pytest.raises(
        ValueError, match=r"holds an earlier run \(checkpoint-3, checkpoint-6\): set resume_from"
    ):
        run_training(Online(_cfg(out, max_steps=2, checkpoint_every=1)))
    assert (
        sorted(p.name for p in (out / "checkpoints").iterdir()) == before == ["checkpoint-3", "checkpoint-6"]
    )
    # back from checkpoint-3 (killed after step 6 was logged, say): steps 4-6 are logged once each
    shutil.rmtree(out / "checkpoints" / "checkpoint-6")
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 7, "loss": 1.0}\n{"step": 8, "lo')  # a line cut short by a kill
    run_training(Online(_cfg(out, max_steps=6, checkpoint_every=3, resume_from="latest")))
    assert [m["step"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [
        1,
        2,
        3,
        4,
        5,
        6,
    ]
    # metrics without a checkpoint: refused afresh; with resume_from=latest, trained again from 0
    shutil.rmtree(out / "checkpoints")
    with pytest.raises(ValueError, match=r"holds an earlier run \(metrics.jsonl\)"):
        run_training(Online(_cfg(out, max_steps=2, checkpoint_every=2)))
    run_training(Online(_cfg(out, max_steps=2, checkpoint_every=2, resume_from="latest")))
    assert [m["step"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [1, 2]


class EveryThird(Online):
    """Trains on every third loader batch only (a buffer that fills slowly)."""

    def micro_batches(self, batch: list[torch.Tensor], step: int) -> Iterator[list[torch.Tensor]]:
        self.seen = getattr(self, "seen", 0) + 1
        if self.seen % 3 == 0:
            yield batch

    def state(self) -> dict[str, Stateful]:
        return {}


def test_resuming_mid_epoch_a_method_that_skips_batches(tmp_path: Path) -> None:
    """5 loader batches an epoch, a micro-batch from every third: resumed at step 1 (loader batch 3
    of the first epoch), the epoch's tail of 2 batches yields nothing, and that is no error."""
    run_training(EveryThird(_cfg(tmp_path / "run", max_steps=1, checkpoint_every=1)))
    resumed = EveryThird(_cfg(tmp_path / "run", max_steps=3, checkpoint_every=1, resume_from="latest"))
    assert run_training(resumed).global_step == 3


def test_an_older_checkpoint_is_not_resumed_beside_newer_ones(tmp_path: Path) -> None:
    from diffalign.config import ConfigError

    out = tmp_path / "run"
    run_training(Online(_cfg(out, max_steps=6, checkpoint_every=3)))
    older = out / "checkpoints" / "checkpoint-3"
    with pytest.raises(ConfigError, match=r"resume_from: .*checkpoint-3 is older than checkpoint-6"):
        Online(_cfg(out, max_steps=6, checkpoint_every=1, resume_from=str(older)))
    with pytest.raises(ConfigError, match=r"resume_from: .*nowhere is not a checkpoint-N folder"):
        Online(_cfg(out, max_steps=6, checkpoint_every=1, resume_from=str(tmp_path / "nowhere")))
    # a checkpoint of another number of processes is refused when training resumes
    state = out / "checkpoints" / "checkpoint-6" / "trainer_state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "processes": 2}))
    with pytest.raises(ValueError, match=r"written by 2 processes, this run has 1"):
        run_training(Online(_cfg(out, max_steps=9, checkpoint_every=3, resume_from="latest")))


@pytest.mark.parametrize(
    "name",
    ["method_state_0.safetensors", "ema.safetensors", "model.safetensors", "optimizer.bin", "scheduler.bin",
     "random_states_0.pkl", "trainer_state.json"],
)  # fmt: skip
def test_a_broken_checkpoint_file_is_named(tmp_path: Path, name: str) -> None:
    out = tmp_path / "run"
    run_training(Online(_cfg(out, max_steps=3, checkpoint_every=3, ema_decay=0.9)))
    file = out / "checkpoints" / "checkpoint-3" / name
    resume = _cfg(out, max_steps=6, checkpoint_every=3, resume_from="latest", ema_decay=0.9)
    for content in (b"not a checkpoint file", file.read_bytes()[: file.stat().st_size // 2]):
        file.write_bytes(content)
        with pytest.raises(ValueError, match=rf"{file}: (broken|not a readable checkpoint state)"):
            run_training(Online(resume))


def test_checkpoints_that_do_not_fit_the_run_say_why(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_training(Online(_cfg(out, max_steps=3, checkpoint_every=3)))
    state = out / "checkpoints" / "checkpoint-3" / "method_state_0.safetensors"
    save_state({"buffer": {"samples": torch.zeros(1, 4)}}, state)
    with pytest.raises(
        ValueError, match=rf"{state} holds method state \['buffer'\], the method keeps \['buffer', 'lagged'\]"
    ):
        run_training(Online(_cfg(out, max_steps=6, checkpoint_every=3, resume_from="latest")))
    empty = out / "checkpoints" / "checkpoint-9"
    empty.mkdir()
    with pytest.raises(
        FileNotFoundError, match=rf"{empty} is not a complete checkpoint: it has no trainer_state.json"
    ):
        run_training(Online(_cfg(out, max_steps=12, checkpoint_every=3, resume_from="latest")))


class Poisoned(Online):
    """Online, whose loss (or only its gradient) is not finite in the window of the ``at``-th
    optimiser step this process takes (in the last micro-batch of the window), once."""

    def __init__(self, cfg: TrainConfig, at: int, where: str) -> None:
        super().__init__(cfg)
        self.at, self.where, self.micro, self.poisoned = at, where, 0, False

    def step(self, batch: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        loss, metrics = super().step(batch)
        self.micro += 1
        last = self.micro % self.cfg.gradient_accumulation_steps == 0
        if self.poisoned or len(self.hook_steps) + 1 != self.at or not last:
            return loss, metrics
        self.poisoned = True  # once: a skipped window is not retried
        if self.where == "loss":
            return loss * math.nan, {"reward": -1.0}
        w = self.train_policy.weight
        return loss + (w - w.detach()).abs().sqrt().sum(), {"reward": -1.0}  # finite, its gradient is not


@pytest.mark.parametrize(("where", "accumulation"), [("loss", 1), ("loss", 2), ("gradient", 1)])
def test_a_non_finite_step_stops_the_run_and_leaves_the_checkpoints(
    tmp_path: Path, where: str, accumulation: int
) -> None:
    from diffalign.training.loop import NonFiniteError

    out = tmp_path / "run"
    run_training(Online(_cfg(out, max_steps=4, checkpoint_every=2, gradient_accumulation_steps=accumulation)))
    before = {
        p.name: p.read_bytes() for p in (out / "checkpoints" / "checkpoint-4").rglob("*") if p.is_file()
    }
    cfg = _cfg(
        out, max_steps=8, checkpoint_every=2, gradient_accumulation_steps=accumulation, resume_from="latest"
    )
    method = Poisoned(cfg, at=1, where=where)  # step 5
    norm = "nan" if where == "gradient" else "not computed"
    with pytest.raises(NonFiniteError, match=(
        rf"optimiser step 5: .*gradient norm {norm}; .*'reward': \[.*-1.0\].*weights are those after step "
        rf"4, and the last good checkpoint is {out / 'checkpoints' / 'checkpoint-4'}"
    )):  # fmt: skip
        run_training(method)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-2", "checkpoint-4"]
    after = {p.name: p.read_bytes() for p in (out / "checkpoints" / "checkpoint-4").rglob("*") if p.is_file()}
    assert after == before != {}
    saved = torch.load(out / "checkpoints" / "checkpoint-4" / "export" / "policy.pt")
    _assert_identical({"weight": method.policy.weight.detach(), "bias": method.policy.bias.detach()}, saved)


def test_non_finite_steps_are_skipped_and_counted_by_option(tmp_path: Path) -> None:
    """on_nonfinite=skip: step 5's window is dropped (no update, no hook), the run still takes 8
    steps, and the count survives a resume."""
    cfg = _cfg(tmp_path / "run", max_steps=8, checkpoint_every=2, on_nonfinite="skip")
    method = Poisoned(cfg, at=5, where="loss")
    run_training(method)
    assert method.hook_steps == list(range(1, 9))
    assert all(torch.isfinite(p).all() for p in method.policy.parameters())
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["skipped_steps"] for m in logged] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert all(math.isfinite(m["loss"]) for m in logged)
    resumed = Poisoned(_cfg(tmp_path / "run", max_steps=9, checkpoint_every=2, on_nonfinite="skip",
                            resume_from="latest"), at=0, where="loss")  # fmt: skip
    run_training(resumed)
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["skipped_steps"] == 1


@pytest.mark.parametrize(("decay", "with_ema"), [(None, False), (0.0, False), (0.5, True)])
def test_ema_decay_zero_means_no_ema(tmp_path: Path, decay: float | None, with_ema: bool) -> None:
    """An EMA is kept (and checkpointed as accelerate's custom state) only for a decay above 0."""
    method = Online(_cfg(tmp_path / "out", max_steps=2, checkpoint_every=2, ema_decay=decay))
    run_training(method)
    saved = sorted(p.name for p in (tmp_path / "out" / "checkpoints" / "checkpoint-2").iterdir())
    assert ("ema.safetensors" in saved) == with_ema, saved


def test_options_a_method_does_not_take_are_refused(tmp_path: Path) -> None:
    from diffalign.config import ConfigError

    with pytest.raises(ConfigError, match=r"method_options: method online takes none, got \['buffer'\]"):
        Online(_cfg(tmp_path / "out", max_steps=2, checkpoint_every=2, method_options={"buffer": 3}))


def _worker(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("max_steps", type=int)
    parser.add_argument("--kill-at", type=int)
    parser.add_argument("--kill-while-saving", action="store_true")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--keep", type=int, default=10)
    args = parser.parse_args(argv)
    cfg = _cfg(
        args.out, max_steps=args.max_steps, checkpoint_every=5, resume_from="latest" if args.resume else None,
        keep_checkpoints=args.keep,
    )  # fmt: skip
    method = Online(cfg, args.kill_at, args.kill_while_saving)
    run_training(method)
    from accelerate import PartialState

    torch.save(_final(method), args.out / f"final-{PartialState().process_index}.pt")


if __name__ == "__main__":
    _worker(sys.argv[1:])
