"""Relations between objectives and symmetry properties that follow from the formulas."""

from __future__ import annotations

import math

import pytest
import torch
from pairs import make_pairs

from diffalign.objectives import ObjectiveInputError, get_objective, list_objectives

PAIRWISE = [n for n in list_objectives() if get_objective(n).kind == "pairwise"]


def swapped(p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in p.items():
        if "chosen" in k:
            out[k.replace("chosen", "rejected")] = v
        elif "rejected" in k:
            out[k.replace("rejected", "chosen")] = v
        else:
            out[k] = v
    return out


def test_every_listed_objective_is_registered() -> None:
    expected = {
        "dpo", "ipo", "cdpo", "robust", "hinge", "simpo", "cpo", "orpo", "mappo", "madpo", "fdpo",
        "nca", "infonca", "kldo", "rso", "smoothed_dpo", "dro_ranking", "ppo_clip",
    }  # fmt: skip
    assert expected <= set(list_objectives())


@pytest.mark.parametrize("name", ["dpo", "cdpo", "robust", "rso", "fdpo", "smoothed_dpo"])
def test_swap_turns_sigmoid_loss_into_its_complement(name: str, pairs: dict[str, torch.Tensor]) -> None:
    """-log s(z) - (-log s(-z)) = -z: swapping chosen and rejected negates the logit."""
    obj = get_objective(name, **({"reward_min": 0.0, "reward_max": 1.0} if name == "smoothed_dpo" else {}))
    a, b = obj(**pairs), obj(**swapped(pairs))
    z_from_a = a.metrics["rewards/margins"]
    assert b.metrics["rewards/margins"] == pytest.approx(-z_from_a)
    assert b.metrics["rewards/accuracies"] == pytest.approx(1 - a.metrics["rewards/accuracies"])
    if name in ("dpo", "rso", "fdpo"):  # plain Bradley-Terry: l(z) - l(-z) = -z exactly
        torch.testing.assert_close(
            a.losses - b.losses,
            -(obj.implicit_rewards(obj.validate(pairs))[0] - obj.implicit_rewards(obj.validate(pairs))[1]),
        )


def test_swap_is_symmetric_for_smoothed_dpo_with_rewards_swapped(pairs: dict[str, torch.Tensor]) -> None:
    """SmPO's soft label follows the rewards: swapping candidates and scores together is a no-op."""
    obj = get_objective("smoothed_dpo", reward_min=0.0, reward_max=1.0)
    torch.testing.assert_close(obj(**pairs).losses, obj(**swapped(pairs)).losses)


@pytest.mark.parametrize(
    "name", ["dpo", "cdpo", "robust", "rso", "fdpo", "smoothed_dpo", "madpo", "simpo", "infonca"]
)
def test_equal_inputs_give_log2(name: str) -> None:
    """Identical chosen and rejected: every Bradley-Terry-style loss sits at log 2 (SimPO: at its margin)."""
    p = make_pairs()
    p["policy_rejected_logps"] = p["policy_chosen_logps"].clone()
    p["reference_rejected_logps"] = p["reference_chosen_logps"].clone()
    p["rejected_lengths"] = p["chosen_lengths"].clone()
    p["rejected_rewards"] = p["chosen_rewards"].clone()
    out = get_objective(name)(**p)
    if name == "simpo":
        expected = -torch.nn.functional.logsigmoid(torch.tensor(-0.5, dtype=torch.float64))
        torch.testing.assert_close(out.losses, expected.expand(6))
    elif name == "madpo":  # margin 0 -> weight sigma(0)/sigma(0) = 1
        torch.testing.assert_close(out.losses, torch.full((6,), math.log(2), dtype=torch.float64))
    else:
        torch.testing.assert_close(out.losses, torch.full((6,), math.log(2), dtype=torch.float64))
    assert out.metrics["rewards/margins"] == 0.0
    assert out.metrics["rewards/accuracies"] == 0.0


def test_ipo_equal_inputs_is_squared_margin() -> None:
    p = make_pairs()
    p["policy_rejected_logps"] = p["policy_chosen_logps"]
    p["reference_rejected_logps"] = p["reference_chosen_logps"]
    out = get_objective("ipo", beta=0.25)(**p)
    torch.testing.assert_close(out.losses, torch.full((6,), (1 / (2 * 0.25)) ** 2, dtype=torch.float64))


@pytest.mark.parametrize("base", ["dpo", "ipo", "simpo", "cpo"])
def test_mappo_with_reward_gap_one_equals_base(base: str, pairs: dict[str, torch.Tensor]) -> None:
    p = {
        **pairs,
        "chosen_rewards": torch.ones(6, dtype=torch.float64),
        "rejected_rewards": torch.zeros(6, dtype=torch.float64),
    }
    torch.testing.assert_close(get_objective("mappo", base=base)(**p).losses, get_objective(base)(**p).losses)


def test_mappo_with_reward_gap_zero_ignores_rejected(pairs: dict[str, torch.Tensor]) -> None:
    p = {
        **pairs,
        "chosen_rewards": torch.full((6,), 0.5, dtype=torch.float64),
        "rejected_rewards": torch.full((6,), 0.5, dtype=torch.float64),
    }
    out = get_objective("mappo", beta=0.1)(**p)
    rho_w = pairs["policy_chosen_logps"] - pairs["reference_chosen_logps"]
    torch.testing.assert_close(out.losses, -torch.nn.functional.logsigmoid(0.1 * rho_w))


def test_mappo_maps_raw_scores_with_bounds(pairs: dict[str, torch.Tensor]) -> None:
    """Scores on a 0-10 scale with bounds (0, 10) behave like the same scores divided by 10."""
    scaled = {
        **pairs,
        "chosen_rewards": pairs["chosen_rewards"] * 10,
        "rejected_rewards": pairs["rejected_rewards"] * 10,
    }
    a = get_objective("mappo", reward_min=0.0, reward_max=10.0)(**scaled)
    b = get_objective("mappo")(**pairs)
    torch.testing.assert_close(a.losses, b.losses)


def test_smoothed_dpo_with_hard_labels_equals_dpo(pairs: dict[str, torch.Tensor]) -> None:
    ones = torch.ones(6, dtype=torch.float64)
    unscored = {k: v for k, v in pairs.items() if "rewards" not in k}
    smpo = get_objective("smoothed_dpo", beta=0.1, gamma=1.0)(**unscored, preference_probs=ones)
    torch.testing.assert_close(smpo.losses, get_objective("dpo", beta=0.1)(**pairs).losses)


def test_smoothed_dpo_takes_its_label_from_the_scores_when_given(pairs: dict[str, torch.Tensor]) -> None:
    """A recipe passes its pairs' hard labels alongside the scores: SmPO's label still comes from
    the scores (it used to be overridden by p = 1), and a soft label there is a conflict."""
    obj = get_objective("smoothed_dpo", reward_min=0.0, reward_max=1.0)
    ones = torch.ones(6, dtype=torch.float64)
    torch.testing.assert_close(obj(**pairs, preference_probs=ones).losses, obj(**pairs).losses)
    assert obj(**pairs, preference_probs=ones).metrics["smpo/soft_label"] != pytest.approx(1.0)
    with pytest.raises(ObjectiveInputError, match="both reward scores and soft preference labels"):
        obj(**pairs, preference_probs=torch.full((6,), 0.5, dtype=torch.float64))


def test_smoothed_dpo_fades_as_scores_converge(pairs: dict[str, torch.Tensor]) -> None:
    """Equal reward scores: p = 1/2, zero gradient, loss log 2 whatever the policy does."""
    pc = pairs["policy_chosen_logps"].clone().requires_grad_()
    p = {**pairs, "policy_chosen_logps": pc, "rejected_rewards": pairs["chosen_rewards"]}
    out = get_objective("smoothed_dpo")(**p)
    out.loss.backward()
    assert torch.count_nonzero(pc.grad) == 0
    torch.testing.assert_close(out.losses, torch.full((6,), math.log(2), dtype=torch.float64))
    assert out.metrics["smpo/soft_label"] == pytest.approx(0.5)


def test_smoothed_dpo_soft_label_from_normalised_scores(pairs: dict[str, torch.Tensor]) -> None:
    obj = get_objective("smoothed_dpo")  # PickScore-cosine bounds
    p = {
        **pairs,
        "chosen_rewards": torch.full((6,), 0.25, dtype=torch.float64),
        "rejected_rewards": torch.full((6,), 0.20, dtype=torch.float64),
    }
    lo, hi = 0.11543526500463486, 0.28201571106910706
    a, b = (0.25 - lo) / (hi - lo), (0.20 - lo) / (hi - lo)
    expected = math.exp(a) / (math.exp(a) + math.exp(b))
    assert obj(**p).metrics["smpo/soft_label"] == pytest.approx(expected, rel=1e-12)


def test_pairwise_infonca_equals_dpo(pairs: dict[str, torch.Tensor]) -> None:
    infonca = get_objective("infonca", beta=0.1)
    dpo = get_objective("dpo", beta=0.1)
    unscored = {k: v for k, v in pairs.items() if "rewards" not in k}  # no scores: hard label
    torch.testing.assert_close(infonca(**unscored).losses, dpo(**pairs).losses)
    # the same through listwise inputs with K = 2 and a (numerically) hard label
    listwise = {
        "policy_logps": torch.stack([pairs["policy_chosen_logps"], pairs["policy_rejected_logps"]], 1),
        "reference_logps": torch.stack(
            [pairs["reference_chosen_logps"], pairs["reference_rejected_logps"]], 1
        ),
        "rewards": torch.tensor([[1.0, 0.0]] * 6, dtype=torch.float64),
    }
    hard = get_objective("infonca", beta=0.1, reward_temperature=1e-3)(**listwise)
    torch.testing.assert_close(hard.losses, dpo(**pairs).losses)
    assert hard.metrics["rewards/margins"] == pytest.approx(dpo(**pairs).metrics["rewards/margins"])


def test_fdpo_reverse_kl_equals_dpo(pairs: dict[str, torch.Tensor]) -> None:
    torch.testing.assert_close(get_objective("fdpo")(**pairs).losses, get_objective("dpo")(**pairs).losses)


def test_fdpo_alpha_divergence_tends_to_reverse_kl_as_alpha_vanishes(pairs: dict[str, torch.Tensor]) -> None:
    """(1 - u^-a)/a -> log u as a -> 0."""
    a = get_objective("fdpo", divergence="alpha_divergence", alpha=1e-6)(**pairs).losses
    torch.testing.assert_close(a, get_objective("dpo")(**pairs).losses, rtol=1e-5, atol=1e-6)


def test_cdpo_and_robust_reduce_to_dpo_without_noise(pairs: dict[str, torch.Tensor]) -> None:
    dpo = get_objective("dpo")(**pairs).losses
    torch.testing.assert_close(get_objective("cdpo", label_smoothing=0.0)(**pairs).losses, dpo)
    torch.testing.assert_close(get_objective("robust", label_smoothing=0.0)(**pairs).losses, dpo)


def test_robust_is_unbiased_under_label_flips(pairs: dict[str, torch.Tensor]) -> None:
    """E over flips with rate e of the robust loss equals the clean DPO loss (the paper's claim)."""
    e = 0.2
    robust = get_objective("robust", label_smoothing=e)
    expected = (1 - e) * robust(**pairs).losses + e * robust(**swapped(pairs)).losses
    torch.testing.assert_close(expected, get_objective("dpo")(**pairs).losses)


def test_rso_losses_are_dpo_and_hinge_at_gamma(pairs: dict[str, torch.Tensor]) -> None:
    torch.testing.assert_close(
        get_objective("rso", beta=0.3)(**pairs).losses, get_objective("dpo", beta=0.3)(**pairs).losses
    )
    torch.testing.assert_close(
        get_objective("rso", beta=0.3, loss_type="hinge_norm")(**pairs).losses,
        get_objective("hinge", beta=0.3)(**pairs).losses,
    )


def test_simpo_and_orpo_ignore_the_reference(pairs: dict[str, torch.Tensor]) -> None:
    for name in ("simpo", "cpo", "orpo"):
        obj = get_objective(name)
        assert not obj.uses_reference
        no_ref = {k: v for k, v in pairs.items() if not k.startswith("reference")}
        torch.testing.assert_close(obj(**no_ref).losses, obj(**pairs).losses)
    assert get_objective("dpo").uses_reference
    assert not get_objective("dpo", reference_free=True).uses_reference
    assert get_objective("mappo", base="dpo").uses_reference
    assert not get_objective("mappo", base="simpo").uses_reference


def test_simpo_without_lengths_takes_averages(pairs: dict[str, torch.Tensor]) -> None:
    averaged = {
        **pairs,
        "policy_chosen_logps": pairs["policy_chosen_logps"] / pairs["chosen_lengths"],
        "policy_rejected_logps": pairs["policy_rejected_logps"] / pairs["rejected_lengths"],
    }
    del averaged["chosen_lengths"], averaged["rejected_lengths"]
    torch.testing.assert_close(
        get_objective("simpo")(**averaged).losses, get_objective("simpo")(**pairs).losses
    )


def test_dro_ranking_is_zero_once_the_margin_is_met(pairs: dict[str, torch.Tensor]) -> None:
    p = {
        **pairs,
        "policy_chosen_logps": pairs["reference_chosen_logps"] + 1.0,
        "policy_rejected_logps": pairs["reference_rejected_logps"],
    }
    out = get_objective("dro_ranking")(**p)
    assert torch.count_nonzero(out.losses) == 0
    assert out.metrics["dro/active_fraction"] == 0.0


def test_ppo_clip_is_flat_outside_the_trust_region() -> None:
    """Ratio above 1 + eps with a positive advantage: the clipped branch wins, gradient 0."""
    logp = torch.tensor([0.1, -0.1, 0.0], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(3, dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
    out = get_objective("ppo_clip", clip_range=0.01)(policy_logps=logp, old_policy_logps=old, advantages=adv)
    out.loss.backward()
    assert logp.grad[0] == 0 and logp.grad[1] == 0  # both outside [0.99, 1.01] on the clipped side
    assert logp.grad[2] == pytest.approx(-1 / 3)  # ratio 1: d(-A r)/dlogp = -A, mean over 3
    assert out.metrics["policy/clipfrac"] == pytest.approx(2 / 3)


def test_nca_moves_absolute_likelihoods() -> None:
    """Raising every candidate's log-ratio together leaves InfoNCA unchanged but not NCA."""
    pol = torch.tensor([[-1.0, -2.0, -3.0]], dtype=torch.float64)
    ref = torch.zeros_like(pol)
    rew = torch.tensor([[1.0, 0.5, 0.0]], dtype=torch.float64)
    for name, changes in (("infonca", False), ("nca", True)):
        obj = get_objective(name, beta=1.0, reward_temperature=0.5)
        a = obj(policy_logps=pol, reference_logps=ref, rewards=rew).loss
        b = obj(policy_logps=pol + 1.0, reference_logps=ref, rewards=rew).loss
        assert (abs(float(a - b)) > 1e-3) == changes


@pytest.mark.parametrize("name", PAIRWISE)
def test_accuracy_metric_follows_implicit_rewards(name: str, pairs: dict[str, torch.Tensor]) -> None:
    obj = get_objective(name)
    out = obj(**pairs)
    chosen, rejected = obj.implicit_rewards(obj.validate(pairs))
    assert out.metrics["rewards/accuracies"] == pytest.approx(float((chosen > rejected).double().mean()))
    assert out.losses.shape == (6,)
