"""VPO (objective ``vpo``), cDPO's per-pair label smoothing, UPO's uncertainty filter, the online
text driver and PLaD's pseudo-preference pairs, on hand-written formulas and the tiny causal LM."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from pairs import make_pairs
from script_loader import load_script

from diffalign.acquisition import binary_bald
from diffalign.config import ConfigError, build
from diffalign.objectives import ObjectiveInputError, get_objective
from diffalign.text.loading import load_causal_lm
from diffalign.text.logps import candidate_logps
from diffalign.text.online import OnlineTextConfig, implicit_reward_accuracy
from diffalign.text.plad import plad_pairs
from diffalign.text.sampling import pair_rows, sample_completions
from diffalign.text.tiny import build_tiny_causal_lm, synthetic_preferences, yes_fraction
from diffalign.text.upo import (
    UPOSettings,
    bald_label_smoothing,
    mc_dropout_preference_probs,
    select_pairs,
    set_attention_dropout,
    upo_filter,
    upo_sampling_weights,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "text"


def logsig(z: float) -> float:
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def rows_of(p: dict[str, torch.Tensor]) -> list[dict[str, float]]:
    return [{k: float(v[i]) for k, v in p.items()} for i in range(len(p["policy_chosen_logps"]))]


# -- VPO ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "calibration"), [("offline", "chosen"), ("online", "both"), ("online", "chosen")]
)
def test_vpo_value_is_dpo_plus_the_signed_calibration_term(mode: str, calibration: str) -> None:
    p = make_pairs(batch=5, seed=3)
    beta, alpha = 0.7, 0.3
    out = get_objective("vpo", beta=beta, alpha=alpha, mode=mode, calibration=calibration)(**p)
    sign = -1.0 if mode == "offline" else 1.0
    expected = []
    for r in rows_of(p):
        rho_w = r["policy_chosen_logps"] - r["reference_chosen_logps"]
        rho_l = r["policy_rejected_logps"] - r["reference_rejected_logps"]
        cal = rho_w if calibration == "chosen" else 0.5 * (rho_w + rho_l)
        expected.append(-logsig(beta * (rho_w - rho_l)) + sign * alpha * beta * cal)
    assert out.losses.dtype == torch.float64
    torch.testing.assert_close(out.losses, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-6)
    assert float(out.loss) == pytest.approx(sum(expected) / len(expected), abs=1e-6)


def test_vpo_soft_label_mixes_the_calibration_sample() -> None:
    p = make_pairs(batch=4, seed=5)
    probs = torch.tensor([1.0, 0.5, 0.8, 0.3], dtype=torch.float64)
    beta, alpha = 0.5, 0.2
    out = get_objective("vpo", beta=beta, alpha=alpha)(**p, preference_probs=probs)
    for r, q, got in zip(rows_of(p), probs.tolist(), out.losses.tolist(), strict=True):
        rho_w = r["policy_chosen_logps"] - r["reference_chosen_logps"]
        rho_l = r["policy_rejected_logps"] - r["reference_rejected_logps"]
        win = -logsig(beta * (rho_w - rho_l)) - alpha * beta * rho_w
        lose = -logsig(beta * (rho_l - rho_w)) - alpha * beta * rho_l
        assert got == pytest.approx(q * win + (1 - q) * lose, abs=1e-6)


def test_offline_vpo_raises_the_chosen_log_prob_and_online_lowers_it() -> None:
    """The pitfall of SEED-METHODS §2.4: d loss / d l(y_w) is DPO's minus alpha beta offline (a
    gradient step raises l(y_w) more), plus alpha beta online; alpha 0 is DPO."""
    p = make_pairs(batch=4, seed=7)
    beta, alpha = 0.1, 0.5

    def grad(**hp: object) -> torch.Tensor:
        chosen = p["policy_chosen_logps"].clone().requires_grad_()
        get_objective(**hp)(**{**p, "policy_chosen_logps": chosen}).losses.sum().backward()
        return chosen.grad

    dpo = grad(name="dpo", beta=beta)
    torch.testing.assert_close(grad(name="vpo", beta=beta, alpha=0.0), dpo, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        grad(name="vpo", beta=beta, alpha=alpha), dpo - alpha * beta, rtol=0, atol=1e-9
    )
    online = grad(name="vpo", beta=beta, alpha=alpha, mode="online", calibration="both")
    torch.testing.assert_close(online, dpo + alpha * beta / 2, rtol=0, atol=1e-9)
    # where DPO is satisfied (huge margin, gradient ~ 0) offline VPO still pulls l(y_w) up
    far = {**p, "policy_chosen_logps": p["policy_chosen_logps"] + 500.0}
    chosen = far["policy_chosen_logps"].clone().requires_grad_()
    get_objective("vpo", beta=beta, alpha=alpha)(**{**far, "policy_chosen_logps": chosen}).loss.backward()
    assert bool((chosen.grad < 0).all())  # descent raises the chosen log-prob


@pytest.mark.parametrize("hp", [{"mode": "online", "calibration": "both"}, {"reference_free": True}])
def test_vpo_gradcheck(hp: dict) -> None:
    p = make_pairs(batch=4, seed=11)
    names = ("policy_chosen_logps", "policy_rejected_logps")
    obj = get_objective("vpo", alpha=0.3, **hp)
    xs = tuple(p[k].clone().requires_grad_() for k in names)
    assert torch.autograd.gradcheck(
        lambda *a: obj(**{**p, **dict(zip(names, a, strict=True))}).loss, xs, eps=1e-6, atol=1e-5
    )


def test_vpo_refuses_bad_settings() -> None:
    with pytest.raises(ConfigError, match="alpha must be"):
        get_objective("vpo", alpha=-0.1)
    with pytest.raises(ConfigError, match="mode"):
        get_objective("vpo", mode="optimistic")


# -- cDPO per-pair smoothing --------------------------------------------------------------------


def test_cdpo_per_pair_smoothing_value_and_gradient() -> None:
    p = make_pairs(batch=4, seed=2)
    e = torch.tensor([0.0, 0.1, 0.3, 0.49], dtype=torch.float64)
    out = get_objective("cdpo", beta=0.5)(**p, label_smoothing_per_pair=e)
    for r, ej, got in zip(rows_of(p), e.tolist(), out.losses.tolist(), strict=True):
        z = 0.5 * (
            r["policy_chosen_logps"] - r["reference_chosen_logps"]
            - r["policy_rejected_logps"] + r["reference_rejected_logps"]
        )  # fmt: skip
        assert got == pytest.approx(-(1 - ej) * logsig(z) - ej * logsig(-z), abs=1e-6)
    same = get_objective("cdpo", label_smoothing=0.2)
    torch.testing.assert_close(
        same(**p).losses, get_objective("cdpo")(**p, label_smoothing_per_pair=torch.full((4,), 0.2)).losses
    )
    x = p["policy_chosen_logps"].clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a: get_objective("cdpo")(**{**p, "policy_chosen_logps": a}, label_smoothing_per_pair=e).loss,
        (x,),
        eps=1e-6,
        atol=1e-5,
    )


@pytest.mark.parametrize("bad", [0.5, -0.01, float("nan")])
def test_cdpo_per_pair_smoothing_outside_its_range_is_named(bad: float) -> None:
    p = make_pairs(batch=3)
    e = torch.tensor([0.1, bad, 0.2], dtype=torch.float64)
    with pytest.raises(ObjectiveInputError, match="`label_smoothing_per_pair`"):
        get_objective("cdpo")(**p, label_smoothing_per_pair=e)
    with pytest.raises(ObjectiveInputError, match="shape mismatch: `label_smoothing_per_pair`"):
        get_objective("cdpo")(**p, label_smoothing_per_pair=torch.zeros(2))


# -- UPO ----------------------------------------------------------------------------------------


def test_upo_weights_selection_and_smoothing() -> None:
    bald = torch.tensor([0.0, 0.2, 0.5, 0.1], dtype=torch.float64)
    w = upo_sampling_weights(bald, mu=2.0)
    raw = [(1 - b) ** 2 for b in bald.tolist()]
    torch.testing.assert_close(w, torch.tensor([r / sum(raw) for r in raw], dtype=torch.float64))
    torch.testing.assert_close(bald_label_smoothing(bald, 0.4), 0.4 * bald / 0.5)
    assert bool((bald_label_smoothing(torch.zeros(3)) == 0).all())
    with pytest.raises(ValueError, match="a_max"):
        bald_label_smoothing(bald, 0.5)
    with pytest.raises(ValueError, match=r"\[0, log 2\]"):
        upo_sampling_weights(torch.tensor([0.9]))
    # the most uncertain pair is never among the easy ones when the rest weigh far more
    bald = torch.tensor([0.0, 0.0, 0.0, math.log(2) - 1e-12], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert 3 not in select_pairs(bald, 0.75, "easy", mu=40.0, generator=g).tolist()
        assert 3 in select_pairs(bald, 0.25, "hard", generator=g).tolist()
    assert len(select_pairs(bald, 0.5)) == 2


@pytest.fixture(scope="module")
def lms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lms")
    return {"a": build_tiny_causal_lm(root / "a", seed=0), "b": build_tiny_causal_lm(root / "b", seed=1)}


def test_mc_dropout_probs_vary_by_pass_and_restore_the_estimator(lms: dict[str, Path]) -> None:
    estimator, tok = load_causal_lm(lms["b"])
    reference, _ = load_causal_lm(lms["a"])
    rows = [{"prompt": f"t{i} t{i + 2}", "chosen": "yes sure", "rejected": "no never nope"} for i in range(5)]
    probs = mc_dropout_preference_probs(estimator, reference, tok, rows, passes=6, beta=1.0, dropout=0.3)
    assert probs.shape == (6, 5) and bool(((probs > 0) & (probs < 1)).all())
    assert bool((binary_bald(probs) > 0).any())  # the passes disagree
    assert not estimator.training
    assert all(m.attention_dropout == 0.0 for m in estimator.modules() if hasattr(m, "attention_dropout"))
    # without dropout, one pass is the deterministic implicit-reward preference
    pair = ["yes sure", "no never nope"]
    with torch.no_grad():
        rho = candidate_logps(estimator, tok, rows[0]["prompt"], pair) - candidate_logps(
            reference, tok, rows[0]["prompt"], pair
        )
    mean = float(probs[:, 0].mean())
    assert mean == pytest.approx(float(torch.sigmoid(rho[0] - rho[1])), abs=0.25)
    with pytest.raises(ValueError, match="no attention_dropout"):
        set_attention_dropout(torch.nn.Linear(2, 2), 0.1)


def yes_estimator(lms: dict[str, Path], rows: list[dict], folder: Path) -> Path:
    """UPO's estimator: lms["a"] after a few DPO-like steps on labelled ``rows`` (it prefers "yes")."""
    est, tok = load_causal_lm(lms["a"])
    optimizer = torch.optim.Adam(est.parameters(), lr=1e-2)
    for _ in range(5):
        logps = torch.stack(
            [candidate_logps(est, tok, r["prompt"], [r["chosen"], r["rejected"]]) for r in rows]
        )
        optimizer.zero_grad()
        (-torch.nn.functional.logsigmoid(logps[:, 0] - logps[:, 1])).mean().backward()
        optimizer.step()
    est.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_upo_filter_drops_pairs_the_estimator_reverses(lms: dict[str, Path], tmp_path: Path) -> None:
    rows = [{"prompt": f"t{i}", "chosen": "yes sure", "rejected": "no never"} for i in range(4)]
    rows += [{"prompt": f"t{i}", "chosen": "no never", "rejected": "yes sure"} for i in range(4)]
    yes_estimator(lms, rows[:4], tmp_path / "est")
    settings = UPOSettings(str(tmp_path / "est"), str(lms["a"]), beta=1.0, mc_passes=4, keep_fraction=1.0)
    kept = upo_filter(rows, settings)
    assert [r["chosen"] for r in kept] == ["yes sure"] * 4 and all(r["bald"] >= 0 for r in kept)
    half = upo_filter(rows, UPOSettings(str(tmp_path / "est"), str(lms["a"]), keep_fraction=0.5, mc_passes=2))
    assert len(half) == 2
    with pytest.raises(ValueError, match="keep_fraction"):
        UPOSettings("x", "y", keep_fraction=0.0)


def test_dpo_on_upo_filtered_pairs_reaches_a_higher_preference_accuracy(
    lms: dict[str, Path], tmp_path: Path
) -> None:
    """Pairs labelled by a noisy reward (2 of every 5 flipped); the estimator saw 4 clean labelled
    pairs (UPO's D^(0)). DPO on the pairs UPO keeps ranks held-out pairs better than DPO on all."""
    from diffalign.cli import main

    def read(path: Path) -> list[dict]:
        return [json.loads(x) for x in path.read_text().splitlines()]

    clean = read(synthetic_preferences(tmp_path / "c.jsonl", rows=30, seed=3))
    noisy = [
        {**r, "chosen": r["rejected"], "rejected": r["chosen"]} if i % 5 < 2 else r
        for i, r in enumerate(clean)
    ]
    labelled = read(synthetic_preferences(tmp_path / "l.jsonl", rows=4, seed=4))
    settings = UPOSettings(str(yes_estimator(lms, labelled, tmp_path / "est")), str(lms["a"]), beta=1.0,
                           mc_passes=4, keep_fraction=1.0)  # fmt: skip
    held = read(synthetic_preferences(tmp_path / "h.jsonl", rows=16, seed=9))
    reference, tok = load_causal_lm(lms["a"])
    accuracy = {}
    for name, rows in (("all", noisy), ("upo", upo_filter(noisy, settings))):
        data = tmp_path / f"{name}.jsonl"
        data.write_text(
            "".join(json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")}) + "\n" for r in rows)
        )
        assert main([
            "train", "--config", str(CONFIGS / "dpo.yaml"), f"model.pretrained={lms['a']}",
            f"data.path={data}", f"output_dir={tmp_path / name}", "max_steps=12", "optim.lr=1e-3",
            "checkpoint_every=12", "report_to=[]",
        ]) == 0  # fmt: skip
        model, _ = load_causal_lm(tmp_path / name / "checkpoints" / "checkpoint-12" / "export")
        accuracy[name] = implicit_reward_accuracy(model, reference, tok, held)
    assert accuracy["upo"] > accuracy["all"] + 0.1, accuracy


# -- the online driver --------------------------------------------------------------------------


def test_sampling_and_pairing_are_seeded_and_use_the_reward(lms: dict[str, Path]) -> None:
    model, tok = load_causal_lm(lms["a"])
    prompts = ["t1 t2", "t3 t4", "t5"]
    first = sample_completions(model, tok, prompts, 4, 6, seed=3)
    assert first == sample_completions(model, tok, prompts, 4, 6, seed=3)
    assert first != sample_completions(model, tok, prompts, 4, 6, seed=4)
    rows = pair_rows(prompts, first, yes_fraction, "margin", margin=0.01)
    for r in rows:
        assert [r["chosen_reward"], r["rejected_reward"]] == yes_fraction([], [r["chosen"], r["rejected"]])
        assert r["chosen_reward"] >= r["rejected_reward"] + 0.01
    best = pair_rows(prompts, [["no", "yes", "sure no"]] * 3, yes_fraction)
    assert [(r["chosen"], r["rejected"]) for r in best] == [("yes", "no")] * 3


def test_online_rounds_chain_models_and_references(lms: dict[str, Path], tmp_path: Path) -> None:
    """Round 2 starts from round 1's export and trains against it (first loss log 2), through the
    CLI script and configs/text/vpo_online.yaml."""
    prompts = synthetic_preferences(tmp_path / "p.jsonl", rows=8)
    summaries = load_script("online_text").main([
        "--config", str(CONFIGS / "vpo_online.yaml"), f"prompts={prompts}", f"output_dir={tmp_path / 'on'}",
        f"train.model.pretrained={lms['a']}", "rounds=2", "max_new_tokens=6", "train.max_steps=3",
        "train.optim.lr=1e-2", "train.log_every=1", "train.batch_size=4",
    ])  # fmt: skip
    assert [s["round"] for s in summaries] == [1, 2]
    assert Path(summaries[0]["export"]).is_relative_to(tmp_path / "on" / "round-1")
    saved = json.loads((tmp_path / "on" / "round-2" / "train" / "config.json").read_text())
    assert saved["model"]["pretrained"] == summaries[0]["export"]
    for i in (1, 2):
        log = (tmp_path / "on" / f"round-{i}" / "train" / "metrics.jsonl").read_text().splitlines()
        first = next(json.loads(line) for line in log if '"loss"' in line)
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at the start
        rows = [
            json.loads(line)
            for line in (tmp_path / "on" / f"round-{i}" / "pairs.jsonl").read_text().splitlines()
        ]
        assert rows and all(r["chosen_reward"] > r["rejected_reward"] for r in rows)
    exports = [Path(s["export"]) / "config.json" for s in summaries]
    stamps = [p.stat().st_mtime_ns for p in exports]
    again = load_script("online_text").main([
        "--config", str(CONFIGS / "vpo_online.yaml"), f"prompts={prompts}", f"output_dir={tmp_path / 'on'}",
        f"train.model.pretrained={lms['a']}", "rounds=2", "max_new_tokens=6", "train.max_steps=3",
        "train.optim.lr=1e-2", "train.log_every=1", "train.batch_size=4",
    ])  # fmt: skip
    assert again == summaries and [p.stat().st_mtime_ns for p in exports] == stamps  # restart: nothing redone
    with pytest.raises(
        ConfigError, match=r"holds rounds made with other settings \(rounds, train differ: rounds=2, "
    ):
        load_script("online_text").main([
            "--config", str(CONFIGS / "vpo_online.yaml"), f"prompts={prompts}",
            f"output_dir={tmp_path / 'on'}", f"train.model.pretrained={lms['a']}", "rounds=3",
            "max_new_tokens=6", "train.max_steps=4", "train.optim.lr=1e-2", "train.log_every=1",
            "train.batch_size=4",
        ])  # fmt: skip
    with pytest.raises(ConfigError, match=r"train\.objective"):
        build(OnlineTextConfig, {"train": {"method": "text_preference", "model": {"pretrained": "x"},
              "objective": [1]}, "prompts": "p", "reward": "m:f"})  # fmt: skip


def test_offline_vpo_keeps_the_chosen_likelihood_higher_than_dpo(
    lms: dict[str, Path], tmp_path: Path
) -> None:
    """Through configs/text/vpo.yaml: the same run with alpha 1 and alpha 0 (DPO) on the synthetic
    pairs; VPO ends with a higher held-out chosen log-prob and an implicit-reward accuracy as good."""
    from diffalign.cli import main

    data = synthetic_preferences(tmp_path / "train.jsonl", rows=32)
    held = [
        json.loads(x)
        for x in synthetic_preferences(tmp_path / "held.jsonl", rows=16, seed=9).read_text().splitlines()
    ]
    reference, tok = load_causal_lm(lms["a"])
    result = {}
    for alpha in (0.0, 1.0):
        out = tmp_path / f"a{alpha}"
        assert main([
            "train", "--config", str(CONFIGS / "vpo.yaml"), f"model.pretrained={lms['a']}",
            f"data.path={data}", f"output_dir={out}", "max_steps=12", "optim.lr=1e-3", "checkpoint_every=12",
            "report_to=[]", f"objective.alpha={alpha}",
        ]) == 0  # fmt: skip
        model, _ = load_causal_lm(out / "checkpoints" / "checkpoint-12" / "export")
        with torch.no_grad():
            chosen = sum(float(candidate_logps(model, tok, r["prompt"], [r["chosen"]])[0]) for r in held)
        result[alpha] = (chosen / len(held), implicit_reward_accuracy(model, reference, tok, held))
    assert result[1.0][0] > result[0.0][0] + 0.2, result
    assert result[1.0][1] >= result[0.0][1] - 0.07 and result[1.0][1] > 0.8, result


# -- PLaD ---------------------------------------------------------------------------------------


def test_plad_pairs_put_the_teacher_first_and_filter_by_margin(lms: dict[str, Path], tmp_path: Path) -> None:
    teacher, student = load_causal_lm(lms["b"]), load_causal_lm(lms["a"])
    prompts = [f"t{i} t{i + 1}" for i in range(8)]
    rows = plad_pairs(teacher, student, prompts, max_new_tokens=6, seed=2)
    ups = sample_completions(*teacher, prompts, 1, 6, seed=2)
    downs = sample_completions(*student, prompts, 1, 6, seed=2)
    expected = [(p, u[0], d[0]) for p, u, d in zip(prompts, ups, downs, strict=True) if u and d and u != d]
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == expected
    scored = plad_pairs(teacher, student, prompts, 6, seed=2, score=yes_fraction, margin=0.1)
    assert all(r["chosen_reward"] - r["rejected_reward"] >= 0.1 for r in scored)
    assert [(r["chosen"], r["rejected"]) for r in scored] == [
        (c, j) for _, c, j in expected if yes_fraction([], [c])[0] - yes_fraction([], [j])[0] >= 0.1
    ]
    with pytest.raises(ValueError, match="margin"):
        plad_pairs(teacher, student, prompts, margin=0.1)
    out = load_script("plad_pairs").main([
        "--teacher", str(lms["b"]), "--student", str(lms["a"]), "--prompts", str(synthetic_preferences(
            tmp_path / "p.jsonl", rows=6)), "--out", str(tmp_path / "plad.jsonl"), "--max-new-tokens", "6",
    ])  # fmt: skip
    assert len(out.read_text().splitlines()) >= 1


def test_plad_moves_the_student_towards_the_teachers_preference(lms: dict[str, Path], tmp_path: Path) -> None:
    """The teacher: lms["b"] after a few DPO steps on the synthetic pairs (it says "yes"); the
    student lms["a"] trains on teacher-over-student pairs through configs/text/plad.yaml; its
    implicit reward against its starting point then ranks held-out chosen ("yes") answers first."""
    from diffalign.cli import main

    def train(config: str, model: Path, data: Path, out: Path, *extra: str) -> Path:
        assert main([
            "train", "--config", config, f"model.pretrained={model}", f"data.path={data}",
            f"output_dir={out}", "max_steps=20", "optim.lr=2e-3", "checkpoint_every=20", "report_to=[]",
            *extra,
        ]) == 0  # fmt: skip
        return out / "checkpoints" / "checkpoint-20" / "export"

    teacher = train(str(CONFIGS / "dpo.yaml"), lms["b"], synthetic_preferences(tmp_path / "t.jsonl", rows=32),
                    tmp_path / "teacher")  # fmt: skip
    prompts = [json.loads(x)["prompt"] for x in synthetic_preferences(tmp_path / "p.jsonl", rows=24, seed=5)
               .read_text().splitlines()]  # fmt: skip
    pairs = [r for seed in (0, 1) for r in plad_pairs(
        load_causal_lm(teacher), load_causal_lm(lms["a"]), prompts, max_new_tokens=8, seed=seed)]  # fmt: skip
    assert len(pairs) >= 24
    data = tmp_path / "plad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    student = train(str(CONFIGS / "plad.yaml"), lms["a"], data, tmp_path / "student")
    held = [
        json.loads(x)
        for x in synthetic_preferences(tmp_path / "h.jsonl", rows=16, seed=9).read_text().splitlines()
    ]
    (before, tok), (after, _) = load_causal_lm(lms["a"]), load_causal_lm(student)
    assert implicit_reward_accuracy(after, before, tok, held) >= 0.75


def test_bad_rewards_and_round_settings_are_named_before_any_sampling(tmp_path: Path) -> None:
    """A reward that returns the wrong number of scores, NaN or text, an unknown reward, a bad
    ``train`` section or a missing model folder: each a clear error naming it."""
    from diffalign.text.online import run_online
    from diffalign.text.sampling import load_text_reward, score_texts

    texts = ["yes", "no", "sure"]
    with pytest.raises(ValueError, match="returned 2 scores for 3 completions"):
        pair_rows(["p"], [texts], lambda p, c: [1.0, 0.0])
    with pytest.raises(ValueError, match="non-finite score"):
        score_texts(lambda p, c: [float("nan")] * len(c), ["p"] * 3, texts)
    with pytest.raises(ValueError, match="expected one number per completion"):
        score_texts(lambda p, c: ["high"] * len(c), ["p"] * 3, texts)
    with pytest.raises(ValueError, match="reward 'no_such_module:f': cannot load it"):
        load_text_reward("no_such_module:f")
    base = {
        "train": {"method": "text_preference", "model": {"pretrained": "lm"}},
        "prompts": "p",
        "reward": "m:f",
    }
    with pytest.raises(ConfigError, match=r"train: .*unknown objective 'foo'"):
        build(OnlineTextConfig, {**base, "train": {**base["train"], "objective": {"name": "foo"}}})
    with pytest.raises(ConfigError, match=r"train: method_options: .*ld_alpha must be in \[0, 1\]"):
        build(OnlineTextConfig, {**base, "train": {**base["train"], "method_options": {"ld_alpha": 3.0}}})
    prompts = synthetic_preferences(tmp_path / "p.jsonl", rows=2)
    missing = {**base, "prompts": prompts, "reward": "diffalign.text.tiny:yes_fraction",
               "output_dir": tmp_path / "o",
               "train": {**base["train"], "model": {"pretrained": str(tmp_path / "no" / "lm")}}}  # fmt: skip
    with pytest.raises(FileNotFoundError, match=r"train\.model\.pretrained: .*/no/lm is not a folder"):
        run_online(build(OnlineTextConfig, missing))
