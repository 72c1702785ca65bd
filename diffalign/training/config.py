"""The training configuration shared by every method (one YAML file per method and model).

Method-specific settings live in ``method_options`` and are checked by the method's own
options dataclass; the objective is ``objective: {name: ..., **hyper-parameters}``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = ["DataConfig", "LoraSettings", "ModelConfig", "OptimConfig", "TrainConfig"]


@dataclass
class LoraSettings:
    rank: int = field(default=4, metadata={"help": "LoRA rank"})
    alpha: float | None = field(default=None, metadata={"help": "LoRA alpha (default: the rank)"})
    target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "modules to adapt (default: the method's; the UNet's attention projections for "
            "diffusion, every linear layer ([all-linear]) for text)"
        },
    )


@dataclass
class ModelConfig:
    pretrained: str = field(metadata={"help": "diffusers pipeline folder (or hub id when online)"})
    adapter: str | None = field(
        default=None,
        metadata={
            "help": "a LoRA adapter merged into the pretrained weights before training (e.g. an SFT "
            "adapter), the starting point of policy and reference: a peft folder (text; "
            "model.pretrained may also name it directly) or a save_lora_weights folder (diffusion)"
        },
    )
    lora: LoraSettings | None = field(
        default=None, metadata={"help": "train LoRA adapters instead of all the weights"}
    )
    reference: Literal["auto", "copy", "adapters", "precomputed"] = field(
        default="auto",
        metadata={
            "help": "reference model: frozen copy, adapters disabled (auto: by LoRA), or log-probs "
            "precomputed once before training (text methods)"
        },
    )
    gradient_checkpointing: bool = field(default=False, metadata={"help": "trade compute for UNet memory"})
    attention: Literal["sdpa", "xformers", "classic"] = field(
        default="sdpa", metadata={"help": "attention backend"}
    )


@dataclass
class DataConfig:
    path: Path = field(
        metadata={
            "help": "preference pairs: Pick-a-Pic .parquet, .jsonl + images, a save_to_disk folder or hub id"
        }
    )
    split: str = field(default="train", metadata={"help": "split of a datasets folder or hub dataset"})
    resolution: int = field(default=512, metadata={"help": "training image size (short side, then cropped)"})
    random_crop: bool = field(default=False, metadata={"help": "random instead of center crop"})
    hflip: bool = field(default=True, metadata={"help": "random horizontal flip (same for both images)"})
    caption_dropout: float = field(
        default=0.2, metadata={"help": "probability of training on the empty prompt"}
    )
    ties: Literal["drop", "half"] = field(
        default="drop", metadata={"help": "drop tied pairs (official) or keep"}
    )
    on_bad_sample: Literal["error", "skip"] = field(
        default="error",
        metadata={"help": "a corrupt/missing image stops training, or is skipped and counted"},
    )
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes"})


@dataclass
class OptimConfig:
    name: Literal["adamw", "adamw8bit", "adafactor"] = field(default="adamw", metadata={"help": "optimiser"})
    lr: float = field(default=1e-8, metadata={"help": "learning rate (per sample when scale_lr)"})
    scale_lr: bool = field(
        default=True,
        metadata={"help": "multiply lr by world size x accumulation x batch, as the official scripts"},
    )
    weight_decay: float = field(default=1e-2, metadata={"help": "weight decay"})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "Adam betas"})
    eps: float = field(default=1e-8, metadata={"help": "Adam epsilon"})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "gradient clipping (none: off)"})
    schedule: Literal["constant", "constant_with_warmup", "cosine"] = field(
        default="constant_with_warmup", metadata={"help": "learning-rate schedule"}
    )
    warmup_steps: int = field(default=500, metadata={"help": "warmup optimiser steps"})


@dataclass
class TrainConfig:
    method: str = field(metadata={"help": "recipe name (diffalign.methods: diffusion_dpo, ...)"})
    model: ModelConfig = field(metadata={"help": "model section"})
    data: DataConfig = field(metadata={"help": "data section"})
    output_dir: Path = field(default=Path("outputs/run"), metadata={"help": "checkpoints, exports, logs"})
    objective: dict[str, Any] = field(
        default_factory=lambda: {"name": "dpo", "beta": 5000.0},
        metadata={"help": "objective name and hparams"},
    )
    method_options: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "the method's own options"}
    )
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"help": "optimiser section"})
    max_steps: int = field(default=2000, metadata={"help": "optimiser steps"})
    batch_size: int = field(default=1, metadata={"help": "rows (pairs, prompts) per device per loader batch"})
    gradient_accumulation_steps: int = field(
        default=1,
        metadata={
            "help": "micro-batches per optimiser step (a loader batch is one, unless the method "
            "makes several of it)"
        },
    )
    mixed_precision: Literal["no", "fp16", "bf16"] = field(
        default="no", metadata={"help": "autocast precision"}
    )
    seed: int = field(default=0, metadata={"help": "seed (noise, timesteps, data order)"})
    ema_decay: float | None = field(default=None, metadata={"help": "EMA of trained weights (none: off)"})
    checkpoint_every: int = field(
        default=500,
        metadata={
            "help": "save state + export every N steps (at the end of the loader batch that reaches them)"
        },
    )
    keep_checkpoints: int = field(default=3, metadata={"help": "how many checkpoints to keep"})
    resume_from: str | None = field(default=None, metadata={"help": "'latest' or a checkpoint folder"})
    log_every: int = field(default=10, metadata={"help": "log metrics every N steps"})
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"], metadata={"help": "trackers"})
    validation_every: int = field(default=0, metadata={"help": "sample a grid every N steps (0: never)"})
    validation_prompts: list[str] = field(
        default_factory=list, metadata={"help": "prompts of the sample grid"}
    )
    validation_steps: int = field(default=25, metadata={"help": "sampler steps for validation images"})

    def __post_init__(self) -> None:
        for name in (
            "max_steps",
            "batch_size",
            "gradient_accumulation_steps",
            "checkpoint_every",
            "keep_checkpoints",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if "name" not in self.objective:
            raise ValueError("objective needs a 'name' (e.g. {name: dpo, beta: 5000})")
