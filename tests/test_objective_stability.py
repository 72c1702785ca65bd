"""No NaN or inf at extreme margins (|margin| = 1e4) in float32 and bfloat16."""

from __future__ import annotations

import pytest
import torch

from diffalign.objectives import get_objective, list_objectives

EXTRA = {
    "ipo": [{"length_normalized": True}],
    "fdpo": [{"divergence": d} for d in ("forward_kl", "js_divergence", "alpha_divergence")],
}
CASES = [(n, {}) for n in list_objectives()] + [(n, h) for n, hs in EXTRA.items() for h in hs]


def extreme_inputs(dtype: torch.dtype, sign: float) -> dict[str, torch.Tensor]:
    big = torch.tensor([1e4, -1e4, 5e3, -5e3], dtype=dtype) * sign
    zero = torch.zeros(4, dtype=dtype)
    return {
        "policy_chosen_logps": (-1 - big.abs() * (big < 0)).to(dtype),  # logps stay <= 0
        "policy_rejected_logps": (-1 - big.abs() * (big > 0)).to(dtype),
        "reference_chosen_logps": zero - 1,
        "reference_rejected_logps": zero - 1,
        "chosen_rewards": torch.tensor([1e4, -1e4, 0.0, 1.0], dtype=dtype) * sign,
        "rejected_rewards": zero,
        "chosen_lengths": torch.full((4,), 3.0, dtype=dtype),
        "rejected_lengths": torch.full((4,), 5.0, dtype=dtype),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize(("name", "hparams"), CASES, ids=[f"{n}{h}" for n, h in CASES])
def test_no_nan_or_inf_at_huge_margins(name: str, hparams: dict, dtype: torch.dtype, sign: float) -> None:
    obj = get_objective(name, **hparams)
    p = extreme_inputs(dtype, sign)
    if obj.kind == "policy_gradient":
        logp = p["policy_chosen_logps"].clone().requires_grad_()
        out = obj(
            policy_logps=logp, old_policy_logps=p["policy_rejected_logps"], advantages=p["chosen_rewards"]
        )
        leaves = [logp]
    else:
        leaves = [
            p["policy_chosen_logps"].clone().requires_grad_(),
            p["policy_rejected_logps"].clone().requires_grad_(),
        ]
        out = obj(**{**p, "policy_chosen_logps": leaves[0], "policy_rejected_logps": leaves[1]})
    out.loss.backward()
    assert out.losses.dtype in (torch.float32, torch.float64)
    assert bool(out.losses.isfinite().all()), out.losses
    assert all(bool(leaf.grad.isfinite().all()) for leaf in leaves)
    assert all(v == v and abs(v) != float("inf") for v in out.metrics.values()), out.metrics


def test_kldo_running_average_survives_a_jump() -> None:
    """A batch whose implicit rewards jump by 1e4 after a normal one must stay finite."""
    kldo = get_objective("kldo", beta=1.0)
    zero = torch.zeros(4)
    normal = {
        "policy_chosen_logps": zero - 1,
        "policy_rejected_logps": zero - 2,
        "reference_chosen_logps": zero - 1,
        "reference_rejected_logps": zero - 1,
    }
    kldo(**normal)
    jump = {**normal, "policy_rejected_logps": torch.tensor([1e4, 0.0, -1.0, 1.0])}
    out = kldo(**jump)
    assert bool(out.losses.isfinite().all())
