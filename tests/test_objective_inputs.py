"""Bad input gets a clear error that names the argument."""

from __future__ import annotations

import pytest
import torch
from pairs import make_pairs

from diffalign.config import ConfigError
from diffalign.objectives import DPO, ObjectiveInputError, get_objective, list_objectives, register_objective


def test_shape_mismatch_names_both_arguments(pairs: dict[str, torch.Tensor]) -> None:
    bad = {**pairs, "reference_rejected_logps": torch.zeros(5, dtype=torch.float64)}
    with pytest.raises(
        ObjectiveInputError, match=r"`reference_rejected_logps`.*\(5,\).*`policy_chosen_logps`"
    ):
        get_objective("dpo")(**bad)


def test_two_dimensional_pairwise_input_is_rejected(pairs: dict[str, torch.Tensor]) -> None:
    with pytest.raises(ObjectiveInputError, match="`policy_chosen_logps` must be a non-empty 1-D tensor"):
        get_objective("dpo")(**{**pairs, "policy_chosen_logps": pairs["policy_chosen_logps"][:, None]})


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_input_is_named(pairs: dict[str, torch.Tensor], value: float) -> None:
    bad = pairs["reference_chosen_logps"].clone()
    bad[2] = value
    kind = "NaN" if value != value else "inf"
    with pytest.raises(ObjectiveInputError, match=f"`reference_chosen_logps` contains {kind}"):
        get_objective("ipo")(**{**pairs, "reference_chosen_logps": bad})


@pytest.mark.parametrize(
    ("name", "missing"),
    [
        ("mappo", "chosen_rewards"),
        ("madpo", "rejected_rewards"),
        ("dpo", "reference_chosen_logps"),
        ("ipo", "policy_rejected_logps"),
    ],
)
def test_missing_required_input_is_named(pairs: dict[str, torch.Tensor], name: str, missing: str) -> None:
    with pytest.raises(ObjectiveInputError, match=f"'{name}' requires `{missing}`"):
        get_objective(name)(**{k: v for k, v in pairs.items() if k != missing})


def test_missing_reference_suggests_reference_free(pairs: dict[str, torch.Tensor]) -> None:
    with pytest.raises(ObjectiveInputError, match="reference_free=True"):
        get_objective("dpo")(
            policy_chosen_logps=pairs["policy_chosen_logps"],
            policy_rejected_logps=pairs["policy_rejected_logps"],
        )


def test_smoothed_dpo_needs_labels_or_rewards(pairs: dict[str, torch.Tensor]) -> None:
    no_rewards = {k: v for k, v in pairs.items() if "rewards" not in k}
    with pytest.raises(ObjectiveInputError, match="`preference_probs` or both `chosen_rewards`"):
        get_objective("smoothed_dpo")(**no_rewards)
    with pytest.raises(ObjectiveInputError, match=r"`preference_probs` must lie in \[0, 1\]"):
        get_objective("smoothed_dpo")(
            **no_rewards, preference_probs=torch.full((6,), 1.5, dtype=torch.float64)
        )


def test_length_normalised_ipo_needs_lengths(pairs: dict[str, torch.Tensor]) -> None:
    with pytest.raises(ObjectiveInputError, match="requires `chosen_lengths`"):
        get_objective("ipo", length_normalized=True)(**{k: v for k, v in pairs.items() if "lengths" not in k})


def test_unknown_input_is_named_with_suggestion(pairs: dict[str, torch.Tensor]) -> None:
    with pytest.raises(
        ObjectiveInputError,
        match=r"unexpected input `policy_chosen_logp`.*did you mean `policy_chosen_logps`",
    ):
        get_objective("dpo")(
            **{k: v for k, v in pairs.items() if k != "policy_chosen_logps"},
            policy_chosen_logp=pairs["policy_chosen_logps"],
        )


def test_non_tensor_input(pairs: dict[str, torch.Tensor]) -> None:
    with pytest.raises(ObjectiveInputError, match=r"`weights` must be a torch\.Tensor, got list"):
        get_objective("dpo")(**pairs, weights=[1.0] * 6)


def test_bad_weights_and_lengths(pairs: dict[str, torch.Tensor]) -> None:
    with pytest.raises(ObjectiveInputError, match="`weights` must be non-negative"):
        get_objective("dpo")(**pairs, weights=torch.tensor([1.0, -1, 1, 1, 1, 1], dtype=torch.float64))
    with pytest.raises(ObjectiveInputError, match="`weights` must be non-negative with a positive sum"):
        get_objective("dpo")(**pairs, weights=torch.zeros(6, dtype=torch.float64))
    with pytest.raises(ObjectiveInputError, match="`chosen_lengths` must be positive"):
        get_objective("simpo")(**{**pairs, "chosen_lengths": torch.zeros(6)})


def test_listwise_shape_errors() -> None:
    pol = torch.zeros(3, 4)
    with pytest.raises(ObjectiveInputError, match=r"`rewards` has shape \(3, 5\)"):
        get_objective("nca")(policy_logps=pol, reference_logps=pol, rewards=torch.zeros(3, 5))
    with pytest.raises(ObjectiveInputError, match="K >= 2"):
        get_objective("nca")(policy_logps=pol[:, :1], reference_logps=pol[:, :1], rewards=pol[:, :1])
    with pytest.raises(ObjectiveInputError, match="requires `rewards`"):
        get_objective("infonca")(policy_logps=pol, reference_logps=pol)
    with pytest.raises(ObjectiveInputError, match="both listwise"):
        get_objective("infonca")(
            policy_logps=pol, reference_logps=pol, rewards=pol, policy_chosen_logps=pol[:, 0]
        )
    with pytest.raises(ObjectiveInputError, match="requires `policy_rejected_logps` with its pair"):
        get_objective("infonca")(
            policy_chosen_logps=pol[:, 0],
            reference_chosen_logps=pol[:, 0],
            reference_rejected_logps=pol[:, 0],
        )


def test_ppo_shape_errors() -> None:
    logp = torch.zeros(4, 3)
    with pytest.raises(ObjectiveInputError, match=r"`advantages` has shape \(3,\)"):
        get_objective("ppo_clip")(policy_logps=logp, old_policy_logps=logp, advantages=torch.zeros(3))
    with pytest.raises(ObjectiveInputError, match=r"`trust_weights` has shape \(3,\)"):
        get_objective("ppo_clip")(
            policy_logps=logp, old_policy_logps=logp, advantages=torch.zeros(4), trust_weights=torch.ones(3)
        )


def test_unknown_objective_suggests_close_names() -> None:
    with pytest.raises(KeyError, match=r"unknown objective 'dp0'.*'dpo'"):
        get_objective("dp0")


def test_bad_hyper_parameters_are_named() -> None:
    with pytest.raises(ConfigError, match="unknown key 'betta'; did you mean 'beta'"):
        get_objective("dpo", betta=0.1)
    with pytest.raises(ConfigError, match="'beta' must be a finite number, got 'high'"):
        get_objective("dpo", beta="high")
    with pytest.raises(ConfigError, match=r"beta must be > 0, got 0\.0"):
        get_objective("dpo", beta=0.0)
    with pytest.raises(ConfigError, match="'divergence' must be one of"):
        get_objective("fdpo", divergence="hellinger")
    with pytest.raises(ConfigError, match=r"label_smoothing must be in \[0, 0.5\)"):
        get_objective("robust", label_smoothing=0.5)
    with pytest.raises(ConfigError, match="'base' must be one of"):
        get_objective("mappo", base="orpo")


def test_duplicate_registration_names_both_classes() -> None:
    with pytest.raises(
        ValueError, match=r"'dpo' is already registered by diffalign\.objectives\.log_ratio\.DPO"
    ):

        @register_objective("dpo")
        class AnotherDPO(DPO):
            pass


def test_low_precision_is_computed_in_float64(pairs: dict[str, torch.Tensor]) -> None:
    half = {k: v.to(torch.bfloat16) for k, v in pairs.items()}
    out = get_objective("dpo")(**half)
    assert out.losses.dtype == torch.float64
    ref = get_objective("dpo")(**{k: v.double() for k, v in half.items()})
    torch.testing.assert_close(out.losses.double(), ref.losses, rtol=1e-6, atol=1e-6)


def test_apo_needs_both_previous_references(pairs: dict[str, torch.Tensor]) -> None:
    with pytest.raises(ObjectiveInputError, match="both `previous_reference_chosen_logps`"):
        get_objective("apo")(**pairs, previous_reference_chosen_logps=pairs["reference_chosen_logps"])


def full_inputs(kind: str) -> dict[str, torch.Tensor]:
    if kind == "pairwise":
        return make_pairs()
    if kind == "listwise":
        return {
            "policy_logps": -torch.rand(3, 4),
            "reference_logps": -torch.rand(3, 4),
            "rewards": torch.rand(3, 4),
            "lengths": torch.full((3, 4), 3.0),
        }
    return {"policy_logps": torch.zeros(4), "old_policy_logps": torch.zeros(4), "advantages": torch.randn(4)}


@pytest.mark.parametrize("name", list_objectives())
def test_every_objective_names_each_missing_or_non_finite_input(name: str) -> None:
    obj = get_objective(name)
    inputs = full_inputs(obj.kind)
    obj(**inputs)  # the full set is accepted
    for missing in obj.required_inputs():
        with pytest.raises(ObjectiveInputError, match=f"requires `{missing}`"):
            obj(**{k: v for k, v in inputs.items() if k != missing})
    first = obj.required_inputs()[0]
    bad = inputs[first].clone()
    bad.view(-1)[0] = float("nan")
    with pytest.raises(ObjectiveInputError, match=f"`{first}` contains NaN"):
        obj(**{**inputs, first: bad})
