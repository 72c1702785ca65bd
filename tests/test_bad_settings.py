"""Every numeric hyper-parameter of every objective, method and optimiser declares its valid
range, and a value outside it is refused when the config is built, naming the key."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path

import pytest

from diffalign.config import ConfigError, Range, build, declared_ranges
from diffalign.methods import METHODS, get_method
from diffalign.objectives import list_objectives, objective_class
from diffalign.text.logps import Tokenization
from diffalign.training.config import DataConfig, LoraSettings, ModelConfig, OptimConfig, TrainConfig

CLASSES = sorted(
    {OptimConfig, TrainConfig, DataConfig, LoraSettings, Tokenization}
    | {objective_class(name) for name in list_objectives()}
    | {get_method(name).options_class for name in METHODS} - {None},
    key=lambda c: c.__name__,
)
REQUIRED = {
    TrainConfig: {"method": "ddpo", "model": {"pretrained": "x"}, "data": {"path": "x"}},
    DataConfig: {"path": "x"},
}


def _numeric(tp: object) -> type | None:
    """int or float when ``tp`` is one, optionally in a tuple or with None; else None."""
    if tp in (int, float):
        return tp  # type: ignore[return-value]
    if typing.get_origin(tp) in (typing.Union, types.UnionType, tuple):
        found = {_numeric(a) for a in typing.get_args(tp) if a is not type(None) and a is not Ellipsis}
        return found.pop() if len(found) == 1 and None not in found else None
    return None


def _numeric_fields(cls: type) -> dict[str, tuple[type, bool]]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        kind = _numeric(hints[f.name])
        if f.init and not f.name.startswith("_") and kind is not None:
            out[f.name] = (
                kind,
                typing.get_origin(hints[f.name]) is tuple
                or tuple in map(typing.get_origin, typing.get_args(hints[f.name])),
            )
    return out


def _outside(allowed: Range) -> float | None:
    if allowed.low is not None:
        return allowed.low if allowed.low_open else allowed.low - 1
    if allowed.high is not None:
        return allowed.high if allowed.high_open else allowed.high + 1
    return None  # any value is valid


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_numeric_setting_declares_its_range(cls: type) -> None:
    missing = set(_numeric_fields(cls)) - set(declared_ranges(cls))
    assert not missing, f"{cls.__name__}: no declared range for {sorted(missing)}"


CASES = [
    (cls, name, allowed)
    for cls in CLASSES
    for name, allowed in declared_ranges(cls).items()
    if _outside(allowed) is not None
]


@pytest.mark.parametrize(("cls", "name", "allowed"), CASES, ids=[f"{c.__name__}.{n}" for c, n, _ in CASES])
def test_a_value_outside_its_range_is_refused_naming_the_key(cls: type, name: str, allowed: Range) -> None:
    kind, is_tuple = _numeric_fields(cls)[name]
    value = kind(_outside(allowed))
    data = {**REQUIRED.get(cls, {}), name: [value, value] if is_tuple else value}
    with pytest.raises(ConfigError, match=rf"{name} must be {re.escape(str(allowed))}, got"):
        build(cls, data, source="run.yaml")
    inside = allowed.low if allowed.low is not None and not allowed.low_open else None
    if inside is not None:  # the bound itself is valid (other settings may still conflict with it)
        try:
            build(cls, {**data, name: [kind(inside)] * 2 if is_tuple else kind(inside)}, source="run.yaml")
        except ConfigError as err:
            assert f"{name} must be" not in str(err)


def test_ranges_read_as_a_user_would() -> None:
    assert [str(r) for r in (Range(0, low_open=True), Range(1), Range(0, 0.5, high_open=True))] == [
        "> 0",
        ">= 1",
        "in [0, 0.5)",
    ]
    assert float("nan") not in Range(0)
    assert 3 in Range()


def test_the_model_section_has_no_numbers_to_check() -> None:
    assert _numeric_fields(ModelConfig) == {}


def _no_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to load a model fails the test: the settings must be refused before."""
    import diffalign.methods.text_preference as text_preference
    from diffalign.diffusion.policy import DiffusionPolicy

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded before the settings were checked")

    monkeypatch.setattr(DiffusionPolicy, "from_pretrained", refuse)
    monkeypatch.setattr(text_preference, "load_causal_lm", refuse)


def test_an_inpainting_method_on_a_text_to_image_unet_is_refused_before_loading(
    tiny_pipelines, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_policy_gradient import inpainting_examples, prefpaint_config

    data = inpainting_examples(tmp_path / "data")
    _no_model_loads(monkeypatch)
    with pytest.raises(
        ValueError, match=r"is a text-to-image pipeline \(its UNet takes 4 input channels\); prefpaint"
    ):
        get_method("prefpaint")(prefpaint_config(tiny_pipelines["sd"], data, tmp_path / "out"))


@pytest.mark.parametrize("method", ["diffusion_dpo", "text_preference"])
def test_adapters_as_reference_without_lora_are_refused_before_loading(
    method: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_model_loads(monkeypatch)
    cfg = build(
        TrainConfig,
        {**REQUIRED[TrainConfig], "method": method, "model": {"pretrained": "x", "reference": "adapters"},
         "output_dir": str(tmp_path / "out")},
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"model\.reference: 'adapters' needs model\.lora"):
        get_method(method)(cfg)
