"""Each objective's value against its paper's formula, computed element by element in float64
with the ``math`` module (independently of the tensor code under test)."""

from __future__ import annotations

import math

import pytest
import torch
from pairs import make_pairs

from diffalign.objectives import get_objective


def logsig(z: float) -> float:
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def rows(p: dict[str, torch.Tensor]) -> list[dict[str, float]]:
    n = len(p["policy_chosen_logps"])
    return [{k: float(v[i]) for k, v in p.items()} for i in range(n)]


def h(r: dict[str, float]) -> float:
    return (r["policy_chosen_logps"] - r["reference_chosen_logps"]) - (
        r["policy_rejected_logps"] - r["reference_rejected_logps"]
    )


def rho(r: dict[str, float], side: str) -> float:
    return r[f"policy_{side}_logps"] - r[f"reference_{side}_logps"]


def avg(r: dict[str, float], side: str) -> float:
    return r[f"policy_{side}_logps"] / r[f"{side}_lengths"]


def mappo_gap(r: dict[str, float]) -> float:
    """MaPPO's default prior: the paper's logistic map of raw scores, sigma(s_w) - sigma(s_l), in [0, 1]."""
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    return min(max(sig(r["chosen_rewards"]) - sig(r["rejected_rewards"]), 0.0), 1.0)


EXPECTED = {
    "dpo": ({"beta": 0.1}, lambda r: -logsig(0.1 * h(r))),
    "dpo_beta5000": ({"beta": 5000.0}, lambda r: -logsig(5000.0 * h(r))),
    "ipo": ({"beta": 0.1}, lambda r: (h(r) - 1 / (2 * 0.1)) ** 2),
    "ipo_length": (
        {"beta": 0.5, "length_normalized": True},
        lambda r: (
            (rho(r, "chosen") / r["chosen_lengths"] - rho(r, "rejected") / r["rejected_lengths"] - 1.0) ** 2
        ),
    ),
    "cdpo": (
        {"beta": 0.3, "label_smoothing": 0.2},
        lambda r: -0.8 * logsig(0.3 * h(r)) - 0.2 * logsig(-0.3 * h(r)),
    ),
    "robust": (
        {"beta": 0.3, "label_smoothing": 0.2},
        lambda r: (-0.8 * logsig(0.3 * h(r)) + 0.2 * logsig(-0.3 * h(r))) / 0.6,
    ),
    "hinge": ({"beta": 0.4}, lambda r: max(0.0, 1 - 0.4 * h(r))),
    "hinge_reference_free": (
        {"beta": 0.4, "reference_free": True},
        lambda r: max(0.0, 1 - 0.4 * (r["policy_chosen_logps"] - r["policy_rejected_logps"])),
    ),
    "rso": ({"beta": 0.05}, lambda r: -logsig(0.05 * h(r))),
    "rso_hinge": ({"beta": 0.05, "loss_type": "hinge_norm"}, lambda r: max(0.0, 1 - 0.05 * h(r))),
    "simpo": (
        {"beta": 2.0, "gamma_beta_ratio": 0.25},
        lambda r: -logsig(2.0 * avg(r, "chosen") - 2.0 * avg(r, "rejected") - 0.5),
    ),
    "cpo": (
        {"beta": 0.1, "nll_weight": 1.0},
        lambda r: -logsig(0.1 * (r["policy_chosen_logps"] - r["policy_rejected_logps"])) - avg(r, "chosen"),
    ),
    "orpo": (
        {"odds_ratio_weight": 0.1},
        lambda r: (
            -avg(r, "chosen")
            - 0.1
            * logsig(
                math.log(math.exp(avg(r, "chosen")) / (1 - math.exp(avg(r, "chosen"))))
                - math.log(math.exp(avg(r, "rejected")) / (1 - math.exp(avg(r, "rejected"))))
            )
        ),
    ),
    "fdpo_forward_kl": (
        {"beta": 0.1, "divergence": "forward_kl"},
        lambda r: -logsig(0.1 * (-1 / math.exp(rho(r, "chosen")) + 1 / math.exp(rho(r, "rejected")))),
    ),
    "fdpo_js": (
        {"beta": 0.1, "divergence": "js_divergence"},
        lambda r: (
            -logsig(
                0.1
                * (
                    math.log(2 * math.exp(rho(r, "chosen")) / (1 + math.exp(rho(r, "chosen"))))
                    - math.log(2 * math.exp(rho(r, "rejected")) / (1 + math.exp(rho(r, "rejected"))))
                )
            )
        ),
    ),
    "fdpo_alpha": (
        {"beta": 0.1, "divergence": "alpha_divergence", "alpha": 0.3},
        lambda r: (
            -logsig(
                0.1
                * (
                    (1 - math.exp(rho(r, "chosen")) ** -0.3) / 0.3
                    - (1 - math.exp(rho(r, "rejected")) ** -0.3) / 0.3
                )
            )
        ),
    ),
    "mappo": (
        {"beta": 0.1},
        lambda r: -logsig(0.1 * rho(r, "chosen") - mappo_gap(r) * 0.1 * rho(r, "rejected")),
    ),
    "mappo_min_max": (
        {"beta": 0.1, "reward_mapping": "min_max", "reward_min": -1.0, "reward_max": 1.5},
        lambda r: (
            -logsig(
                0.1 * rho(r, "chosen")
                - min(max((r["chosen_rewards"] - r["rejected_rewards"]) / 2.5, 0.0), 1.0)
                * 0.1
                * rho(r, "rejected")
            )
        ),
    ),
    "mappo_ipo": (
        {"base": "ipo", "beta": 0.1},
        lambda r: (rho(r, "chosen") - mappo_gap(r) * rho(r, "rejected") - 1 / (2 * 0.1)) ** 2,
    ),
    "mappo_simpo": (
        {"base": "simpo", "beta": 2.0},
        lambda r: -logsig(2.0 * avg(r, "chosen") - mappo_gap(r) * 2.0 * avg(r, "rejected") - 0.5),
    ),
    "mappo_cpo": (
        {"base": "cpo", "beta": 0.1},
        lambda r: (
            -logsig(0.1 * r["policy_chosen_logps"] - mappo_gap(r) * 0.1 * r["policy_rejected_logps"])
            - avg(r, "chosen")
        ),
    ),
    "smoothed_dpo": (
        {"beta": 2000.0, "gamma": 10.0, "reward_min": 0.0, "reward_max": 2.0},
        lambda r: (
            -logsig(
                10.0
                * (
                    2
                    * math.exp(r["chosen_rewards"] / 2)
                    / (math.exp(r["chosen_rewards"] / 2) + math.exp(r["rejected_rewards"] / 2))
                    - 1
                )
                * 2000.0
                * h(r)
            )
        ),
    ),
    "dro_ranking": (
        {},
        # the official code's max(diff + 0.001, 0) with mse = -2 * logp
        lambda r: max(
            (-2 * r["policy_chosen_logps"] + 2 * r["reference_chosen_logps"])
            - (-2 * r["policy_rejected_logps"] + 2 * r["reference_rejected_logps"])
            + 0.001,
            0.0,
        ),
    ),
}


def madpo_expected(r: dict[str, float]) -> float:
    c_max, c_min, lam, tau = 2.0, 0.5, 1.0, math.log(999)
    m = 8 * (r["chosen_rewards"] - r["rejected_rewards"])  # spread margins over the interesting range
    c = c_min + (c_max - c_min) / (1 + ((c_max - 1) / (1 - c_min)) * math.exp(lam * (abs(m) - tau)))
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    w = sig(c * m) / sig(m) if m > -tau else 1.0
    return w * -logsig(0.1 * h(r))


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_value_matches_formula(case: str) -> None:
    name = (
        case.split("_")[0] if case.split("_")[0] in ("dpo", "ipo", "hinge", "rso", "fdpo", "mappo") else case
    )
    hparams, formula = EXPECTED[case]
    p = make_pairs(batch=8, seed=1)
    out = get_objective(name, **hparams)(**p)
    expected = torch.tensor([formula(r) for r in rows(p)], dtype=torch.float64)
    torch.testing.assert_close(out.losses, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.loss, expected.mean(), rtol=1e-10, atol=1e-12)


def test_madpo_value() -> None:
    p = make_pairs(batch=8, seed=2)
    p["chosen_rewards"] = p["chosen_rewards"] * 8
    p["rejected_rewards"] = p["rejected_rewards"] * 8
    expected = [
        madpo_expected(
            {**r, "chosen_rewards": r["chosen_rewards"] / 8, "rejected_rewards": r["rejected_rewards"] / 8}
        )
        for r in rows(p)
    ]
    out = get_objective("madpo")(**p)
    torch.testing.assert_close(
        out.losses, torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-12
    )


def test_madpo_weight_shape() -> None:
    """c(tau) = 1: weight 1 at |m| = tau; above 1 on hard positive pairs, below 1 on easy ones."""
    madpo = get_objective("madpo")
    m = torch.tensor([math.log(999), 0.5, 20.0, -20.0], dtype=torch.float64)
    w = madpo.instance_weights(m)
    assert w[0] == pytest.approx(1.0, abs=1e-12)
    assert w[1] > 1.0
    assert w[2] < 1.0
    assert w[3] == 1.0


def test_infonca_and_nca_values() -> None:
    g = torch.Generator().manual_seed(3)
    pol = -torch.rand(5, 4, generator=g, dtype=torch.float64) * 4
    ref = -torch.rand(5, 4, generator=g, dtype=torch.float64) * 4
    rew = torch.rand(5, 4, generator=g, dtype=torch.float64) * 3
    beta, alpha = 0.5, 0.7
    for name in ("infonca", "nca"):
        out = get_objective(name, beta=beta, reward_temperature=alpha)(
            policy_logps=pol, reference_logps=ref, rewards=rew
        )
        expected = []
        for b in range(5):
            rhat = [beta * (float(pol[b, i]) - float(ref[b, i])) for i in range(4)]
            ex = [math.exp(float(rew[b, i]) / alpha) for i in range(4)]
            p = [e / sum(ex) for e in ex]
            if name == "infonca":
                lse = math.log(sum(math.exp(v) for v in rhat))
                expected.append(-sum(p[i] * (rhat[i] - lse) for i in range(4)))
            else:
                expected.append(
                    -sum(p[i] * logsig(rhat[i]) for i in range(4)) - sum(logsig(-v) for v in rhat) / 4
                )
        torch.testing.assert_close(
            out.losses, torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-12
        )


def test_kldo_value_is_donsker_varadhan() -> None:
    p = make_pairs(batch=8, seed=4)
    beta = 0.7
    out = get_objective("kldo", beta=beta, running_rate=None)(**p)
    rs = rows(p)
    r_w = [beta * rho(r, "chosen") for r in rs]
    r_l = [beta * rho(r, "rejected") for r in rs]
    dv = -sum(r_w) / len(r_w) + math.log(sum(math.exp(v) for v in r_l) / len(r_l))
    assert float(out.loss) == pytest.approx(dv, rel=1e-10)
    assert out.metrics["kldo/kl_estimate"] == pytest.approx(-dv, rel=1e-10)


def test_kldo_gradient_is_donsker_varadhan_gradient() -> None:
    p = make_pairs(batch=6, seed=5)
    pc = p["policy_chosen_logps"].clone().requires_grad_()
    pr = p["policy_rejected_logps"].clone().requires_grad_()
    out = get_objective("kldo", beta=0.7, running_rate=None)(
        **{**p, "policy_chosen_logps": pc, "policy_rejected_logps": pr}
    )
    out.loss.backward()
    pc2 = p["policy_chosen_logps"].clone().requires_grad_()
    pr2 = p["policy_rejected_logps"].clone().requires_grad_()
    r_w = 0.7 * (pc2 - p["reference_chosen_logps"])
    r_l = 0.7 * (pr2 - p["reference_rejected_logps"])
    dv = -r_w.mean() + torch.logsumexp(r_l, 0) - math.log(6)
    dv.backward()
    torch.testing.assert_close(pc.grad, pc2.grad)
    torch.testing.assert_close(pr.grad, pr2.grad)


def test_kldo_running_average_denominator() -> None:
    """With a running average, the gradient's denominator is the bias-corrected EMA of the batch
    means of exp(r_l); on the first step the correction makes it the batch mean."""
    kldo = get_objective("kldo", beta=1.0, running_rate=0.1)
    batches = [make_pairs(batch=6, seed=s) for s in (6, 7)]
    means = []
    for step, p in enumerate(batches):
        pr = p["policy_rejected_logps"].clone().requires_grad_()
        kldo(**{**p, "policy_rejected_logps": pr}).loss.backward()
        r_l = p["policy_rejected_logps"] - p["reference_rejected_logps"]
        means.append(float(torch.exp(r_l).mean()))
        ema = sum(0.1 * 0.9 ** (len(means) - 1 - i) * m for i, m in enumerate(means)) / (
            1 - 0.9 ** len(means)
        )
        torch.testing.assert_close(pr.grad, torch.exp(r_l) / ema / 6, msg=f"step {step}")


def test_ppo_clip_value() -> None:
    g = torch.Generator().manual_seed(8)
    logp = torch.randn(6, 3, generator=g, dtype=torch.float64) * 0.01
    old = logp + torch.randn(6, 3, generator=g, dtype=torch.float64) * 0.01
    adv = torch.tensor([-12.0, -1.0, 0.0, 0.5, 3.0, 9.0], dtype=torch.float64)
    trust = torch.tensor([1.0, 2.0, 1.5, 1.0, 2.21, 1.0], dtype=torch.float64)
    eps = 1e-3
    out = get_objective("ppo_clip", clip_range=eps, advantage_clip=5.0)(
        policy_logps=logp, old_policy_logps=old, advantages=adv, trust_weights=trust
    )
    expected = []
    for b in range(6):
        a = min(max(float(adv[b]), -5.0), 5.0)
        steps = []
        for t in range(3):
            ratio = math.exp(float(logp[b, t]) - float(old[b, t]))
            steps.append(max(-a * ratio, -a * min(max(ratio, 1 - eps), 1 + eps)))
        expected.append(float(trust[b]) * sum(steps) / 3)
    torch.testing.assert_close(
        out.losses, torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-14
    )


def test_weighted_reduction(pairs: dict[str, torch.Tensor]) -> None:
    w = torch.tensor([0.0, 1.0, 2.0, 0.5, 3.0, 1.0], dtype=torch.float64)
    out = get_objective("dpo")(**pairs, weights=w)
    assert float(out.loss) == pytest.approx(float((out.losses * w).sum() / w.sum()), rel=1e-12)
    assert float(out.loss) != pytest.approx(float(out.losses.mean()), rel=1e-6)
    # weights change the reduction only, never the per-example losses
    torch.testing.assert_close(out.losses, get_objective("dpo")(**pairs).losses)


def test_trl_metric_names_and_values(pairs: dict[str, torch.Tensor]) -> None:
    out = get_objective("dpo", beta=0.2)(**pairs)
    r_w = 0.2 * (pairs["policy_chosen_logps"] - pairs["reference_chosen_logps"])
    r_l = 0.2 * (pairs["policy_rejected_logps"] - pairs["reference_rejected_logps"])
    assert out.metrics["rewards/chosen"] == pytest.approx(float(r_w.mean()))
    assert out.metrics["rewards/rejected"] == pytest.approx(float(r_l.mean()))
    assert out.metrics["rewards/margins"] == pytest.approx(float((r_w - r_l).mean()))
    assert out.metrics["rewards/accuracies"] == pytest.approx(float((r_w > r_l).double().mean()))
    assert out.metrics["logps/chosen"] == pytest.approx(float(pairs["policy_chosen_logps"].mean()))
    assert all(isinstance(v, float) for v in out.metrics.values())


def test_anchored_apo_values() -> None:
    p = make_pairs(batch=8, seed=9)
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    zero = [(1 - sig(0.1 * rho(r, "chosen"))) + sig(0.1 * rho(r, "rejected")) for r in rows(p)]
    down = [sig(0.1 * rho(r, "chosen")) + (1 - sig(0.1 * h(r))) for r in rows(p)]
    torch.testing.assert_close(get_objective("apo_zero")(**p).losses, torch.tensor(zero, dtype=torch.float64))
    torch.testing.assert_close(get_objective("apo_down")(**p).losses, torch.tensor(down, dtype=torch.float64))


def test_accelerated_apo_uses_the_extrapolated_reference() -> None:
    p = make_pairs(batch=8, seed=10)
    g = torch.Generator().manual_seed(10)
    prev_w = -torch.rand(8, generator=g, dtype=torch.float64) * 3
    prev_l = -torch.rand(8, generator=g, dtype=torch.float64) * 3
    m, beta = 0.4, 0.2
    expected = []
    for i, r in enumerate(rows(p)):
        ref_w = (1 + m) * r["reference_chosen_logps"] - m * float(prev_w[i])
        ref_l = (1 + m) * r["reference_rejected_logps"] - m * float(prev_l[i])
        expected.append(
            -logsig(beta * ((r["policy_chosen_logps"] - ref_w) - (r["policy_rejected_logps"] - ref_l)))
        )
    out = get_objective("apo", beta=beta, momentum=m)(
        **p, previous_reference_chosen_logps=prev_w, previous_reference_rejected_logps=prev_l
    )
    torch.testing.assert_close(out.losses, torch.tensor(expected, dtype=torch.float64))
    # the first round (no previous iterate) and momentum 0 are DPO
    dpo = get_objective("dpo", beta=beta)(**p).losses
    torch.testing.assert_close(get_objective("apo", beta=beta)(**p).losses, dpo)
    zero_momentum = get_objective("apo", beta=beta, momentum=0.0)(
        **p, previous_reference_chosen_logps=prev_w, previous_reference_rejected_logps=prev_l
    )
    torch.testing.assert_close(zero_momentum.losses, dpo)


def test_kldo_running_denominator_round_trips_through_its_state_dict() -> None:
    """A resumed run continues KLDO's running average exactly (state saved in checkpoints)."""
    from diffalign.objectives import get_objective

    g = torch.Generator().manual_seed(0)
    batches = [{k: torch.randn(4, generator=g, dtype=torch.float64) for k in (
        "policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps"
    )} for _ in range(4)]  # fmt: skip
    straight = get_objective("kldo")
    losses = [float(straight(**b).loss) for b in batches]
    first = get_objective("kldo")
    for b in batches[:2]:
        first(**b)
    resumed = get_objective("kldo")
    assert resumed.state_dict()["steps"] == 0
    resumed.load_state_dict(first.state_dict())
    assert [float(resumed(**b).loss) for b in batches[2:]] == losses[2:]
    fresh = get_objective("kldo")
    assert float(fresh(**batches[2]).loss) != losses[2]  # the running average does change the loss
