"""The training loop: any :class:`Method` under accelerate. It knows no method by name.

Gradient accumulation, mixed precision, clipping, AdamW / 8-bit AdamW / Adafactor, constant,
warmup and cosine schedules, optional EMA, learning-rate scaling by world size x accumulation x
batch (as the official Diffusion-DPO scripts), checkpoints (``accelerator.save_state`` plus the
method's diffusers-format export) every N steps keeping the last K, resume from ``latest`` or a
folder, trackers (tensorboard when installed, wandb when asked), a ``metrics.jsonl`` that is
always written, a progress bar with loss and throughput, and validation sample grids.

The loop owns the data (a shuffled loader, epochs, skipping on resume); a method shapes what it
trains on through three hooks, each a no-op by default, so that online methods (rollouts, replay
buffers, lagged copies, stat trackers) need no loop of their own:

- ``micro_batches(batch, step)`` turns one loader batch into the micro-batches ``step`` sees (a
  rollout, then inner epochs over its chunks). **Each micro-batch is one accumulation
  micro-step**: the optimiser steps after every ``gradient_accumulation_steps`` micro-batches,
  counted across loader batches and epochs, so that every optimiser step averages the same number
  of micro-batches. The default (the loader batch itself) is accumulation over loader batches, as
  before; a rollout method sets ``gradient_accumulation_steps`` to divide its micro-batch count
  when it wants its optimiser steps not to straddle two rollouts.
- ``on_optimizer_step(step)`` runs after optimiser step ``step`` and its EMA update, before
  logging, validation and the checkpoint: checkpoint-N holds the state after hook N.
- ``state()`` names what a checkpoint keeps beside weights, optimiser and EMA; every rank saves
  and loads its own (a replay buffer, or KLDO's running average, differs by rank; accelerate's
  ``register_for_checkpointing`` keeps the main process's only).

A loader batch that is a dict reaches ``micro_batches`` with ``sample_seeds``: one seed per row
of a full batch (a short last batch uses the first ones), a function of the run's seed and the
row's place in the global data stream alone (:mod:`diffalign.rng`). A method that draws each row's
randomness from its own stream (Diffusion-DPO, the RL core) trains the same on one process as on
two with the same global batch.

Resuming is exact because every random draw is a function of the row's stream, or of (seed,
loader batch, micro-batch, rank), whatever ran before (the loader batch counts over all epochs,
so two rollouts never share their draws, even when one of them yields nothing), and because
checkpoints are taken only where training can restart: at the end of a loader batch, with no
accumulation window open (after every step, for one micro-batch per loader batch). A checkpoint
that falls due elsewhere is written at the next such point, under the step reached then. The last
one is written at ``max_steps`` wherever it falls; a run resumed from it with a larger
``max_steps`` goes on from the next loader batch.

A run without ``resume_from`` refuses an ``output_dir`` that holds an earlier run (checkpoints or
``metrics.jsonl``): it would rotate that run's checkpoints away and mix the two runs' metrics. A
resumed run drops the metrics logged after its checkpoint, since it trains those steps again.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from diffalign.config import ConfigError, build, to_dict
from diffalign.images import save_grid
from diffalign.rng import child_seeds, generators, stream_seeds
from diffalign.training.config import OptimConfig, TrainConfig, with_method_defaults
from diffalign.training.state_files import load_state, save_state

__all__ = [
    "Callback",
    "Method",
    "NonFiniteError",
    "Stateful",
    "TrainResult",
    "row_generators",
    "run_training",
]

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
Callback = Callable[[int, dict[str, float]], None]
"""Called on the main process with (step, metrics) each time metrics are logged."""
_END = object()  # what next() returns when a method's micro-batches run out


class NonFiniteError(FloatingPointError):
    """A non-finite loss or gradient norm stopped training (``on_nonfinite: error``)."""


class Stateful(Protocol):
    """Anything a checkpoint can keep: a module, a buffer, a tracker, a stateful objective."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


class Method(ABC):
    """A recipe: what to train, on which data, with which loss. The loop does the rest.

    ``Method.__init__`` fills the config's unset method-dependent keys from :attr:`defaults`
    into ``self.cfg`` (a copy: the caller's config is left as it was; a key the method does not
    use is refused), and seeds every random generator from ``cfg.seed`` (the same on every rank).
    Subclasses call it first and read ``self.cfg``: whatever a recipe builds before the loop (LoRA
    adapters, heads, copies, samplers) is then a function of the config alone, whatever ran before
    in the process.
    """

    defaults: ClassVar[Mapping[str, Any]] = {}
    """The method's values of the keys the shared config leaves unset, as nested config keys
    (``{"objective": {...}, "optim": {"lr": ...}}``); see :func:`with_method_defaults`."""

    options_class: ClassVar[type | None] = None
    """The dataclass of the method's ``method_options`` (None: it takes none)."""

    def __init__(self, cfg: TrainConfig) -> None:
        from accelerate.utils import set_seed

        self.cfg = with_method_defaults(cfg, cfg.method, self.defaults)
        if self.options_class is not None:
            self.options = build(self.options_class, self.cfg.method_options, source="method_options")
            self.cfg.method_options = to_dict(self.options)  # config.json then says what trained
        elif self.cfg.method_options:
            raise ConfigError(
                f"method_options: method {cfg.method} takes none, got {sorted(cfg.method_options)}"
            )
        _resume_path(self.cfg)  # an output_dir or resume_from that cannot work fails before any model loads
        set_seed(cfg.seed)

    @abstractmethod
    def trainable_module(self) -> torch.nn.Module:
        """The module whose parameters train (wrapped by DDP/FSDP through ``accelerator.prepare``)."""

    @abstractmethod
    def use_prepared(self, module: torch.nn.Module) -> None:
        """Receive the prepared (possibly wrapped) module to run forwards through."""

    @abstractmethod
    def dataset(self) -> tuple[Dataset, Any]:
        """The training dataset and its collate function."""

    @abstractmethod
    def setup(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        """Move frozen parts to the device (in ``weight_dtype`` under mixed precision)."""

    @abstractmethod
    def step(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss and metrics of one micro-batch (one of :meth:`micro_batches`)."""

    @abstractmethod
    def export(self, path: Path) -> None:
        """Write the trained weights in a format diffusers loads."""

    def micro_batches(self, batch: Any, step: int) -> Iterable[Any]:
        """The micro-batches :meth:`step` trains on, made from one loader batch; ``step`` is the
        number of optimiser steps done when the loader batch arrives.

        Each one is an accumulation micro-step (see the module docstring). A dict ``batch`` has
        ``sample_seeds`` (see the module docstring), and the loop seeds torch from (seed, loader
        batch, micro-batch, rank) before asking for each, so a generator's rollout is
        reproducible on resume; it must yield as many on every rank, and at least one
        in every epoch (it may yield none for a loader batch: a replay buffer warming up).
        Default: the batch itself.
        """
        yield batch

    def on_optimizer_step(self, step: int) -> None:  # noqa: B027 (a no-op unless overridden)
        """Called on every rank after optimiser step ``step`` (1 for the first) and its EMA update,
        before logging, validation and checkpointing: sync a lagged copy, refresh a buffer."""

    def state(self) -> dict[str, Stateful]:
        """What a checkpoint keeps of the method, by name (buffers, lagged copies, trackers,
        stateful objectives). Asked at every save and load, so the objects may be replaced
        between them. Each rank saves and restores its own; ``load_state_dict`` gets its tensors on
        the CPU. Default: nothing."""
        return {}

    def sample_grid(self, prompts: list[str], seed: int, steps: int) -> torch.Tensor | None:
        """Validation images (N, 3, H, W) in [0, 1] for fixed prompts and seed, or None."""
        return None

    def dropped_samples(self) -> int:
        """Bad rows skipped so far (for logging)."""
        return 0


@dataclass
class TrainResult:
    output_dir: Path
    metrics: dict[str, float]
    global_step: int


def make_optimizer(cfg: OptimConfig, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if cfg.name == "adamw":
        fused = all(p.is_cuda for p in params)
        return torch.optim.AdamW(
            params, lr=lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, fused=fused or None
        )
    if cfg.name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise RuntimeError("optim.name adamw8bit needs bitsandbytes: pip install bitsandbytes") from err
        return bnb.optim.AdamW8bit(params, lr=lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    from transformers.optimization import Adafactor

    # as the official SDXL Diffusion-DPO script: a fixed lr, no relative step or parameter scaling
    return Adafactor(
        params,
        lr=lr,
        weight_decay=cfg.weight_decay,
        clip_threshold=1.0,
        scale_parameter=False,
        relative_step=False,
    )


def checkpoints(output_dir: Path) -> list[Path]:
    folder = output_dir / "checkpoints"
    found = [p for p in folder.iterdir() if CHECKPOINT.match(p.name)] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(CHECKPOINT.match(p.name).group(1)))


def _resume_path(cfg: TrainConfig) -> Path | None:
    """The checkpoint ``resume_from`` names (None: start afresh).

    Raises:
        ConfigError: ``resume_from`` is not a checkpoint folder; a fresh run's ``output_dir``
            holds an earlier run (checkpoints or ``metrics.jsonl``: this run would rotate that
            run's checkpoints away and mix the metrics); or checkpoints newer than the one named
            lie in ``output_dir`` (rotation would keep them and delete this run's).
    """
    if cfg.resume_from is None:
        _refuse_used_output_dir(cfg.output_dir)
        return None
    found = checkpoints(cfg.output_dir)
    if cfg.resume_from == "latest":
        return found[-1] if found else None
    path = Path(cfg.resume_from)
    if not (path.is_dir() and CHECKPOINT.match(path.name)):
        raise ConfigError(f"resume_from: {path} is not a checkpoint-N folder")
    step = int(CHECKPOINT.match(path.name).group(1))
    newer = [p.name for p in found if int(CHECKPOINT.match(p.name).group(1)) > step]
    if newer:
        raise ConfigError(
            f"resume_from: {path} is older than {', '.join(newer)} in {cfg.output_dir / 'checkpoints'}: "
            "the resumed run would rotate its own checkpoints away and keep those; move them elsewhere first"
        )
    return path


@dataclass
class _Run:
    """What the phases of one training run share: the prepared objects and where training is."""

    cfg: TrainConfig
    method: Method
    accelerator: Any
    module: torch.nn.Module
    params: list[torch.nn.Parameter]
    optimizer: Any
    scheduler: Any
    loader: Any
    dataset: Dataset
    ema: Any
    step: int = 0  # optimiser steps done
    loader_batches: int = 0  # loader batches begun, over all epochs
    saved_step: int = 0  # the step of the last checkpoint written or resumed from
    micro: int = 0  # micro-batches in the open accumulation window
    epoch_micro_batches: int = 0  # micro-batches the method made in this epoch
    window: list[dict[str, float]] = field(default_factory=list)  # metrics since the last log
    last: dict[str, float] = field(default_factory=dict)
    samples: int = 0  # loader rows seen by all ranks in this process
    started: float = field(default_factory=time.perf_counter)
    progress: Any = None
    callbacks: Sequence[Callback] = ()
    skipped_steps: int = 0  # optimiser steps skipped for a non-finite loss or gradient (on_nonfinite)


def run_training(method: Method, callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Train ``method`` for ``method.cfg.max_steps`` optimiser steps (from a checkpoint when
    ``cfg.resume_from`` names one) and return the last logged metrics. ``callbacks``: functions of
    (step, metrics) called on the main process at every log (progress reports, early plots).

    Raises ValueError when the method has nothing to train or its data is empty, and when a
    checkpoint's method state does not fit the method or the number of processes.
    """
    cfg = method.cfg
    accelerator, trackers = _accelerator(cfg)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        accelerator.mixed_precision, torch.float32
    )
    method.setup(accelerator.device, weight_dtype)
    module = method.trainable_module()
    params = _trainable(module)
    optimizer, scheduler = _optimizer_and_scheduler(cfg, params, accelerator.num_processes)
    dataset, collate = method.dataset()
    loader = _loader(cfg, dataset, collate, accelerator.num_processes)
    module, optimizer, loader, scheduler = accelerator.prepare(module, optimizer, loader, scheduler)
    method.use_prepared(module)
    ema = None
    if cfg.ema_decay:  # unset or 0: no EMA
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=cfg.ema_decay)
        ema.to(accelerator.device)
    _register_checkpoint_state(accelerator, method, ema)
    run = _Run(cfg, method, accelerator, module, params, optimizer, scheduler, loader, dataset, ema)
    run.callbacks = callbacks
    _resume(run)
    if accelerator.is_main_process:
        cfg.output_dir.mkdir(parents=True, exist_ok=True)
        (cfg.output_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
        if trackers:
            accelerator.init_trackers("diffalign", config=_flat(to_dict(cfg)))
    run.progress = tqdm(
        total=cfg.max_steps, initial=run.step, desc="train", disable=not accelerator.is_local_main_process
    )
    _train(run)
    run.progress.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(cfg.output_dir, run.last, run.step)


def _accelerator(cfg: TrainConfig) -> tuple[Any, list[str]]:
    """A fresh Accelerator for this run, and the trackers it logs to."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import (
        DataLoaderConfiguration,
        GradientAccumulationPlugin,
        ProjectConfiguration,
        set_seed,
    )

    # a second run in one process (the Python API) may ask for another precision or accumulation:
    # forget the previous run's settings, keep the process group
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    trackers = [t for t in cfg.report_to if _tracker_available(t)]
    accelerator = Accelerator(
        # windows of exactly N micro-batches, across epochs: accelerate's default closes one at
        # each epoch's end, which a method yielding several micro-batches per batch would split
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=cfg.gradient_accumulation_steps, sync_with_dataloader=False
        ),
        mixed_precision=cfg.mixed_precision,
        # data order from (seed, epoch) alone: a resumed run sees the batches the interrupted one
        # would have, and every rank shards one permutation (without data_seed, each rank's
        # sampler took its seed from torch's, which set_seed makes rank-specific below)
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
        log_with=trackers or None,
        project_config=ProjectConfiguration(
            project_dir=str(cfg.output_dir), logging_dir=str(cfg.output_dir / "logs")
        ),
    )
    set_seed(cfg.seed, device_specific=True)
    return accelerator, trackers


def _trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            f"the method has no trainable parameters: every parameter of its {type(module).__name__} "
            "has requires_grad=False"
        )
    return params


def _optimizer_and_scheduler(
    cfg: TrainConfig, params: list[torch.nn.Parameter], world: int
) -> tuple[torch.optim.Optimizer, Any]:
    from diffusers.optimization import get_scheduler

    scale = world * cfg.gradient_accumulation_steps * cfg.batch_size if cfg.optim.scale_lr else 1
    optimizer = make_optimizer(cfg.optim, params, cfg.optim.lr * scale)
    # accelerate steps a prepared scheduler once per process: count warmup and length likewise
    scheduler = get_scheduler(
        cfg.optim.schedule,
        optimizer,
        num_warmup_steps=cfg.optim.warmup_steps * world,
        num_training_steps=cfg.max_steps * world,
    )
    return optimizer, scheduler


def _loader(cfg: TrainConfig, dataset: Dataset, collate: Any, world: int) -> DataLoader:
    if len(dataset) == 0:
        raise ValueError("the method's dataset is empty: there is nothing to train on")
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=True,
        collate_fn=collate,
        num_workers=cfg.data.num_workers,
        drop_last=len(dataset) >= cfg.batch_size * world,
    )


def _register_checkpoint_state(accelerator: Any, method: Method, ema: Any) -> None:
    """Make ``accelerate``'s ``save_state`` / ``load_state`` write and read, as safetensors
    (:mod:`~diffalign.training.state_files`), ``method_state_<rank>`` on every rank (accelerate's
    own custom objects are saved by the main process only, and as pickles) and the EMA."""
    rank, world = accelerator.process_index, accelerator.num_processes

    def save(models: Any, weights: Any, folder: str) -> None:
        states = method.state()
        if states:
            save_state(
                {name: states[name].state_dict() for name in sorted(states)}, _method_file(folder, rank)
            )
        if ema is not None and accelerator.is_main_process:  # the EMA of synced weights: equal on every rank
            save_state(ema.state_dict(), Path(folder) / "ema.safetensors")

    def load(models: Any, folder: str) -> None:
        if ema is not None:
            ema.load_state_dict(load_state(Path(folder) / "ema.safetensors"))
            ema.to(accelerator.device)
        states, found = method.state(), sorted(Path(folder).glob("method_state_*"))
        if not states and not found:
            return
        if not found:
            raise ValueError(
                f"{folder} has no method state, and the method keeps {sorted(states)}: it was written "
                "by a run that did not save them, and resuming would restart them"
            )
        if len(found) != world:
            raise ValueError(
                f"{folder} holds the method state of {len(found)} processes, this run has {world}: "
                "each rank's state is its own, resume with as many processes"
            )
        file = _method_file(folder, rank)
        saved = load_state(file)
        if saved.keys() != states.keys():
            raise ValueError(f"{file} holds method state {sorted(saved)}, the method keeps {sorted(states)}")
        for name in sorted(states):
            states[name].load_state_dict(saved[name])

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def _method_file(folder: str | Path, rank: int) -> Path:
    return Path(folder) / f"method_state_{rank}.safetensors"


def _resume(run: _Run) -> None:
    """Load the checkpoint ``resume_from`` names, if any, and drop the metrics logged after it."""
    from accelerate.utils import load

    cfg, accelerator = run.cfg, run.accelerator
    path = _resume_path(cfg)
    if path is not None:
        state_file = path / "trainer_state.json"
        if not state_file.is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint: it has no trainer_state.json")
        try:
            # accelerate skips a random-states file it cannot read with a log line: read it first
            load(path / f"random_states_{accelerator.process_index}.pkl")
            accelerator.load_state(str(path))
            saved = json.loads(state_file.read_text())
        except Exception as err:  # accelerate, torch and json each raise their own types
            broken = _broken_file(path)
            if broken is None:
                raise
            raise ValueError(f"{broken[0]}: broken, the checkpoint cannot be resumed ({broken[1]})") from err
        if saved.get("processes", accelerator.num_processes) != accelerator.num_processes:
            raise ValueError(
                f"{path} was written by {saved['processes']} processes, this run has "
                f"{accelerator.num_processes}: its data order and learning rate need as many"
            )
        run.step = run.saved_step = saved["global_step"]
        run.skipped_steps = saved.get("skipped_steps", 0)
        window = path / f"log_window_{accelerator.process_index}.json"
        run.window = json.loads(window.read_text()) if window.is_file() else []  # older checkpoints: none
        # checkpoints from before micro_batches: one loader batch per micro-batch
        run.loader_batches = saved.get("loader_batches", run.step * cfg.gradient_accumulation_steps)
        accelerator.print(f"resumed from {path} at step {run.step}")
        if run.step >= cfg.max_steps:
            accelerator.print(
                f"nothing to train: the checkpoint is at step {run.step}, max_steps={cfg.max_steps}"
            )
    if accelerator.is_main_process:  # the steps after the checkpoint are trained (and logged) again
        _drop_metrics_after(cfg.output_dir / "metrics.jsonl", run.step)


def _broken_file(checkpoint: Path) -> tuple[Path, str] | None:
    """The first file of ``checkpoint`` that does not read as its kind, and why (None: all read)."""
    from accelerate.utils import load
    from safetensors import safe_open

    for file in sorted(p for p in checkpoint.iterdir() if p.is_file()):
        try:
            if file.suffix == ".safetensors":
                with safe_open(str(file), framework="pt") as f:
                    for key in f.keys():  # noqa: SIM118 (not a dict)
                        f.get_tensor(key)
            elif file.suffix in (".bin", ".pkl"):  # accelerate's own, read with weights_only=True
                load(file, map_location="cpu")
            elif file.suffix == ".json":
                json.loads(file.read_text())
        except Exception as err:  # each reader raises its own types
            return file, f"{type(err).__name__}: {err}"
    return None


def _refuse_used_output_dir(output_dir: Path) -> None:
    """A fresh run would mix its metrics with an earlier run's, and rotate that run's checkpoints
    out of existence (or its own, when they are older)."""
    metrics = output_dir / "metrics.jsonl"
    earlier = [p.name for p in checkpoints(output_dir)] or ([metrics.name] if metrics.is_file() else [])
    if earlier:
        raise ConfigError(
            f"output_dir: {output_dir} holds an earlier run ({', '.join(earlier)}): set resume_from=latest "
            "to go on from it, or choose another output_dir"
        )


def _drop_metrics_after(metrics: Path, step: int) -> None:
    if not metrics.is_file():
        return
    kept = []
    for line in metrics.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):  # a line cut short by a kill
            continue
    partial = metrics.with_name(f"{metrics.name}.partial")
    partial.write_text("".join(f"{line}\n" for line in kept))
    partial.replace(metrics)


def _train(run: _Run) -> None:
    """Epochs of loader batches until ``max_steps``, from where a resume left off."""
    cfg, accelerator = run.cfg, run.accelerator
    while run.step < cfg.max_steps:
        epoch, skip = divmod(run.loader_batches, len(run.loader))
        for has_epoch in (run.loader, run.dataset):
            if hasattr(has_epoch, "set_epoch"):
                has_epoch.set_epoch(epoch)
        run.epoch_micro_batches = 0
        for batch in accelerator.skip_first_batches(run.loader, skip) if skip else run.loader:
            run.loader_batches += 1
            run.samples += cfg.batch_size * accelerator.num_processes
            _train_on(run, batch)
            every = cfg.checkpoint_every
            due = run.step // every > run.saved_step // every or run.step == cfg.max_steps
            # only here, with no window open, can a resumed run redo exactly what follows
            if due and run.step > run.saved_step and run.micro == 0:
                _checkpoint(run)
            if run.step >= cfg.max_steps:
                return
        if run.epoch_micro_batches == 0 and skip == 0:  # a whole epoch seen, not its resumed tail
            raise ValueError(
                f"{type(run.method).__name__}.micro_batches made nothing to train on from a whole epoch "
                f"of {len(run.loader) - skip} loader batches: training would never end"
            )


def _train_on(run: _Run, batch: Any) -> None:
    """Every micro-batch the method makes of one loader batch, until ``max_steps``."""
    cfg, accelerator = run.cfg, run.accelerator
    if isinstance(batch, dict):  # the rows' own random streams, by their place in the global stream
        world, rank = accelerator.num_processes, accelerator.process_index
        first = ((run.loader_batches - 1) * world + rank) * cfg.batch_size
        batch = {**batch, "sample_seeds": stream_seeds(cfg.seed, first, cfg.batch_size)}
    micro_batches = iter(run.method.micro_batches(batch, run.step))
    for index in itertools.count():
        if run.step >= cfg.max_steps:
            return
        # draws not made from the rows' streams are a function of (seed, loader batch, micro-batch,
        # rank): resuming reproduces them whatever ran before
        torch.manual_seed(_draw_seed(cfg.seed, run.loader_batches, index, accelerator.process_index))
        micro_batch = next(micro_batches, _END)
        if micro_batch is _END:
            return
        run.micro += 1
        run.epoch_micro_batches += 1
        run.module.train()
        with accelerator.accumulate(run.module):
            loss, metrics = run.method.step(micro_batch)
            accelerator.backward(loss)
            run.window.append({**metrics, "loss": float(loss.detach())})
            stepped = not accelerator.sync_gradients or _finite_or_skipped(run)
            if stepped:
                run.optimizer.step()
                run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
        if accelerator.sync_gradients and stepped:
            _after_optimizer_step(run)


def _finite_or_skipped(run: _Run) -> bool:
    """Clip the gradients of the window about to step, and tell whether the optimiser may step.

    A non-finite loss in the window (on any rank) or gradient norm raises
    :class:`NonFiniteError` before the step touches the weights (``on_nonfinite: error``), or
    drops the window and counts it (``skip``: False is returned). Under fp16 a non-finite gradient
    norm with finite losses is an overflow, which the loss scaler skips itself.
    """
    cfg, accelerator = run.cfg, run.accelerator
    window = run.window[-run.micro :]
    local = float(not all(math.isfinite(m["loss"]) for m in window))
    norm = None
    # a bad loss is caught before clipping: under fp16, unscaling would leave the scaler expecting a step
    if accelerator.reduce(torch.tensor(local, device=accelerator.device), "sum").item() == 0:
        clip = cfg.optim.max_grad_norm if cfg.optim.name != "adafactor" else None
        norm = accelerator.clip_grad_norm_(run.params, math.inf if clip is None else clip)
        if norm is None or accelerator.mixed_precision == "fp16" or math.isfinite(float(norm)):
            return True
    if cfg.on_nonfinite == "error":
        raise NonFiniteError(_nonfinite_message(run, window, norm))
    run.skipped_steps += 1
    del run.window[-run.micro :]
    run.micro = 0
    return False


def _nonfinite_message(run: _Run, window: list[dict[str, float]], norm: Any) -> str:
    saved = checkpoints(run.cfg.output_dir)
    last = f"the last good checkpoint is {saved[-1]}" if saved else "no checkpoint was written yet"
    metrics = {k: [m.get(k) for m in window] for k in sorted({k for m in window for k in m})}
    norm = "not computed" if norm is None else float(norm)
    return (
        f"optimiser step {run.step + 1}: the loss or the gradient norm is not finite (gradient norm "
        f"{norm}; metrics of its micro-batches on this rank: {metrics}). Stopped before the step: "
        f"the weights are those after step {run.step}, and {last}. on_nonfinite=skip skips such steps."
    )


def _after_optimizer_step(run: _Run) -> None:
    """EMA, the method's hook, then logging and validation when due."""
    cfg = run.cfg
    run.micro = 0
    run.step += 1
    if run.ema is not None:
        run.ema.step(run.params)
    run.method.on_optimizer_step(run.step)
    run.progress.update(1)
    if run.step % cfg.log_every == 0 or run.step == cfg.max_steps:
        _log(run)
    if cfg.validation_every and cfg.validation_prompts and run.step % cfg.validation_every == 0:
        _validate(run.accelerator, run.method, cfg, run.step, run.ema, run.params)


def _log(run: _Run) -> None:
    accelerator = run.accelerator
    run.last = _reduce(accelerator, run.window)
    run.last.update(lr=run.scheduler.get_last_lr()[0], step=run.step,
                    samples_per_second=run.samples / (time.perf_counter() - run.started),
                    dropped_samples=float(run.method.dropped_samples()),
                    skipped_steps=float(run.skipped_steps))  # fmt: skip
    run.window.clear()
    run.progress.set_postfix(
        loss=f"{run.last['loss']:.4g}", samples_s=f"{run.last['samples_per_second']:.2f}"
    )
    if accelerator.is_main_process:
        with (run.cfg.output_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(run.last) + "\n")
        for callback in run.callbacks:
            callback(run.step, dict(run.last))
    accelerator.log(run.last, step=run.step)


def row_generators(batch: Any, n: int, per_row: int = 1) -> list[torch.Generator] | None:
    """Generators of a loader batch's ``n`` rows, ``per_row`` each (row-major), from the
    ``sample_seeds`` the loop gave it; None for a batch without them (a method called directly),
    whose draws then come from torch's global generator."""
    seeds = batch.get("sample_seeds") if isinstance(batch, dict) else None
    if seeds is None:
        return None
    seeds = seeds[:n]
    return generators(seeds if per_row == 1 else child_seeds(seeds, per_row))


def _draw_seed(seed: int, loader_batch: int, micro: int, rank: int) -> int:
    return (seed * 1_000_003 + loader_batch * 7919 + micro * 104_729 + rank * 15_485_863) % (2**63)


def _tracker_available(name: str) -> bool:
    import importlib.util

    module = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(name, name)
    return importlib.util.find_spec(module) is not None or (
        name == "tensorboard" and importlib.util.find_spec("tensorboardX") is not None
    )


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def _reduce(accelerator: Any, window: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over the window and over processes."""
    keys = sorted({k for m in window for k in m})
    local = torch.tensor(
        [[m.get(k, math.nan) for k in keys] for m in window], device=accelerator.device
    ).nanmean(0)
    return dict(zip(keys, accelerator.reduce(local, reduction="mean").tolist(), strict=True))


def _with_ema(ema: Any, params: list[torch.nn.Parameter], fn: Any) -> None:
    if ema is None:
        fn()
        return
    ema.store(params)
    ema.copy_to(params)
    try:
        fn()
    finally:
        ema.restore(params)


def _checkpoint(run: _Run) -> None:
    """checkpoint-N: accelerate's state (with every rank's method state and metrics since the last
    log), the export and where the loop is. Written as checkpoint-N.partial and renamed when
    complete, and only then are the checkpoints beyond ``keep_checkpoints`` deleted: a run killed
    while saving resumes from the checkpoint before, and the newest complete one is never deleted."""
    accelerator, cfg = run.accelerator, run.cfg
    path = cfg.output_dir / "checkpoints" / f"checkpoint-{run.step}"
    partial = path.with_name(f"{path.name}.partial")
    if accelerator.is_main_process:  # left by runs killed while saving or deleting
        for stale in [*path.parent.glob("checkpoint-*.partial"), *path.parent.glob("checkpoint-*.trash")]:
            shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    # the metrics since the last log, each rank's own: the resumed run's next log averages the same
    window = partial / f"log_window_{accelerator.process_index}.json"
    window.write_text(json.dumps(run.window))
    if accelerator.is_main_process:
        _with_ema(run.ema, run.params, lambda: run.method.export(partial / "export"))
        world = accelerator.num_processes
        position = {"global_step": run.step, "loader_batches": run.loader_batches, "processes": world,
                    "skipped_steps": run.skipped_steps}  # fmt: skip
        (partial / "trainer_state.json").write_text(json.dumps(position))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if path.exists():  # a run started afresh in the same folder
            _delete_checkpoint(path)
        partial.rename(path)
        for old in checkpoints(cfg.output_dir)[: -cfg.keep_checkpoints]:
            _delete_checkpoint(old)
    accelerator.wait_for_everyone()
    run.saved_step = run.step


def _delete_checkpoint(path: Path) -> None:
    """Renamed out of the checkpoints first: a kill while deleting leaves no half checkpoint-N."""
    trash = path.with_name(f"{path.name}.trash")
    path.rename(trash)
    shutil.rmtree(trash)


def _validate(accelerator: Any, method: Method, cfg: TrainConfig, step: int, ema: Any, params: list) -> None:
    if not accelerator.is_main_process:
        return
    folder = cfg.output_dir / "samples"
    folder.mkdir(parents=True, exist_ok=True)

    def run() -> None:
        images = method.sample_grid(cfg.validation_prompts, cfg.seed, cfg.validation_steps)
        if images is not None:
            cols = math.ceil(math.sqrt(len(images)))
            rows = list(images.split(cols))
            if len(rows) > 1 and len(rows[-1]) < cols:  # pad the last row with black tiles
                rows[-1] = torch.cat([rows[-1], images.new_zeros(cols - len(rows[-1]), *images.shape[1:])])
            save_grid(rows, folder / f"step-{step:06d}.png")

    _with_ema(ema, params, run)
