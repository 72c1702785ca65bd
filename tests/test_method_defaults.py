"""Method-dependent config keys: unset in the shared config, filled from each method's defaults."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from diffalign.cli import main
from diffalign.config import load_config
from diffalign.methods import METHODS, get_method
from diffalign.training.config import TrainConfig, with_method_defaults


def config(method: str, *overrides: str) -> TrainConfig:
    return load_config(
        TrainConfig, None, [f"method={method}", "model.pretrained=m", "data.path=d", *overrides]
    )


def resolved(method: str, *overrides: str) -> TrainConfig:
    return with_method_defaults(config(method, *overrides), method, get_method(method).defaults)


def test_each_method_fills_its_own_defaults() -> None:
    image, text = resolved("diffusion_dpo"), resolved("text_preference")
    # the official Diffusion-DPO launcher's and TRL's DPOConfig's values, not one shared set
    assert image.objective == {"name": "dpo", "beta": 5000.0}
    assert text.objective == {"name": "dpo", "beta": 0.1}
    assert (image.optim.lr, image.optim.scale_lr, image.optim.warmup_steps) == (1e-8, True, 500)
    assert (text.optim.lr, text.optim.scale_lr, text.optim.warmup_steps) == (1e-6, False, 0)
    assert (image.data.resolution, image.data.caption_dropout) == (512, 0.2)
    assert text.data.resolution is None and text.data.caption_dropout is None


def test_what_the_config_sets_wins_and_the_callers_config_is_left_alone() -> None:
    cfg = config("diffusion_dpo", "optim.lr=3e-5", "objective={name: ipo, beta: 2.0}")
    filled = with_method_defaults(cfg, "diffusion_dpo", get_method("diffusion_dpo").defaults)
    assert filled.optim.lr == 3e-5 and filled.objective == {"name": "ipo", "beta": 2.0}
    assert filled.optim.warmup_steps == 500
    assert cfg.optim.warmup_steps is None and cfg.data.resolution is None


def test_lora_targets_fill_only_a_lora_section_that_is_there() -> None:
    assert resolved("diffusion_dpo").model.lora is None
    lora = resolved("diffusion_dpo", "model.lora={rank: 2}").model.lora
    assert lora.target_modules == ["to_k", "to_q", "to_v", "to_out.0"]
    assert resolved("text_preference", "model.lora={rank: 2}").model.lora.target_modules == ["all-linear"]
    mine = resolved("text_preference", "model.lora={rank: 2, target_modules: [q_proj]}").model.lora
    assert mine.target_modules == ["q_proj"]


@pytest.mark.parametrize("key", ["data.resolution=64", "data.hflip=false", "data.caption_dropout=0.1"])
def test_an_image_key_on_a_text_method_is_refused_by_name(key: str) -> None:
    name = key.partition("=")[0]
    with pytest.raises(ValueError, match=rf"{name} is set, but method text_preference does not use it"):
        resolved("text_preference", key)


def test_a_key_the_loop_reads_must_end_set() -> None:
    with pytest.raises(ValueError, match=r"optim.lr is unset and method bare has no default for it: set it"):
        with_method_defaults(config("diffusion_dpo"), "bare", {})


def test_every_registered_method_sets_every_key_the_loop_reads() -> None:
    for name in METHODS:
        cfg = resolved(name)
        for key in ("lr", "scale_lr", "weight_decay", "warmup_steps"):
            assert getattr(cfg.optim, key) is not None, (name, key)
        assert cfg.objective is not None and "name" in cfg.objective, name


def test_methods_cli_lists_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    image = out[out.index("diffusion_dpo:") : out.index("text_preference:")]
    assert "optim.lr=1e-08" in image and "objective={'name': 'dpo', 'beta': 5000.0}" in image
    assert "optim.lr=1e-06" in out[out.index("text_preference:") :]


def test_shipped_configs_build_with_their_methods_defaults() -> None:
    root = Path(__file__).parents[1] / "configs"
    files = [p for p in root.rglob("*.yaml") if p.parent.name in ("diffusion_dpo", "text", "demo")]
    assert len(files) >= 15
    for path in files:
        cfg = load_config(TrainConfig, path)
        filled = with_method_defaults(cfg, cfg.method, get_method(cfg.method).defaults)
        unset = [f.name for f in dataclasses.fields(filled.optim) if getattr(filled.optim, f.name) is None]
        assert unset in ([], ["max_grad_norm"]), (path, unset)
