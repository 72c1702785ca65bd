"""Every loss and option a TRL 1.16 ``DPOTrainer`` user selects, against TRL's own formula written
out here in float64 (``trl/trainer/dpo_trainer.py``, ``DPOTrainer._compute_loss``, one branch per
``loss_type``; ``trl/trainer/callbacks.py``, ``SyncRefModelCallback``), plus MaPPO's logistic prior
(Lan et al. 2025, App. D.2.4) and the text recipe's LD-DPO, WPO and TR-DPO options on the tiny LM."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from pairs import make_pairs

from diffalign.config import ConfigError
from diffalign.objectives import ObjectiveInputError, get_objective
from diffalign.text.logps import completion_logps, desensitised_logps, wpo_weights
from diffalign.text.tiny import build_tiny_causal_lm, synthetic_preferences

ATOL = 1e-6


def trl_inputs(seed: int = 3, batch: int = 8) -> dict[str, torch.Tensor]:
    return make_pairs(batch=batch, seed=seed)


def trl_scores(p: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TRL's ``chosen_logratios``, ``rejected_logratios`` and ``delta_score`` (reverse KL)."""
    cw = p["policy_chosen_logps"] - p["reference_chosen_logps"]
    cl = p["policy_rejected_logps"] - p["reference_rejected_logps"]
    return cw, cl, cw - cl


def trl_loss(loss_type: str, p: dict[str, torch.Tensor], beta: float = 0.1, **args: float) -> torch.Tensor:
    """TRL 1.16 ``DPOTrainer._compute_loss``'s per-sequence loss of ``loss_type``, transcribed."""
    chosen_logratios, rejected_logratios, delta_score = trl_scores(p)
    eps = args.get("label_smoothing", 0.0)
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * delta_score)
    if loss_type == "exo_pair":
        epsilon = torch.tensor(eps, dtype=torch.float64)
        qw, log_qw = torch.sigmoid(beta * delta_score), F.logsigmoid(beta * delta_score)
        ql, log_ql = torch.sigmoid(-beta * delta_score), F.logsigmoid(-beta * delta_score)
        return qw * (log_qw - torch.log1p(-epsilon)) + ql * (log_ql - torch.log(epsilon))
    if loss_type == "bco_pair":
        return -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-(beta * rejected_logratios))
    if loss_type == "sppo_hard":
        return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
    if loss_type in ("aot", "aot_unpaired"):
        if loss_type == "aot":
            logratios = p["policy_chosen_logps"] - p["policy_rejected_logps"]
            ref_logratios = p["reference_chosen_logps"] - p["reference_rejected_logps"]
            delta = torch.sort(logratios, dim=0)[0] - torch.sort(ref_logratios, dim=0)[0]
        else:
            delta = torch.sort(chosen_logratios, dim=0)[0] - torch.sort(rejected_logratios, dim=0)[0]
        return -F.logsigmoid(beta * delta) * (1 - eps) - F.logsigmoid(-beta * delta) * eps
    if loss_type == "discopop":
        logits = delta_score * beta
        modulation = torch.sigmoid(logits / args.get("discopop_tau", 0.05))
        return -F.logsigmoid(logits) * (1 - modulation) + torch.exp(-logits) * modulation
    if loss_type == "sigmoid_norm":
        delta = chosen_logratios / p["chosen_lengths"] - rejected_logratios / p["rejected_lengths"]
        return -F.logsigmoid(beta * delta)
    if loss_type == "sft":  # -chosen_per_token_logps[chosen_mask].mean(), expanded
        return (-p["policy_chosen_logps"].sum() / p["chosen_lengths"].sum()).expand(len(delta_score))
    raise KeyError(loss_type)


CASES = {  # our objective config -> (TRL loss_type, TRL args)
    "exo_pair": ({"name": "exo_pair"}, "exo_pair", {"label_smoothing": 1e-3}),
    "exo_pair-eps0.2-beta2": (
        {"name": "exo_pair", "label_smoothing": 0.2, "beta": 2.0}, "exo_pair", {"label_smoothing": 0.2}
    ),
    "bco_pair": ({"name": "bco_pair", "beta": 0.5}, "bco_pair", {}),
    "sppo_hard": ({"name": "sppo_hard"}, "sppo_hard", {}),
    "discopop": ({"name": "discopop"}, "discopop", {}),
    "discopop-beta2-tau0.5": (
        {"name": "discopop", "beta": 2.0, "tau": 0.5}, "discopop", {"discopop_tau": 0.5}
    ),
    "dpo_norm": ({"name": "dpo_norm", "beta": 1.0}, "sigmoid_norm", {}),
    "sft": ({"name": "sft"}, "sft", {}),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_loss_is_trls_formula(case: str) -> None:
    spec, loss_type, args = CASES[case]
    p = trl_inputs()
    out = get_objective(**spec)(**p)
    expected = trl_loss(loss_type, p, beta=spec.get("beta", 0.1), **args)
    torch.testing.assert_close(out.losses, expected, rtol=0, atol=ATOL)
    torch.testing.assert_close(out.loss, expected.mean(), rtol=0, atol=ATOL)


def test_bco_running_delta_is_trls_running_mean_and_resumes() -> None:
    """TRL < 1.0's bco_pair: ``rewards = cat(r_w, r_l).mean(); self.running.update(rewards); delta =
    self.running.mean`` (RunningMoments: count starts at 1e-24, each batch mean counts 1)."""
    batches = [trl_inputs(seed=s) for s in (11, 12, 13)]
    mean, count = 0.0, 1e-24
    bco = get_objective("bco_pair", running_delta=True)
    for i, p in enumerate(batches):
        cw, cl, _ = trl_scores(p)
        rewards = float(torch.cat((0.1 * cw, 0.1 * cl)).mean())
        mean, count = mean + (rewards - mean) * 1 / (count + 1), count + 1
        expected = -F.logsigmoid(0.1 * cw - mean) - F.logsigmoid(-(0.1 * cl - mean))
        out = bco(**p)
        torch.testing.assert_close(out.losses, expected, rtol=0, atol=ATOL)
        assert out.metrics["bco/delta"] == pytest.approx(mean, abs=1e-9)
        if i == 1:  # a resumed run continues the same average
            resumed = get_objective("bco_pair", running_delta=True)
            resumed.load_state_dict(bco.state_dict())
    torch.testing.assert_close(resumed(**batches[2]).losses, out.losses, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["aot", "aot_unpaired"])
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_aot_is_trls_sorted_loss(name: str, eps: float) -> None:
    """TRL's losses are by sorted position; ours give each value to the pair at that rank of the
    policy's sorted quantity: the same multiset, the same mean."""
    p = trl_inputs(seed=5)
    out = get_objective(name, beta=0.5, label_smoothing=eps)(**p)
    expected = trl_loss(name, p, beta=0.5, label_smoothing=eps)
    torch.testing.assert_close(out.loss, expected.mean(), rtol=0, atol=ATOL)
    u = p["policy_chosen_logps"] - p["policy_rejected_logps"] if name == "aot" else trl_scores(p)[0]
    torch.testing.assert_close(out.losses[u.argsort()], expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", ["aot", "aot_unpaired"])
def test_aot_weights_are_repeated_pairs(name: str) -> None:
    """Integer weights weigh the two empirical laws: weight 3 is the pair three times over."""
    p = trl_inputs(seed=6, batch=5)
    weights = torch.tensor([3.0, 1.0, 0.0, 2.0, 1.0], dtype=torch.float64)
    repeated = {k: v.repeat_interleave(weights.long()) for k, v in p.items()}
    obj = get_objective(name, beta=0.5)
    expected = trl_loss(name, repeated, beta=0.5).mean()
    torch.testing.assert_close(obj(**p, weights=weights).loss, expected, rtol=0, atol=ATOL)


def test_mpo_is_the_weighted_sum_of_its_parts() -> None:
    """MPO as TRL's docs give it: loss_type [sigmoid, bco_pair, sft], loss_weights [0.8, 0.2, 1.0]."""
    p = trl_inputs(seed=7)
    mpo = get_objective(
        "combined",
        objectives=[{"name": "dpo"}, {"name": "bco_pair"}, {"name": "sft"}],
        loss_weights=[0.8, 0.2, 1.0],
    )
    out = mpo(**p)
    expected = sum(w * trl_loss(t, p).mean() for t, w in (("sigmoid", 0.8), ("bco_pair", 0.2), ("sft", 1.0)))
    torch.testing.assert_close(out.loss, expected, rtol=0, atol=ATOL)
    parts = [get_objective(n)(**p).loss for n in ("dpo", "bco_pair", "sft")]
    assert out.metrics["combined/1_bco_pair"] == pytest.approx(float(parts[1]), abs=1e-12)
    assert out.metrics["rewards/margins"] == pytest.approx(float(0.1 * trl_scores(p)[2].mean()), abs=1e-12)
    assert set(mpo.required_inputs()) == {
        "policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps"
    }  # fmt: skip


def test_rpo_is_dpo_plus_alpha_sft_and_beta_is_shared() -> None:
    """RPO (TRL < 1.0 ``rpo_alpha``): ``sigmoid + alpha * NLL(chosen tokens)``, one beta for all."""
    p = trl_inputs(seed=8)
    rpo = get_objective(
        "combined", objectives=[{"name": "dpo"}, {"name": "sft"}], loss_weights=[1.0, 0.5], beta=0.3
    )
    expected = trl_loss("sigmoid", p, beta=0.3).mean() + 0.5 * trl_loss("sft", p).mean()
    torch.testing.assert_close(rpo(**p).loss, expected, rtol=0, atol=ATOL)
    own = get_objective("combined", objectives=[{"name": "dpo", "beta": 0.2}, {"name": "bco_pair"}], beta=0.3)
    expected = trl_loss("sigmoid", p, beta=0.2).mean() + trl_loss("bco_pair", p, beta=0.3).mean()
    torch.testing.assert_close(own(**p).loss, expected, rtol=0, atol=ATOL)  # a part's own beta wins
    assert rpo.soft_label_mode is None  # sft refuses soft labels, so the sum does
    with pytest.raises(ObjectiveInputError, match="cannot use soft preference labels"):
        rpo(**p, preference_probs=torch.full((8,), 0.5, dtype=torch.float64))


def test_combined_inputs_soft_labels_and_state() -> None:
    p = trl_inputs(seed=9)
    mixed = get_objective("combined", objectives=[{"name": "dpo"}, {"name": "exo_pair"}])
    probs = torch.linspace(0.3, 1.0, 8, dtype=torch.float64)
    expected = (
        get_objective("dpo")(**p, preference_probs=probs).losses
        + get_objective("exo_pair")(**p, preference_probs=probs).losses
    )
    torch.testing.assert_close(mixed(**p, preference_probs=probs).losses, expected, rtol=0, atol=ATOL)
    normed = get_objective("combined", objectives=[{"name": "dpo_norm"}, {"name": "sft"}])
    with pytest.raises(ObjectiveInputError, match=r"requires `chosen_lengths` \(part 'dpo_norm'"):
        normed(**{k: v for k, v in p.items() if "lengths" not in k})
    assert not get_objective("combined", objectives=[{"name": "sft"}]).uses_reference
    # a stateful part's running state goes through the combination's state_dict
    a = get_objective("combined", objectives=[{"name": "kldo"}, {"name": "dpo"}])
    a(**p)
    b = get_objective("combined", objectives=[{"name": "kldo"}, {"name": "dpo"}])
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b(**p).loss, a(**p).loss, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("hparams", "message"),
    [
        ({"objectives": []}, "`objectives` is empty"),
        ({"objectives": [{"beta": 0.1}]}, r"objectives\[0\] must be a mapping with a `name` string"),
        ({"objectives": [{"name": None}]}, r"objectives\[0\] must be a mapping with a `name` string"),
        ({"objectives": [{"name": "dpo"}], "loss_weights": [1.0, 2.0]}, "2 loss_weights for 1 objectives"),
        ({"objectives": [{"name": "dpo"}, {"name": "sft"}], "loss_weights": []}, "0 loss_weights for 2"),
        ({"objectives": [{"name": "ppo_clip"}]}, "'ppo_clip' is a policy_gradient objective"),
    ],
)
def test_bad_combinations_are_named(hparams: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        get_objective("combined", **hparams)


def test_bad_settings_and_inputs_are_named() -> None:
    with pytest.raises(ConfigError, match=r"label_smoothing must be in \(0, 1\)"):
        get_objective("exo_pair", label_smoothing=0.0)  # TRL refuses 0 too (log eps)
    with pytest.raises(ConfigError, match=r"loss_weights must be >= 0"):
        get_objective("combined", loss_weights=[-1.0])
    with pytest.raises(ConfigError, match=r"tau must be > 0"):
        get_objective("discopop", tau=0.0)
    p = trl_inputs()
    with pytest.raises(ObjectiveInputError, match="'dpo_norm' requires `rejected_lengths`"):
        get_objective("dpo_norm")(**{k: v for k, v in p.items() if k != "rejected_lengths"})
    for name in ("aot", "aot_unpaired", "sft"):
        with pytest.raises(ObjectiveInputError, match=f"'{name}' cannot use soft preference labels"):
            get_objective(name)(**p, preference_probs=torch.full((8,), 0.5, dtype=torch.float64))


def test_discopop_stays_finite_where_trls_exp_overflows() -> None:
    p = trl_inputs()
    p["policy_chosen_logps"] = p["policy_chosen_logps"] - 1e4  # beta h = -1000: exp(1000) = inf
    out = get_objective("discopop")(**p)
    assert bool(out.losses.isfinite().all())
    torch.testing.assert_close(out.losses, -F.logsigmoid(0.1 * trl_scores(p)[2]), rtol=0, atol=ATOL)


# -- MaPPO's prior --------------------------------------------------------------------------------


def test_mappo_maps_raw_scores_with_the_logistic_function() -> None:
    p = trl_inputs(seed=4)
    p["chosen_rewards"] = torch.tensor([3.0, -1.0, 0.5, 8.0, 0.0, -2.0, 1.0, 2.0], dtype=torch.float64)
    p["rejected_rewards"] = torch.tensor([-3.0, 1.0, 0.4, -8.0, 0.0, -4.0, 2.0, -1.0], dtype=torch.float64)
    cw, cl, _ = trl_scores(p)
    gap = (torch.sigmoid(p["chosen_rewards"]) - torch.sigmoid(p["rejected_rewards"])).clamp(0, 1)
    out = get_objective("mappo")(**p)
    torch.testing.assert_close(out.losses, -F.logsigmoid(0.1 * cw - gap * 0.1 * cl), rtol=0, atol=ATOL)
    assert out.metrics["mappo/reward_gap"] == pytest.approx(float(gap.mean()))
    minmax = get_objective("mappo", reward_mapping="min_max", reward_min=-8.0, reward_max=8.0)(**p)
    gap = ((p["chosen_rewards"] - p["rejected_rewards"]) / 16).clamp(0, 1)
    torch.testing.assert_close(minmax.losses, -F.logsigmoid(0.1 * cw - gap * 0.1 * cl), rtol=0, atol=ATOL)


def test_mappo_bounds_belong_to_min_max() -> None:
    with pytest.raises(ValueError, match="the default logistic mapping takes none"):
        get_objective("mappo", reward_min=0.0, reward_max=1.0)
    with pytest.raises(ValueError, match="min_max needs both reward_min and reward_max"):
        get_objective("mappo", reward_mapping="min_max", reward_max=1.0)
    with pytest.raises(ValueError, match="must exceed reward_min"):
        get_objective("mappo", reward_mapping="min_max", reward_min=1.0, reward_max=1.0)


# -- per-token options on hand-built log-probs ----------------------------------------------------


class FixedLogits(torch.nn.Module):
    """A "model" whose forward returns the given logits (N, L, V), whatever the input."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(logits)

    def forward(self, **_: Any) -> SimpleNamespace:
        return SimpleNamespace(logits=self.logits)


def hand_built() -> tuple[FixedLogits, dict[str, torch.Tensor]]:
    """Two pairs (chosen 0, 2; rejected 1, 3), left-padded, completions of 4, 2, 1 and 5 tokens."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 9, 7, generator=g, dtype=torch.float64) * 2
    ids = torch.randint(0, 7, (4, 9), generator=g)
    attention = torch.zeros(4, 9, dtype=torch.long)
    completion = torch.zeros(4, 9, dtype=torch.bool)
    for row, (start, prompt, n) in enumerate([(1, 3, 4), (3, 3, 2), (2, 5, 1), (0, 3, 5)]):
        attention[row, start : start + prompt + n] = 1
        completion[row, start + prompt : start + prompt + n] = True
    return FixedLogits(logits), {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}


def token_logps(logits: torch.Tensor, tokens: dict[str, torch.Tensor]) -> list[list[float]]:
    """Per row, the log-probs of its completion tokens in order, from the logits directly."""
    logp = torch.log_softmax(logits, -1)
    out = []
    for row in range(len(logits)):
        positions = tokens["completion_mask"][row].nonzero().flatten().tolist()
        out.append([float(logp[row, t - 1, tokens["input_ids"][row, t]]) for t in positions])
    return out


def test_ld_dpo_cuts_each_pair_at_the_shorter_length() -> None:
    model, tokens = hand_built()
    per_token = token_logps(model.logits.detach(), tokens)
    scored = completion_logps(model, **tokens)
    lengths = [len(t) for t in per_token]
    shared = torch.tensor([min(lengths[0], lengths[1])] * 2 + [min(lengths[2], lengths[3])] * 2)
    for alpha in (0.0, 0.3, 1.0):
        got = desensitised_logps(scored, shared, alpha)
        expected = [sum(t[:n]) + alpha * sum(t[n:]) for t, n in zip(per_token, shared.tolist(), strict=True)]
        torch.testing.assert_close(
            got.double(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=ATOL
        )


def test_wpo_weights_are_length_normalised_aligned_probabilities() -> None:
    model, tokens = hand_built()
    scored = completion_logps(model, **tokens, sum_sq_probs=True)
    probs = torch.softmax(model.logits.detach(), -1)
    expected = []
    for row in range(4):
        positions = tokens["completion_mask"][row].nonzero().flatten().tolist()
        terms = [
            math.log(probs[row, t - 1, tokens["input_ids"][row, t]])
            - math.log((probs[row, t - 1] ** 2).sum())
            for t in positions
        ]
        expected.append(math.exp(sum(terms) / len(terms)))
    got = wpo_weights(scored)
    torch.testing.assert_close(
        got.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=ATOL
    )
    assert not got.requires_grad
    with pytest.raises(ValueError, match="sum_sq_probs=True"):
        wpo_weights(completion_logps(model, **tokens))


# -- the text recipe --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("trl_lm")
    return {"lm": build_tiny_causal_lm(root / "lm"), "data": synthetic_preferences(root / "d.jsonl", rows=8)}


def method(lm: dict[str, Path], out: Path, objective: dict | None = None, **options: Any) -> Any:
    from diffalign.methods.text_preference import TextPreference
    from diffalign.training.config import DataConfig, ModelConfig, TrainConfig

    cfg = TrainConfig(
        method="text_preference",
        model=ModelConfig(pretrained=str(lm["lm"])),
        data=DataConfig(path=lm["data"]),
        objective=objective or {"name": "dpo"},
        method_options=options,
        output_dir=out,
    )
    built = TextPreference(cfg)
    built.setup(torch.device("cpu"), torch.float32)
    return built


def moved_policy(built: Any) -> Any:
    """The policy moved away from the reference, so that the reference term matters."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in built.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return built


def test_recipe_wpo_and_ld_dpo_losses_are_trls(lm: dict[str, Path], tmp_path: Path) -> None:
    """One step's loss against TRL's: LD-DPO on policy and reference, then sigmoid, then WPO's
    ``mean(w_w w_l L)``, all from per-token log-probs computed here."""
    built = moved_policy(method(lm, tmp_path / "a", use_weighting=True, ld_alpha=0.4))
    dataset, collate = built.dataset()
    batch = collate([dataset[i] for i in range(4)])
    loss, metrics = built.step(batch)
    tokens = {k: batch[k] for k in ("input_ids", "attention_mask", "completion_mask")}
    with torch.no_grad():
        policy = completion_logps(built.model, **tokens, sum_sq_probs=True)
        reference = completion_logps(built.reference, **tokens)
    lengths = policy.lengths.view(4, 2)
    shared = lengths.amin(1, keepdim=True).expand(4, 2).reshape(-1)
    pw, pl = desensitised_logps(policy, shared, 0.4).view(4, 2).double().unbind(1)
    rw, rl = desensitised_logps(reference, shared, 0.4).view(4, 2).double().unbind(1)
    weights = wpo_weights(policy).view(4, 2).prod(1).double()
    expected = (-F.logsigmoid(0.1 * ((pw - rw) - (pl - rl))) * weights).mean()
    assert float(loss.detach()) == pytest.approx(float(expected), abs=1e-6)
    assert metrics["wpo/weight"] == pytest.approx(float(weights.mean()), rel=1e-5)


def test_tr_dpo_soft_and_hard_sync(lm: dict[str, Path], tmp_path: Path) -> None:
    for alpha in (0.6, 1.0):
        options = {"sync_ref_model": True, "ref_model_mixup_alpha": alpha, "ref_model_sync_steps": 3}
        built = moved_policy(method(lm, tmp_path / f"a{alpha}", **options))
        before = [p.detach().clone() for p in built.reference.parameters()]
        policy = [p.detach().clone() for p in built.model.parameters()]
        built.on_optimizer_step(2)  # not a multiple of 3: no sync
        assert all(torch.equal(a, b) for a, b in zip(before, built.reference.parameters(), strict=True))
        built.on_optimizer_step(3)
        for ref0, pol, ref in zip(before, policy, built.reference.parameters(), strict=True):
            expected = pol.double() * alpha + ref0.double() * (1 - alpha)
            torch.testing.assert_close(ref.double(), expected, rtol=0, atol=ATOL)
            if alpha == 1.0:
                assert torch.equal(ref, pol)  # a hard sync is an exact copy
        assert built.state()["reference"] is built.reference


@pytest.mark.parametrize(
    ("objective", "options", "extra", "message"),
    [
        ({"name": "dpo"}, {"sync_ref_model": True}, {"reference": "precomputed"}, "stale after the first"),
        ({"name": "dpo"}, {"sync_ref_model": True}, {"lora": {"rank": 2}}, "no reference weights of its own"),
        ({"name": "dpo"}, {"sync_ref_model": True}, {"lora": {"rank": 2}, "reference": "copy"},
         "train without model.lora"),
        ({"name": "simpo"}, {"sync_ref_model": True}, {}, "'simpo' uses no reference model"),
        ({"name": "aot"}, {"use_weighting": True}, {}, "'aot', which sorts the batch"),
        ({"name": "combined", "objectives": [{"name": "dpo"}, {"name": "aot_unpaired"}]},
         {"use_weighting": True}, {}, "sorts the batch"),
    ],
)  # fmt: skip
def test_options_that_cannot_apply_are_refused_when_built(
    lm: dict[str, Path], tmp_path: Path, objective: dict, options: dict, extra: dict, message: str
) -> None:
    from diffalign.methods.text_preference import TextPreference
    from diffalign.training.config import DataConfig, ModelConfig, TrainConfig

    cfg = TrainConfig(
        method="text_preference",
        model=ModelConfig(pretrained=str(lm["lm"]), **extra),
        data=DataConfig(path=lm["data"]),
        objective=objective,
        method_options=options,
        output_dir=tmp_path,
    )
    with pytest.raises(ValueError, match=message):
        TextPreference(cfg)


def test_listwise_objectives_refuse_pair_options(tmp_path: Path, lm: dict[str, Path]) -> None:
    data = synthetic_preferences(tmp_path / "k4.jsonl", rows=4, candidates=4)
    for option in ("ld_alpha", "use_weighting"):
        with pytest.raises(ValueError, match=f"method_options.{option} acts on a chosen and a rejected"):
            method(
                {"lm": lm["lm"], "data": data},
                tmp_path,
                {"name": "nca"},
                **{option: 0.5 if option == "ld_alpha" else True},
            )


def train_run(
    lm: dict[str, Path], out: Path, max_steps: int, resume: bool = False, **spec: Any
) -> list[dict]:
    from diffalign.api import train
    from diffalign.config import build
    from diffalign.training.config import TrainConfig

    config = {
        "method": "text_preference", "model": {"pretrained": str(lm["lm"])},
        "data": {"path": str(lm["data"])},
        "objective": {"name": "dpo"}, "batch_size": 4, "max_steps": max_steps, "checkpoint_every": 3,
        "keep_checkpoints": 5, "log_every": 1, "report_to": [], "seed": 0, "optim": {"lr": 1e-2},
        "output_dir": str(out), **({"resume_from": "latest"} if resume else {}), **spec,
    }  # fmt: skip
    train(build(TrainConfig, config))
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


RUNS = {  # each option trains: finite losses, weights moved
    "rpo": {"objective": {"name": "combined", "objectives": [{"name": "dpo"}, {"name": "sft"}],
                          "loss_weights": [1.0, 1.0]}},
    "wpo": {"method_options": {"use_weighting": True}},
    "ld_dpo": {"method_options": {"ld_alpha": 0.5}},
    "mpo": {"objective": {"name": "combined", "objectives": [{"name": "dpo"}, {"name": "bco_pair"},
                          {"name": "sft"}], "loss_weights": [0.8, 0.2, 1.0]}},
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(RUNS))
def test_each_option_trains_the_tiny_lm(case: str, lm: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    log = train_run(lm, tmp_path / "run", max_steps=2, **RUNS[case])
    assert len(log) == 2 and all(math.isfinite(m["loss"]) for m in log)
    before = load_file(lm["lm"] / "model.safetensors")
    after = load_file(tmp_path / "run" / "checkpoints" / "checkpoint-2" / "export" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_tr_dpo_resumes_exactly_across_a_sync(lm: dict[str, Path], tmp_path: Path) -> None:
    """Soft sync every 2 steps: checkpoint-3 holds a reference synced at step 2 (neither the
    starting model nor the policy); resuming from it reproduces step 4 and its sync exactly."""
    from diffalign.training.state_files import load_state

    options = {
        "method_options": {"sync_ref_model": True, "ref_model_sync_steps": 2, "ref_model_mixup_alpha": 0.5}
    }
    full = train_run(lm, tmp_path / "full", max_steps=4, **options)
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full", resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "checkpoint-4")
    resumed = train_run(lm, resumed_dir, max_steps=4, resume=True, **options)
    assert [m["loss"] for m in resumed] == [m["loss"] for m in full]
    state = {n: load_state(tmp_path / "full" / "checkpoints" / n / "method_state_0.safetensors")["reference"]
             for n in ("checkpoint-3", "checkpoint-4")}  # fmt: skip
    again = load_state(resumed_dir / "checkpoints" / "checkpoint-4" / "method_state_0.safetensors")[
        "reference"
    ]
    assert all(torch.equal(state["checkpoint-4"][k], again[k]) for k in again)
    from safetensors.torch import load_file

    start = load_file(lm["lm"] / "model.safetensors")
    key = next(k for k in start if k.endswith("q_proj.weight"))
    synced = state["checkpoint-3"][key]
    policy = load_file(tmp_path / "full" / "checkpoints" / "checkpoint-3" / "export" / "model.safetensors")[
        key
    ]
    assert not torch.equal(synced, start[key]) and not torch.equal(synced, policy)
