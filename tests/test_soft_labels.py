"""Soft preference labels (`preference_probs`): a tie trains towards 1/2, never as a win.

The input of issue 12 (from Pick-a-Pic's ties read with `data.ties=half`): DPO's loss 0.313262
for a pair won outright must become 0.813262 for the same pair labelled 1/2.
"""

from __future__ import annotations

import math

import pytest
import torch
from pairs import make_pairs

from diffalign.objectives import ObjectiveInputError, get_objective, list_objectives
from diffalign.objectives.base import PAIRWISE_INPUTS

ALL = list_objectives()
MIXTURE = [n for n in ALL if get_objective(n).soft_label_mode == "mixture"]
REFUSING = [n for n in ALL if "preference_probs" in get_objective(n).accepted_inputs]
REFUSING = [n for n in REFUSING if not get_objective(n).accepts_soft_labels]
LABELS = torch.tensor([1.0, 0.0, 0.5, 0.3, 0.9, 0.7], dtype=torch.float64)


def swapped(p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in p.items():
        out[k.replace("chosen", "@").replace("rejected", "chosen").replace("@", "rejected")] = v
    return out


def test_dpo_trains_a_tie_towards_one_half() -> None:
    zeros = torch.zeros(4, dtype=torch.float64)
    h = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64, requires_grad=True)
    inputs = {
        "policy_chosen_logps": h, "policy_rejected_logps": zeros,
        "reference_chosen_logps": zeros, "reference_rejected_logps": zeros,
    }  # fmt: skip
    dpo = get_objective("dpo", beta=1.0)
    labels = torch.tensor([1.0, 1.0, 0.5, 0.5], dtype=torch.float64)
    out = dpo(**inputs, preference_probs=labels)
    assert out.losses[:2].tolist() == pytest.approx([0.313262, 0.313262], abs=1e-6)
    assert out.losses[2].item() == pytest.approx(0.813262, abs=1e-6)  # -0.5 log s(1) - 0.5 log s(-1)
    assert out.losses[3].item() == pytest.approx(math.log(2))
    out.loss.backward()
    assert h.grad[3].item() == 0.0  # a tie at h = 0 is where it should be: no gradient
    assert h.grad[2].item() > 0  # a tie with h = 1 is pushed back towards 0 (the loss falls as h falls)


@pytest.mark.parametrize("name", MIXTURE)
def test_a_tie_has_no_gradient_between_equal_candidates(name: str) -> None:
    """A tie between two candidates the policy rates equally (h = 0) is where it should be: the
    gradient pushes neither above the other, whatever else (scores, lengths) tells them apart."""
    pairs = make_pairs()
    for k in ("policy", "reference"):
        pairs[f"{k}_rejected_logps"] = pairs[f"{k}_chosen_logps"].clone()
    pairs["rejected_lengths"] = pairs["chosen_lengths"].clone()
    w = pairs["policy_chosen_logps"].requires_grad_()
    lose = pairs["policy_rejected_logps"].requires_grad_()
    get_objective(name)(**pairs, preference_probs=torch.full((6,), 0.5, dtype=torch.float64)).loss.backward()
    torch.testing.assert_close(w.grad, lose.grad)  # any push moves both alike


@pytest.mark.parametrize("name", MIXTURE)
def test_soft_label_is_the_expected_loss_over_the_order(name: str) -> None:
    pairs = make_pairs()
    obj = get_objective(name)
    won, lost = obj(**pairs).losses, obj(**swapped(pairs)).losses
    soft = obj(**pairs, preference_probs=LABELS).losses
    torch.testing.assert_close(soft, LABELS * won + (1 - LABELS) * lost)
    hard = obj(**pairs, preference_probs=torch.ones(6, dtype=torch.float64)).losses
    assert torch.equal(hard, won)  # p = 1 is the plain loss, bit for bit
    assert not torch.allclose(soft[2:], won[2:])  # and a soft label changes it


@pytest.mark.parametrize("name", REFUSING)
def test_objectives_with_no_use_for_a_soft_label_refuse_it(name: str) -> None:
    pairs = make_pairs()
    obj = get_objective(name)
    obj(**pairs, preference_probs=torch.ones(6, dtype=torch.float64))  # hard labels are fine
    with pytest.raises(ObjectiveInputError, match=rf"objective '{name}' cannot use soft preference labels"):
        get_objective(name)(**pairs, preference_probs=LABELS)


@pytest.mark.parametrize("name", [n for n in ALL if "preference_probs" in get_objective(n).accepted_inputs])
def test_no_objective_ignores_a_soft_label(name: str) -> None:
    """Every objective that accepts `preference_probs` either changes its loss for a tie or refuses it."""
    pairs = make_pairs()
    if get_objective(name).kind == "listwise":
        pairs = {k: v for k, v in pairs.items() if "rewards" not in k and k in PAIRWISE_INPUTS}
    ties = torch.full((6,), 0.5, dtype=torch.float64)
    try:
        soft = get_objective(name)(**pairs, preference_probs=ties).losses
    except ObjectiveInputError as err:
        assert name in str(err)
        return
    assert not torch.allclose(soft, get_objective(name)(**pairs).losses)


def test_listwise_objectives_take_the_soft_label_as_their_targets() -> None:
    pairs = {k: v for k, v in make_pairs().items() if "rewards" not in k}
    torch.testing.assert_close(
        get_objective("infonca", beta=0.1)(**pairs, preference_probs=LABELS).losses,
        get_objective("dpo", beta=0.1)(**pairs, preference_probs=LABELS).losses,
    )  # K = 2: InfoNCA with targets (p, 1 - p) is DPO's Bradley-Terry cross-entropy
    nca = get_objective("nca", beta=0.1)(**pairs, preference_probs=LABELS).losses
    r = 0.1 * torch.stack(
        [pairs["policy_chosen_logps"] - pairs["reference_chosen_logps"],
         pairs["policy_rejected_logps"] - pairs["reference_rejected_logps"]], 1
    )  # fmt: skip
    targets = torch.stack([LABELS, 1 - LABELS], 1)
    ls = torch.nn.functional.logsigmoid
    torch.testing.assert_close(nca, -(targets * ls(r)).sum(1) - ls(-r).mean(1))
    scored = {k: v for k, v in make_pairs().items() if "lengths" not in k}
    for name in ("nca", "infonca", "smoothed_dpo"):  # their targets come from the scores
        with pytest.raises(ObjectiveInputError, match="both reward scores and soft preference labels"):
            get_objective(name)(**scored, preference_probs=LABELS)


def test_soft_labels_outside_the_unit_interval_are_refused() -> None:
    for name in ("dpo", "infonca", "smoothed_dpo"):
        pairs = {k: v for k, v in make_pairs().items() if "rewards" not in k}
        with pytest.raises(ObjectiveInputError, match=r"`preference_probs` must lie in \[0, 1\]"):
            get_objective(name)(**pairs, preference_probs=torch.full((6,), 1.5, dtype=torch.float64))
