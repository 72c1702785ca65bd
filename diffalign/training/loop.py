"""The training loop: any :class:`Method` under accelerate. It knows no method by name.

Gradient accumulation, mixed precision, clipping, AdamW / 8-bit AdamW / Adafactor, constant,
warmup and cosine schedules, optional EMA, learning-rate scaling by world size x accumulation x
batch (as the official Diffusion-DPO scripts), checkpoints (``accelerator.save_state`` plus the
method's diffusers-format export) every N steps keeping the last K, resume from ``latest`` or a
folder, trackers (tensorboard when installed, wandb when asked), a ``metrics.jsonl`` that is
always written, a progress bar with loss and throughput, and validation sample grids.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from diffalign.config import to_dict
from diffalign.images import save_grid
from diffalign.training.config import OptimConfig, TrainConfig

__all__ = ["Method", "TrainResult", "run_training"]

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class Method(ABC):
    """A recipe: what to train, on which data, with which loss. The loop does the rest.

    ``Method.__init__`` seeds every random generator from ``cfg.seed`` (the same on every rank),
    and subclasses call it first: whatever a recipe builds before the loop (LoRA adapters, heads,
    copies, samplers) is then a function of the config alone, whatever ran before in the process.
    """

    def __init__(self, cfg: TrainConfig) -> None:
        from accelerate.utils import set_seed

        self.cfg = cfg
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
        """Loss and metrics of one micro-batch."""

    @abstractmethod
    def export(self, path: Path) -> None:
        """Write the trained weights in a format diffusers loads."""

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
    if cfg.resume_from is None:
        return None
    if cfg.resume_from == "latest":
        found = checkpoints(cfg.output_dir)
        return found[-1] if found else None
    path = Path(cfg.resume_from)
    if not (path.is_dir() and CHECKPOINT.match(path.name)):
        raise FileNotFoundError(f"resume_from: {path} is not a checkpoint-N folder")
    return path


def run_training(cfg: TrainConfig, method: Method) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

    # a second run in one process (the Python API) may ask for another precision or accumulation:
    # forget the previous run's settings, keep the process group
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    trackers = [t for t in cfg.report_to if _tracker_available(t)]
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        # data order from (seed, epoch) alone: a resumed run sees the batches the interrupted one would have
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        log_with=trackers or None,
        project_config=ProjectConfiguration(
            project_dir=str(cfg.output_dir), logging_dir=str(cfg.output_dir / "logs")
        ),
    )
    set_seed(cfg.seed, device_specific=True)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        accelerator.mixed_precision, torch.float32
    )
    method.setup(accelerator.device, weight_dtype)

    module = method.trainable_module()
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            f"the method has no trainable parameters: every parameter of its {type(module).__name__} "
            "has requires_grad=False"
        )
    scale = (
        accelerator.num_processes * cfg.gradient_accumulation_steps * cfg.batch_size
        if cfg.optim.scale_lr
        else 1
    )
    optimizer = make_optimizer(cfg.optim, params, cfg.optim.lr * scale)
    from diffusers.optimization import get_scheduler

    # accelerate steps a prepared scheduler once per process: count warmup and length likewise
    scheduler = get_scheduler(
        cfg.optim.schedule,
        optimizer,
        num_warmup_steps=cfg.optim.warmup_steps * accelerator.num_processes,
        num_training_steps=cfg.max_steps * accelerator.num_processes,
    )
    dataset, collate = method.dataset()
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=True,
        collate_fn=collate,
        num_workers=cfg.data.num_workers,
        drop_last=len(dataset) >= cfg.batch_size * accelerator.num_processes,
    )
    module, optimizer, loader, scheduler = accelerator.prepare(module, optimizer, loader, scheduler)
    method.use_prepared(module)
    ema = None
    if cfg.ema_decay is not None:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=cfg.ema_decay)
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)

    global_step = 0
    resume = _resume_path(cfg)
    if resume is not None:
        accelerator.load_state(str(resume))
        global_step = int(CHECKPOINT.match(resume.name).group(1))
        accelerator.print(f"resumed from {resume} at step {global_step}")
    if accelerator.is_main_process:
        cfg.output_dir.mkdir(parents=True, exist_ok=True)
        (cfg.output_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
        if trackers:
            accelerator.init_trackers("diffalign", config=_flat(to_dict(cfg)))

    steps_per_epoch = max(1, len(loader) // cfg.gradient_accumulation_steps)
    progress = tqdm(
        total=cfg.max_steps, initial=global_step, desc="train", disable=not accelerator.is_local_main_process
    )
    metrics_file = cfg.output_dir / "metrics.jsonl"
    window: list[dict[str, float]] = []
    last: dict[str, float] = {}
    started, pairs_seen = time.perf_counter(), 0
    epoch = global_step // steps_per_epoch
    # a resumed run continues mid-epoch where the checkpoint was taken
    skip = (global_step % steps_per_epoch) * cfg.gradient_accumulation_steps
    micro = 0
    while global_step < cfg.max_steps:
        for has_epoch in (loader, dataset):
            if hasattr(has_epoch, "set_epoch"):
                has_epoch.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        skip = 0
        for batch in batches:
            module.train()
            # the method's random draws (noise, timesteps, caption dropout) are a function of
            # (seed, step, micro-batch, rank): resuming reproduces them whatever ran before
            torch.manual_seed(_draw_seed(cfg.seed, global_step, micro, accelerator.process_index))
            micro += 1
            with accelerator.accumulate(module):
                loss, metrics = method.step(batch)
                accelerator.backward(loss)
                if (
                    accelerator.sync_gradients
                    and cfg.optim.max_grad_norm is not None
                    and cfg.optim.name != "adafactor"
                ):
                    accelerator.clip_grad_norm_(params, cfg.optim.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            window.append({**metrics, "loss": float(loss.detach())})
            pairs_seen += cfg.batch_size * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            micro = 0
            global_step += 1
            if ema is not None:
                ema.step(params)
            progress.update(1)
            if global_step % cfg.log_every == 0 or global_step == cfg.max_steps:
                last = _reduce(accelerator, window)
                last.update(lr=scheduler.get_last_lr()[0], step=global_step,
                            pairs_per_second=pairs_seen / (time.perf_counter() - started),
                            dropped_samples=float(method.dropped_samples()))  # fmt: skip
                window.clear()
                progress.set_postfix(loss=f"{last['loss']:.4g}", pairs_s=f"{last['pairs_per_second']:.2f}")
                if accelerator.is_main_process:
                    with metrics_file.open("a") as f:
                        f.write(json.dumps(last) + "\n")
                accelerator.log(last, step=global_step)
            if cfg.validation_every and cfg.validation_prompts and global_step % cfg.validation_every == 0:
                _validate(accelerator, method, cfg, global_step, ema, params)
            if global_step % cfg.checkpoint_every == 0 or global_step == cfg.max_steps:
                _checkpoint(accelerator, method, cfg, global_step, ema, params)
            if global_step >= cfg.max_steps:
                break
        epoch += 1
    progress.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(cfg.output_dir, last, global_step)


def _draw_seed(seed: int, step: int, micro: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7919 + micro * 104_729 + rank * 15_485_863) % (2**63)


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


def _checkpoint(
    accelerator: Any, method: Method, cfg: TrainConfig, step: int, ema: Any, params: list
) -> None:
    path = cfg.output_dir / "checkpoints" / f"checkpoint-{step}"
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        _with_ema(ema, params, lambda: method.export(path / "export"))
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        for old in checkpoints(cfg.output_dir)[: -cfg.keep_checkpoints]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


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
