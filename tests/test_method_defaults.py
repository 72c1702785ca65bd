"""Method-dependent config keys: unset in the shared config, filled from each method's defaults."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from diffalign.cli import main
from diffalign.config import ConfigError, load_config
from diffalign.methods import METHODS, get_method
from diffalign.text.online import OnlineTextConfig, round_config
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
    assert image.objective == {"name": "dpo", "beta": 5000.0, "reference_free": False}
    assert text.objective == {"name": "dpo", "beta": 0.1, "reference_free": False}
    assert (image.optim.lr, image.optim.scale_lr, image.optim.warmup_steps) == (1e-8, True, 500)
    assert (text.optim.lr, text.optim.scale_lr, text.optim.warmup_steps) == (1e-6, False, 0)
    assert (image.data.resolution, image.data.caption_dropout) == (512, 0.2)
    assert text.data.resolution is None and text.data.caption_dropout is None


def test_what_the_config_sets_wins_and_the_callers_config_is_left_alone() -> None:
    cfg = config("diffusion_dpo", "optim.lr=3e-5", "objective={name: ipo, beta: 2.0}")
    filled = with_method_defaults(cfg, "diffusion_dpo", get_method("diffusion_dpo").defaults)
    assert filled.optim.lr == 3e-5
    assert filled.objective.items() >= {"name": "ipo", "beta": 2.0, "length_normalized": False}.items()
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
    with pytest.raises(ConfigError, match=rf"text_preference: {name} is set, but the method does not use it"):
        resolved("text_preference", key)


def test_a_key_the_loop_reads_must_end_set() -> None:
    with pytest.raises(ConfigError, match=r"method bare: optim.lr is unset and the method has no default"):
        with_method_defaults(config("diffusion_dpo"), "bare", {})


def test_every_registered_method_sets_every_key_the_loop_reads() -> None:
    for name in METHODS:
        cfg = resolved(name)
        for key in ("lr", "scale_lr", "weight_decay", "warmup_steps"):
            assert getattr(cfg.optim, key) is not None, (name, key)
        if "objective" in get_method(name).defaults:  # ift trains on SFT rows: it has no objective
            assert cfg.objective is not None and "name" in cfg.objective, name
        else:
            with pytest.raises(ConfigError, match=f"objective: {name} has no objective setting"):
                get_method(name)(config(name, "objective={name: dpo}"))


def test_methods_cli_lists_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    image = out[out.index("diffusion_dpo:") : out.index("text_preference:")]
    assert "optim.lr=1e-08" in image and "objective={'name': 'dpo', 'beta': 5000.0}" in image
    assert "optim.lr=1e-06" in out[out.index("text_preference:") : out.index("smpo:")]
    dro = out[out.index("dro:") :]  # its options too, with their defaults
    assert "ema_decay=0.9999" in dro and "method_options.buffer_size=4" in dro
    assert "method_options.rollout_sampler=dpmsolver++" in dro


def test_shipped_configs_build_with_their_methods_defaults() -> None:
    root = Path(__file__).parents[1] / "configs"
    files = [
        p
        for p in root.rglob("*.yaml")
        if p.parent.name in ("diffusion_dpo", "smpo", "dro", "ddpo", "prefpaint", "text", "demo")
    ]
    assert len(files) >= 22
    for path in files:
        if "train" in yaml.safe_load(path.read_text()):  # an online driver's config: one round's
            online = load_config(OnlineTextConfig, path)
            cfg = round_config(online.train, "lm", Path("rows.jsonl"), Path("out"))
        else:
            cfg = load_config(TrainConfig, path)
        filled = with_method_defaults(cfg, cfg.method, get_method(cfg.method).defaults)
        unset = [f.name for f in dataclasses.fields(filled.optim) if getattr(filled.optim, f.name) is None]
        assert unset in ([], ["max_grad_norm"]), (path, unset)


@pytest.mark.parametrize(
    ("method", "objective", "expected"),
    [
        # a hyper-parameter alone adjusts the method's objective
        ("diffusion_dpo", "objective.beta=2500", {"name": "dpo", "beta": 2500.0}),
        # another objective keeps the method's scale where it takes it: beta 5000 on denoising errors
        ("diffusion_dpo", "objective={name: mappo}", {"name": "mappo", "beta": 5000.0, "base": "dpo"}),
        ("diffusion_dpo", "objective={name: ipo}", {"name": "ipo", "beta": 5000.0}),
        # SmPO's beta 2000 is for images: on tokens the text method's 0.1 holds
        ("text_preference", "objective={name: smoothed_dpo}", {"name": "smoothed_dpo", "beta": 0.1}),
        # ORPO takes no beta; its own default weight stays
        ("text_preference", "objective={name: orpo}", {"name": "orpo", "odds_ratio_weight": 0.1}),
        (
            "text_preference",
            "objective={name: smoothed_dpo, beta: 3.0}",
            {"name": "smoothed_dpo", "beta": 3.0},
        ),
    ],
)
def test_the_objective_comes_out_whole_with_the_methods_scale(
    method: str, objective: str, expected: dict
) -> None:
    cfg = resolved(method, objective)
    assert cfg.objective.items() >= expected.items()
    assert "beta" in expected or "beta" not in cfg.objective
    # every hyper-parameter is written out: config.json says what trained
    from diffalign.objectives import objective_class

    fields = {f.name for f in dataclasses.fields(objective_class(expected["name"])) if f.init}
    assert set(cfg.objective) == {"name", *fields}


def test_bad_objectives_and_bad_method_defaults_are_named() -> None:
    with pytest.raises(ConfigError, match="objective needs a 'name'"):
        with_method_defaults(config("diffusion_dpo", "objective.beta=3"), "bare", {"optim": {"lr": 1.0}})
    with pytest.raises(ConfigError, match="unknown objective 'dpoo'"):
        resolved("diffusion_dpo", "objective={name: dpoo}")
    with pytest.raises(ConfigError, match="betta"):
        resolved("diffusion_dpo", "objective.betta=3")
    loop_keys = {"lr": 1.0, "scale_lr": False, "weight_decay": 0.0, "warmup_steps": 0}
    with pytest.raises(ConfigError, match=r"method m: its defaults name 'optim.lrr', which is no config key"):
        with_method_defaults(config("diffusion_dpo"), "m", {"optim": {**loop_keys, "lrr": 1.0}})
    with pytest.raises(ConfigError, match=r"its defaults set 'max_steps', which the shared config sets"):
        with_method_defaults(config("diffusion_dpo"), "m", {"optim": loop_keys, "max_steps": 7})
    with pytest.raises(
        ConfigError, match=r"method m's defaults: 'optim.lr' must be a finite number, got 'fast'"
    ):
        with_method_defaults(config("diffusion_dpo"), "m", {"optim": {**loop_keys, "lr": "fast"}})


def test_an_unused_key_is_a_config_error_on_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config_file = tmp_path / "text.yaml"
    config_file.write_text("method: text_preference\nmodel: {pretrained: m}\ndata: {path: d}\n")
    assert main(["train", "--config", str(config_file), "data.resolution=64"]) == 2
    err = capsys.readouterr().err
    assert (
        "config error: method text_preference: data.resolution is set, but the method does not use it" in err
    )


def test_a_whole_objective_override_can_be_refined_by_a_dotted_one() -> None:
    assert resolved("diffusion_dpo", "objective={name: ipo}", "objective.beta=0.5").objective["beta"] == 0.5
    # the later whole value replaces what came before it, as any override does
    assert (
        resolved("diffusion_dpo", "objective.beta=0.5", "objective={name: ipo}").objective["beta"] == 5000.0
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("objective={name: 3}", "objective.name must be an objective's name, got 3"),
        ("objective={name: [dpo]}", r"objective.name must be an objective's name, got \['dpo'\]"),
        ("objective={name: ''}", "objective.name must be an objective's name, got ''"),
        (
            "objective={name: mappo, base_options: {beta: 1.0}}",
            r"beta \(5000.0\) and base_options.beta \(1.0\)",
        ),
    ],
)
def test_malformed_objectives_are_config_errors(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolved("diffusion_dpo", override)


def test_an_objective_that_is_no_mapping_is_named() -> None:
    cfg = TrainConfig(
        method="diffusion_dpo", model=config("diffusion_dpo").model, data=config("diffusion_dpo").data
    )
    cfg.objective = "dpo"  # type: ignore[assignment]  (as a Python caller may write it)
    with pytest.raises(
        ConfigError, match=r"objective must be a mapping \(\{name: dpo, beta: 0.1\}\), got 'dpo'"
    ):
        with_method_defaults(cfg, "diffusion_dpo", get_method("diffusion_dpo").defaults)


def test_ema_is_a_method_default_that_zero_turns_off() -> None:
    """Diffusion-DRO trains with EMA 0.9999 (its official default), the offline recipes without;
    ``ema_decay=0`` turns it off for DRO, and any method may ask for one."""
    assert resolved("dro").ema_decay == 0.9999
    assert resolved("dro", "ema_decay=0").ema_decay == 0.0
    assert resolved("diffusion_dpo").ema_decay is None and resolved("text_preference").ema_decay is None
    assert resolved("diffusion_dpo", "ema_decay=0.99").ema_decay == 0.99
    with pytest.raises(ConfigError, match=r"ema_decay must be in \[0, 1\)"):
        config("dro", "ema_decay=1.5")
