"""Analytic gradients of every objective checked against finite differences in float64."""

from __future__ import annotations

import pytest
import torch
from pairs import make_pairs

from diffalign.objectives import get_objective, list_objectives

CONFIGS = [(n, {}) for n in list_objectives() if n not in ("kldo", "ppo_clip")] + [
    ("kldo", {"running_rate": None}),
    ("ipo", {"length_normalized": True}),
    ("fdpo", {"divergence": "forward_kl"}),
    ("fdpo", {"divergence": "js_divergence"}),
    ("fdpo", {"divergence": "alpha_divergence"}),
    ("mappo", {"base": "ipo"}),
    ("mappo", {"base": "simpo"}),
    ("mappo", {"base": "cpo"}),
    ("rso", {"loss_type": "hinge_norm"}),
    ("smoothed_dpo", {"beta": 0.5, "reward_min": 0.0, "reward_max": 1.0}),
]
DIFFERENTIABLE = ("policy_chosen_logps", "policy_rejected_logps")


@pytest.mark.parametrize(
    ("name", "hparams"), CONFIGS, ids=[f"{n}-{'-'.join(map(str, h.values()))}" for n, h in CONFIGS]
)
def test_gradcheck_pairwise_inputs(name: str, hparams: dict) -> None:
    obj = get_objective(name, **hparams)
    p = make_pairs(batch=4, seed=11)
    # hinge-type losses are not differentiable at the kink; keep away from it
    if name in ("hinge", "dro_ranking") or hparams.get("loss_type") == "hinge_norm":
        p["policy_chosen_logps"] = p["policy_chosen_logps"] - 3.0
    weights = torch.tensor([1.0, 0.5, 2.0, 1.5], dtype=torch.float64)
    inputs = tuple(p[k].clone().requires_grad_() for k in DIFFERENTIABLE)

    def loss(*xs: torch.Tensor) -> torch.Tensor:
        return obj(**{**p, **dict(zip(DIFFERENTIABLE, xs, strict=True)), "weights": weights}).loss

    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-5)
    grads = torch.autograd.grad(loss(*inputs), inputs)
    assert any(bool(g.abs().sum() > 0) for g in grads), "objective has no gradient"


def test_gradcheck_listwise() -> None:
    g = torch.Generator().manual_seed(12)
    pol = (-torch.rand(3, 4, generator=g, dtype=torch.float64) * 3).requires_grad_()
    ref = -torch.rand(3, 4, generator=g, dtype=torch.float64) * 3
    rew = torch.rand(3, 4, generator=g, dtype=torch.float64)
    for name in ("nca", "infonca"):
        obj = get_objective(name, beta=0.5, reward_temperature=0.3)
        assert torch.autograd.gradcheck(
            lambda x, o=obj: o(policy_logps=x, reference_logps=ref, rewards=rew).loss, (pol,)
        )


def test_gradcheck_ppo_clip() -> None:
    g = torch.Generator().manual_seed(13)
    old = torch.randn(4, 3, generator=g, dtype=torch.float64) * 0.1
    # half inside the trust region, half well outside it (away from the clip kinks)
    offsets = torch.tensor([[1e-4], [0.3], [-1e-4], [-0.3]], dtype=torch.float64)
    logp = (old + offsets).requires_grad_()
    adv = torch.tensor([1.0, 2.0, -1.0, -0.5], dtype=torch.float64)
    trust = torch.tensor([1.0, 1.5, 2.0, 1.2], dtype=torch.float64)
    obj = get_objective("ppo_clip", clip_range=0.01)
    assert torch.autograd.gradcheck(
        lambda x: obj(policy_logps=x, old_policy_logps=old, advantages=adv, trust_weights=trust).loss, (logp,)
    )
