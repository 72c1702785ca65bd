"""The typed YAML config system."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from diffalign.config import ConfigError, build, load_config, to_dict


@dataclass
class Optim:
    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["constant", "cosine"] = "constant"


@dataclass
class Train:
    model: str  # required
    steps: int = 10
    mixed_precision: bool = False
    output_dir: Path = Path("outputs")
    seed: int | None = None
    prompts: list[str] = field(default_factory=list)
    optim: Optim = field(default_factory=Optim)
    objective: dict[str, Any] = field(default_factory=lambda: {"name": "dpo"})


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_yaml_and_dotted_overrides(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "model: tiny\nsteps: 5\noptim:\n  lr: 1e-4\n  schedule: cosine\nobjective: {name: ipo, beta: 0.2}\n",
    )
    cfg = load_config(
        Train, path, ["optim.lr=3e-6", "seed=7", "model=123", "prompts=[a cat, a dog]", "objective.beta=0.5"]
    )
    assert cfg.model == "123"  # str fields take the override text as is
    assert cfg.steps == 5
    assert cfg.optim.lr == 3e-6 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.schedule == "cosine"
    assert cfg.seed == 7
    assert cfg.prompts == ["a cat", "a dog"]
    assert cfg.objective == {"name": "ipo", "beta": 0.5}
    assert cfg.output_dir == Path("outputs")
    assert to_dict(cfg)["optim"] == {"lr": 3e-6, "betas": [0.9, 0.999], "schedule": "cosine"}


def test_yaml_float_written_without_dot_is_a_float(tmp_path: Path) -> None:
    cfg = load_config(Train, write(tmp_path, "model: m\noptim: {lr: 1e-4}\n"))
    assert cfg.optim.lr == pytest.approx(1e-4)


def test_unknown_key_names_key_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, "model: m\noptim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=rf"{path}: unknown key 'optim.lrr'; did you mean 'optim.lr'"):
        load_config(Train, path)


def test_unknown_override_names_the_override(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"stepz=3: unknown key 'stepz'; did you mean 'steps'"):
        load_config(Train, write(tmp_path, "model: m\n"), ["stepz=3"])


def test_wrong_type_names_key_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, "model: m\nsteps: many\n")
    with pytest.raises(ConfigError, match=rf"{path}: 'steps' must be an integer, got 'many'"):
        load_config(Train, path)
    with pytest.raises(
        ConfigError, match=r"mixed_precision=yes please: 'mixed_precision' must be true or false"
    ):
        load_config(Train, write(tmp_path, "model: m\n"), ["mixed_precision=yes please"])
    with pytest.raises(ConfigError, match=r"'optim.schedule' must be one of 'constant', 'cosine'"):
        load_config(Train, write(tmp_path, "model: m\noptim: {schedule: linear}\n"))
    with pytest.raises(ConfigError, match=r"'optim.betas' must be a list of 2 items"):
        load_config(Train, write(tmp_path, "model: m\noptim: {betas: [0.9]}\n"))
    with pytest.raises(ConfigError, match=r"'steps' must be an integer, got 2.5"):
        load_config(Train, write(tmp_path, "model: m\nsteps: 2.5\n"))


def test_missing_required_names_key_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, "steps: 3\n")
    with pytest.raises(ConfigError, match=rf"{path}: missing required key 'model'"):
        load_config(Train, path)


def test_missing_file_and_bad_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"config file not found: \S*nope.yaml$"):
        load_config(Train, tmp_path / "nope.yaml")
    # run from elsewhere than a checkout (an installed wheel): the packaged copy is named
    from diffalign.config import packaged_config

    shipped = packaged_config("diffusion_dpo", "tiny.yaml")
    monkeypatch.chdir(tmp_path)
    for name in ("configs/diffusion_dpo/tiny.yaml", "diffusion_dpo/tiny.yaml"):
        with pytest.raises(ConfigError, match=rf"not found: {name} \(diffalign ships one at {shipped}\)"):
            load_config(Train, Path(name))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Train, write(tmp_path, "model: [unclosed\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(Train, write(tmp_path, "- a\n- b\n"))


def test_malformed_override() -> None:
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(Train, None, ["model"])
    with pytest.raises(ConfigError, match=r"'optim\.lr' is a value, not a section"):
        load_config(Train, None, ["model=m", "optim.lr=1", "optim.lr.x=2"])


def test_optional_and_null(tmp_path: Path) -> None:
    cfg = load_config(Train, write(tmp_path, "model: m\nseed: 3\n"), ["seed=null"])
    assert cfg.seed is None


def test_validation_in_post_init_is_reported_with_source() -> None:
    @dataclass
    class Positive:
        x: float = 1.0

        def __post_init__(self) -> None:
            if self.x <= 0:
                raise ValueError("x must be positive")

    with pytest.raises(ConfigError, match="here: invalid 'Positive': x must be positive"):
        build(Positive, {"x": -1}, source="here")


def test_yaml_11_words_are_read_as_the_field_wants(tmp_path: Path) -> None:
    """YAML 1.1 reads no/yes/on/off as booleans, so accelerate's own `mixed_precision: no` was
    refused; a string or literal field now takes the text written, in files and overrides."""
    from diffalign.training.config import TrainConfig

    text = (
        "method: diffusion_dpo\nmodel: {pretrained: 1984}\ndata: {path: 2024_01, hflip: no}\n"
        "mixed_precision: no\nvalidation_prompts: [yes, no, on, 0.10, 'quoted']\n"
        "objective: {name: dpo, beta: 5e3, reference_free: off}\nseed: 010\n"
    )
    cfg = load_config(TrainConfig, write(tmp_path, text))
    assert cfg.mixed_precision == "no"
    assert cfg.validation_prompts == ["yes", "no", "on", "0.10", "quoted"]
    assert cfg.model.pretrained == "1984" and cfg.data.path == Path("2024_01")
    assert cfg.data.hflip is False  # a bool field reads no/off/yes/on as YAML 1.1 meant them
    assert cfg.objective == {"name": "dpo", "beta": 5000.0, "reference_free": "off"}
    assert cfg.seed == 10  # YAML 1.2: no octal from a leading zero
    over = load_config(
        TrainConfig,
        write(tmp_path, text),
        ["mixed_precision=no", "validation_prompts=[yes, no]", "data.hflip=on"],
    )
    assert (over.mixed_precision, over.validation_prompts, over.data.hflip) == ("no", ["yes", "no"], True)
    from diffalign.objectives import get_objective

    assert get_objective(**cfg.objective).reference_free is False  # typed where the objective is built


def test_a_bool_field_still_takes_only_booleans_and_floats_are_finite(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'model' must be a string, got None"):
        load_config(Train, write(tmp_path, "model:\n"))  # empty is null, not the string ''
    anchors = "a: &common {lr: 2e-4}\nmodel: m\noptim:\n  <<: *common\n  schedule: cosine\n"
    with pytest.raises(ConfigError, match="unknown key 'a'"):
        load_config(Train, write(tmp_path, anchors))
    cfg = load_config(Train, write(tmp_path, anchors.replace("a: &common", "objective: &common")))
    assert cfg.optim.lr == 2e-4 and cfg.optim.schedule == "cosine"  # YAML merge keys still merge
    assert load_config(Train, write(tmp_path, "model: m\nmixed_precision: true\n")).mixed_precision is True
    with pytest.raises(ConfigError, match=r"'mixed_precision' must be true or false, got 'maybe'"):
        load_config(Train, write(tmp_path, "model: m\nmixed_precision: maybe\n"))
    with pytest.raises(ConfigError, match=r"optim.lr=nan: 'optim.lr' must be a finite number"):
        load_config(Train, write(tmp_path, "model: m\n"), ["optim.lr=nan"])
    with pytest.raises(ConfigError, match=r"'optim.lr' must be a finite number, got inf"):
        load_config(Train, write(tmp_path, "model: m\noptim: {lr: .inf}\n"))


def test_messages_show_values_as_written_and_the_inner_reason() -> None:
    from diffalign.training.config import TrainConfig

    base = ["method=m", "model.pretrained=p", "data.path=d"]
    with pytest.raises(
        ConfigError, match=r"'validation_prompts\[0\]' must be a string, got \{'a dog': 'cute'\}"
    ):
        load_config(TrainConfig, None, [*base, "validation_prompts=[a dog: cute]"])
    with pytest.raises(ConfigError, match=r"'model.lora.alpha' must be a finite number, got nan"):
        load_config(TrainConfig, None, [*base, "model.lora={alpha: .nan}"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.resolution=0", "resolution must be >= 1"),
        ("data.caption_dropout=2", r"caption_dropout must be in \[0, 1\], got 2"),
        ("data.num_workers=-1", "num_workers must be >= 0"),
    ],
)
def test_data_values_out_of_range_are_named(override: str, message: str) -> None:
    from diffalign.training.config import TrainConfig

    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, None, ["method=dro", "model.pretrained=m", "data.path=d", override])


def test_an_override_deep_inside_a_free_form_mapping_is_read_as_a_value(tmp_path) -> None:
    """``method_options.reward_kwargs.weights=PATH`` reaches the reward as a string, not as the
    unparsed override (PrefPaint's demo passes its reward folder so)."""
    from diffalign.config import load_config
    from diffalign.training.config import TrainConfig

    path = tmp_path / "c.yaml"
    path.write_text(
        "method: ddpo\nmodel: {pretrained: p}\ndata: {path: d}\n"
        "method_options: {reward_kwargs: {weights: old, scale: 1}}\n"
    )
    cfg = load_config(
        TrainConfig, path, ["method_options.reward_kwargs.weights=/models/rm", "method_options.x.y=[1, 2]"]
    )
    assert cfg.method_options == {"reward_kwargs": {"weights": "/models/rm", "scale": 1}, "x": {"y": [1, 2]}}
