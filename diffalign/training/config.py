"""The training configuration shared by every method (one YAML file per method and model).

Method-specific settings live in ``method_options`` and are checked by the method's own
options dataclass; the objective is ``objective: {name: ..., **hyper-parameters}``.

Keys whose right value depends on the method (the objective and its beta, the learning rate and
its scaling, warmup, weight decay, LoRA targets, the image-only data keys) default to unset here;
:func:`with_method_defaults` fills them from the method's ``defaults`` (``Method.__init__`` calls
it), and refuses one that is set when the method does not use it.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from diffalign.config import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, UNIT, Range, check_ranges

__all__ = [
    "DataConfig",
    "LoraSettings",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "with_method_defaults",
]

_BY_METHOD = "method_default"  # metadata key: who reads the key, see `_by_method`


def _by_method(help: str, read_by: Literal["loop", "optional", "method"] = "method") -> dict[str, str]:
    """The metadata of a field left unset (None) in the shared config and filled from the
    method's defaults. ``read_by``: "loop" (the loop reads it: it must end set), "optional" (the
    loop reads it and unset is valid: the feature stays off) or "method" (only methods with a
    default for it read it: setting it for another method is an error)."""
    return {"help": f"{help} (unset: the method's; see `diffalign methods`)", _BY_METHOD: read_by}


@dataclass
class LoraSettings:
    rank: int = field(default=4, metadata={"help": "LoRA rank"})
    alpha: float | None = field(default=None, metadata={"help": "LoRA alpha (default: the rank)"})
    target_modules: list[str] | None = field(
        default=None, metadata=_by_method("modules to adapt ([all-linear]: every linear layer)")
    )

    ranges: ClassVar[dict[str, Range]] = {"rank": AT_LEAST_ONE, "alpha": POSITIVE}

    def __post_init__(self) -> None:
        check_ranges(self)


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
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "text models: let transformers run the Python code a model folder or hub ships"},
    )
    gradient_checkpointing: bool = field(default=False, metadata={"help": "trade compute for UNet memory"})
    attention: Literal["sdpa", "xformers", "classic"] = field(
        default="sdpa", metadata={"help": "attention backend"}
    )
    channels_last: bool = field(
        default=False, metadata={"help": "UNets in channels-last memory format (convolutions on GPUs)"}
    )
    compile: bool = field(
        default=False, metadata={"help": "torch.compile the trained UNet (compiles on the first steps)"}
    )


@dataclass
class DataConfig:
    path: Path = field(
        metadata={
            "help": "preference pairs: Pick-a-Pic .parquet, .jsonl + images, a save_to_disk folder or hub id"
        }
    )
    split: str = field(default="train", metadata={"help": "split of a datasets folder or hub dataset"})
    resolution: int | None = field(
        default=None, metadata=_by_method("training image size (short side, then cropped)")
    )
    random_crop: bool | None = field(default=None, metadata=_by_method("random instead of center crop"))
    hflip: bool | None = field(
        default=None, metadata=_by_method("random horizontal flip (same for both images)")
    )
    caption_dropout: float | None = field(
        default=None, metadata=_by_method("probability of training on the empty prompt")
    )
    ties: Literal["drop", "half"] = field(
        default="drop", metadata={"help": "drop tied pairs (official) or keep"}
    )
    on_bad_sample: Literal["error", "skip"] = field(
        default="error",
        metadata={
            "help": "a malformed row or corrupt/missing image stops training, or is skipped and counted"
        },
    )
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes"})

    ranges: ClassVar[dict[str, Range]] = {
        "resolution": AT_LEAST_ONE,
        "caption_dropout": UNIT,
        "num_workers": NON_NEGATIVE,
    }

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass
class OptimConfig:
    name: Literal["adamw", "adamw8bit", "adafactor"] = field(default="adamw", metadata={"help": "optimiser"})
    lr: float | None = field(
        default=None, metadata=_by_method("learning rate (per sample when scale_lr)", "loop")
    )
    scale_lr: bool | None = field(
        default=None,
        metadata=_by_method(
            "multiply lr by world size x accumulation x batch (the official Diffusion-DPO scripts do)", "loop"
        ),
    )
    weight_decay: float | None = field(default=None, metadata=_by_method("weight decay", "loop"))
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "Adam betas"})
    eps: float = field(default=1e-8, metadata={"help": "Adam epsilon"})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "gradient clipping (none: off)"})
    schedule: Literal["constant", "constant_with_warmup", "cosine"] = field(
        default="constant_with_warmup", metadata={"help": "learning-rate schedule"}
    )
    warmup_steps: int | None = field(default=None, metadata=_by_method("warmup optimiser steps", "loop"))

    ranges: ClassVar[dict[str, Range]] = {
        "lr": POSITIVE,
        "weight_decay": NON_NEGATIVE,
        "betas": Range(0, 1, high_open=True),
        "eps": POSITIVE,
        "max_grad_norm": POSITIVE,
        "warmup_steps": NON_NEGATIVE,
    }

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass
class TrainConfig:
    method: str = field(metadata={"help": "recipe name (diffalign.methods: diffusion_dpo, ...)"})
    model: ModelConfig = field(metadata={"help": "model section"})
    data: DataConfig = field(metadata={"help": "data section"})
    output_dir: Path = field(default=Path("outputs/run"), metadata={"help": "checkpoints, exports, logs"})
    objective: dict[str, Any] | None = field(
        default=None,
        metadata=_by_method(
            "objective name and hyper-parameters; one given alone (objective.beta=...) adjusts the method's"
        ),
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
    ema_decay: float | None = field(
        default=None, metadata=_by_method("decay of the EMA of trained weights (0: off)", "optional")
    )
    checkpoint_every: int = field(
        default=500,
        metadata={
            "help": "save state + export every N steps (at the end of the loader batch that reaches them)"
        },
    )
    keep_checkpoints: int = field(default=3, metadata={"help": "how many checkpoints to keep"})
    resume_from: str | None = field(default=None, metadata={"help": "'latest' or a checkpoint folder"})
    on_nonfinite: Literal["error", "skip"] = field(
        default="error",
        metadata={
            "help": "a non-finite loss or gradient norm stops the run before the step, naming it (error), "
            "or the step is skipped and counted in the skipped_steps metric (skip)"
        },
    )
    log_every: int = field(default=10, metadata={"help": "log metrics every N steps"})
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"], metadata={"help": "trackers"})
    validation_every: int = field(default=0, metadata={"help": "sample a grid every N steps (0: never)"})
    validation_prompts: list[str] = field(
        default_factory=list, metadata={"help": "prompts of the sample grid"}
    )
    validation_steps: int = field(default=25, metadata={"help": "sampler steps for validation images"})

    ranges: ClassVar[dict[str, Range]] = {
        **dict.fromkeys(
            ("max_steps", "batch_size", "gradient_accumulation_steps", "checkpoint_every", "keep_checkpoints",
             "log_every", "validation_steps"),
            AT_LEAST_ONE,
        ),
        "seed": NON_NEGATIVE,
        "ema_decay": Range(0, 1, high_open=True),  # 0: no EMA
        "validation_every": NON_NEGATIVE,  # 0: never
    }  # fmt: skip

    def __post_init__(self) -> None:
        check_ranges(self)


def with_method_defaults(cfg: TrainConfig, method: str, defaults: Mapping[str, Any]) -> TrainConfig:
    """A copy of ``cfg`` whose unset method-dependent keys take ``defaults`` (a nested mapping of
    config keys, e.g. ``{"optim": {"lr": 1e-8}}``: the method's ``defaults``).

    A section the config leaves out (``model.lora`` without LoRA) stays out. The objective comes
    out whole (:func:`~diffalign.objectives.objective_spec`, so that ``config.json`` says what
    trained): the config's, where it names one (else the default's name), with the default's
    hyper-parameters it takes where the config gives none (``objective.beta=2500`` keeps
    Diffusion-DPO's ``dpo``; ``objective={name: mappo}`` keeps its beta 5000), else its own.

    Raises:
        ConfigError: naming the dotted key, when a key the method has no default for is set (the
            method does not use it: ``data.resolution`` on a text method), a key the loop reads
            stays unset, the objective has no name or a bad hyper-parameter, or ``defaults`` holds
            a key that is unknown, not the method's to set, or of the wrong type.
    """
    from diffalign.config import ConfigError, build, to_dict

    data = to_dict(cfg)
    try:
        data["objective"] = _whole_objective(data["objective"], defaults.get("objective"))
        _fill(TrainConfig, data, {k: v for k, v in defaults.items() if k != "objective"}, method, "")
    except (KeyError, ValueError) as err:
        raise ConfigError(f"method {method}: {err.args[0]}") from err
    return build(TrainConfig, data, source=f"method {method}'s defaults")


def _whole_objective(given: dict[str, Any] | None, default: Mapping[str, Any] | None) -> dict | None:
    from diffalign.objectives import objective_spec

    if given is None and default is None:
        return None
    if given is not None and not isinstance(given, dict):
        raise ValueError(f"objective must be a mapping ({{name: dpo, beta: 0.1}}), got {given!r}")
    given, default = dict(given or {}), dict(default or {})
    if "name" in given and (not isinstance(given["name"], str) or not given["name"]):
        raise ValueError(f"objective.name must be an objective's name, got {given['name']!r}")
    name = given.pop("name", None) or default.get("name")
    if name is None:
        raise ValueError("objective needs a 'name' (the method has no default objective)")
    return objective_spec(name, carried=default, **given)


def _fill(cls: type, data: dict[str, Any], defaults: Mapping[str, Any], method: str, prefix: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and f.name != "objective"}
    hints = typing.get_type_hints(cls)
    for key in defaults:
        if key not in fields:
            raise ValueError(f"its defaults name '{prefix}{key}', which is no config key")
    for name, f in fields.items():
        key, value, default = f"{prefix}{name}", data.get(name), defaults.get(name)
        section = next(
            (t for t in (hints[name], *typing.get_args(hints[name])) if dataclasses.is_dataclass(t)), None
        )
        if section is not None:
            if value is not None:
                _fill(section, value, default or {}, method, f"{key}.")
            continue
        read_by = f.metadata.get(_BY_METHOD)
        if read_by is None and default is not None:
            raise ValueError(
                f"its defaults set '{key}', which the shared config sets (only unset keys are the method's)"
            )
        if value is None and default is not None:
            data[name] = copy.deepcopy(default)
        elif value is not None and default is None and read_by == "method":
            raise ValueError(f"{key} is set, but the method does not use it: remove it")
        elif value is None and read_by == "loop":
            raise ValueError(f"{key} is unset and the method has no default for it: set it")
