"""BAL-PM acquisition: the k-NN prompt entropy against its formula written out, the greedy batch
against a from-scratch re-implementation, bad input, scripts/select_pairs.py, and the effect:
fewer labels than random selection to reach a target accuracy on a synthetic pool."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from diffalign.acquisition import (
    balpm_select,
    binary_bald,
    knn_prompt_entropy,
    knn_radius,
    standardize_features,
)

EULER = 0.5772156649015329


def digamma_int(m: int) -> float:
    """digamma(m) for an integer m >= 1: -gamma + sum_{j < m} 1/j."""
    return -EULER + sum(1.0 / j for j in range(1, m))


def entropy_by_hand(x: torch.Tensor, labelled: torch.Tensor, k: int, d_ent: float) -> torch.Tensor:
    """H(s) = log(2 d_k + 1e-4) - digamma(n + 1) / d_ent, with loops: d_k the k-th smallest
    distance to the other points, n the labelled points within it."""
    out = []
    for i in range(len(x)):
        dist = [math.dist(x[i].tolist(), x[j].tolist()) for j in range(len(x))]
        others = sorted(d for j, d in enumerate(dist) if j != i)
        radius = others[k - 1]
        n = sum(1 for j in range(len(x)) if labelled[j] and dist[j] <= radius)
        out.append(math.log(2 * radius + 1e-4) - digamma_int(n + 1) / d_ent)
    return torch.tensor(out, dtype=torch.float64)


def test_entropy_matches_the_formula_written_out() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 3, generator=g, dtype=torch.float64)
    x[7] = x[3]  # a duplicate is a neighbour at distance 0, not the point itself
    labelled = torch.rand(30, generator=g) < 0.3
    for k, d_ent in ((1, 1.0), (4, 3.0)):
        got = knn_prompt_entropy(x, labelled, k=k, d_ent=d_ent, standardize=False)
        torch.testing.assert_close(got, entropy_by_hand(x, labelled, k, d_ent), atol=1e-6, rtol=0)
    assert float(knn_radius(x, 1)[3]) == 0.0 and float(knn_radius(x, 1)[0]) > 0
    z = (x - x.mean(0)) / x.std(0, unbiased=False)
    torch.testing.assert_close(
        knn_prompt_entropy(x, labelled, k=4), entropy_by_hand(z, labelled, 4, 1.0), atol=1e-6, rtol=0
    )


def test_standardising_makes_feature_units_irrelevant() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 3, generator=g, dtype=torch.float64)
    scaled = x * torch.tensor([1000.0, 1.0, 0.01], dtype=torch.float64) + 5.0
    labelled = torch.arange(40) % 4 == 0
    torch.testing.assert_close(knn_prompt_entropy(scaled, labelled), knn_prompt_entropy(x, labelled))
    constant = torch.cat([x, torch.ones(40, 1, dtype=torch.float64)], 1)
    assert torch.isfinite(standardize_features(constant)).all()


def greedy_by_hand(bald, x, labelled, batch, k, beta):  # type: ignore[no-untyped-def]
    labelled = labelled.clone()
    picks = []
    for _ in range(batch):
        score = bald + beta * entropy_by_hand(x, labelled, k, 1.0)
        score[labelled] = -math.inf
        picks.append(int(score.argmax()))
        labelled[picks[-1]] = True
    return picks


def test_greedy_batch_matches_recomputing_from_scratch() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(25, 2, generator=g, dtype=torch.float64)
    bald = 0.1 * torch.rand(25, generator=g, dtype=torch.float64)
    labelled = torch.zeros(25, dtype=torch.bool)
    labelled[:5] = True
    got = balpm_select(bald, x, labelled, batch=6, k=3, beta=0.05, standardize=False)
    assert got.tolist() == greedy_by_hand(bald, x, labelled, 6, 3, 0.05)
    # beta = 0: BALD alone, the batch is its top entries among the unlabelled points
    top = bald.masked_fill(labelled, -1).argsort(descending=True)[:6]
    assert balpm_select(bald, x, labelled, batch=6, beta=0.0).tolist() == top.tolist()


def test_entropy_spreads_a_batch_over_sparse_regions() -> None:
    """Equal BALD everywhere: a dense labelled cluster and three sparse ones; the batch takes one
    point of each unlabelled cluster before a second of any."""
    g = torch.Generator().manual_seed(3)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]], dtype=torch.float64)
    cluster = torch.tensor([0] * 40 + [1] * 10 + [2] * 10 + [3] * 10)
    x = centres[cluster] + 0.5 * torch.randn(70, 2, generator=g, dtype=torch.float64)
    labelled = cluster == 0
    picks = balpm_select(torch.zeros(70, dtype=torch.float64), x, labelled, batch=3, k=5)
    assert sorted(cluster[picks].tolist()) == [1, 2, 3]


def test_bad_input_is_named() -> None:
    x = torch.randn(10, 2)
    mask = torch.zeros(10, dtype=torch.bool)
    with pytest.raises(ValueError, match="features"):
        knn_prompt_entropy(torch.full((10, 2), math.nan), mask)
    with pytest.raises(ValueError, match="labelled_mask"):
        knn_prompt_entropy(x, torch.zeros(10))
    with pytest.raises(ValueError, match="k must be"):
        knn_prompt_entropy(x, mask, k=10)
    with pytest.raises(ValueError, match="d_ent"):
        knn_prompt_entropy(x, mask, k=2, d_ent=0.0)
    with pytest.raises(ValueError, match="batch must be"):
        balpm_select(torch.zeros(10), x, mask.index_fill(0, torch.arange(8), True), batch=3, k=2)
    with pytest.raises(ValueError, match="bald must be"):
        balpm_select(torch.zeros(9), x, mask, batch=1, k=2)
    with pytest.raises(ValueError, match="beta"):
        balpm_select(torch.zeros(10), x, mask, batch=1, k=2, beta=math.inf)


# --- the effect: a synthetic pool where clusters of prompts need their own labels -------------

SIZES = (0.6, 0.1, 0.06, 0.06, 0.06, 0.04, 0.04, 0.04)  # prompt clusters of unequal size
SUB = 2  # feature dims per cluster: cluster c's two responses differ only in its own dims
DIM = SUB * len(SIZES)


def make_pool(n: int, g: torch.Generator, centres: torch.Tensor, w: torch.Tensor, ties: float):
    """Prompt features (n, DIM), response differences x_a - x_b (n, DIM) in the prompt's
    cluster's dims, Bradley-Terry labels of the hidden linear reward ``w``. A share ``ties`` of
    pairs are near-ties (two almost equal responses): labelling them teaches little."""
    cluster = torch.multinomial(torch.tensor(SIZES), n, replacement=True, generator=g)
    prompt = centres[cluster] + 0.3 * torch.randn(n, DIM, generator=g, dtype=torch.float64)
    own = torch.zeros(n, DIM, dtype=torch.float64)
    for c in range(len(SIZES)):
        own[cluster == c, SUB * c : SUB * (c + 1)] = 1.0
    scale = torch.where(torch.rand(n, 1, generator=g, dtype=torch.float64) < ties, 0.05, 1.0)
    diff = scale * own * torch.randn(n, DIM, generator=g, dtype=torch.float64)
    labels = (torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(diff @ w)).double()
    return prompt, diff, labels


def fit(diff: torch.Tensor, labels: torch.Tensor, anchors: torch.Tensor, scale: float = 2.0) -> torch.Tensor:
    """(M, DIM) linear Bradley-Terry rewards, each the MAP under a Gaussian prior N(anchor_m,
    scale^2) (an anchored ensemble: directions no label informs keep their anchors, so the
    members disagree there), by Newton steps, all members at once."""
    w, eye = anchors.clone(), torch.eye(DIM, dtype=torch.float64) / scale**2
    for _ in range(15):
        p = torch.sigmoid(diff @ w.T)
        grad = (p - labels[:, None]).T @ diff + (w - anchors) / scale**2
        hess = torch.einsum("nm,nd,ne->mde", p * (1 - p), diff, diff) + eye
        w = w - torch.linalg.solve(hess, grad.unsqueeze(-1)).squeeze(-1)
    return w


def labels_to_target(
    seed: int, select: dict | None, target: float = 0.93, batch: int = 20, rounds: int = 12
) -> int:
    """Labels until the reward model fitted to them ranks ``target`` of fresh pairs as the hidden
    reward does: 10 random ones, then batches chosen at random (``select`` None) or by
    :func:`balpm_select` with keywords ``select`` on the BALD of a 5-member ensemble."""
    g = torch.Generator().manual_seed(seed)
    centres = 4.0 * torch.randn(len(SIZES), DIM, generator=g, dtype=torch.float64)
    w_true = 3.0 * torch.nn.functional.normalize(
        torch.randn(len(SIZES), SUB, generator=g, dtype=torch.float64), dim=1
    )
    w_true = w_true.flatten()
    prompt, diff, labels = make_pool(1500, g, centres, w_true, ties=0.5)
    _, test_diff, _ = make_pool(4000, g, centres, w_true, ties=0.0)
    labelled = torch.zeros(len(diff), dtype=torch.bool)
    labelled[torch.randperm(len(diff), generator=g)[:10]] = True
    zero = torch.zeros(1, DIM, dtype=torch.float64)

    def reached() -> bool:
        model = fit(diff[labelled], labels[labelled], zero)[0]  # the reward model judged
        return float(((test_diff @ model > 0) == (test_diff @ w_true > 0)).double().mean()) >= target

    for _ in range(rounds):
        if reached():
            return int(labelled.sum())
        if select is None:
            free = (~labelled).nonzero().flatten()
            pick = free[torch.randperm(len(free), generator=g)[:batch]]
        else:
            anchors = 2.0 * torch.randn(5, DIM, generator=g, dtype=torch.float64)
            members = fit(diff[labelled], labels[labelled], anchors)
            bald = binary_bald(torch.sigmoid(diff @ members.T).T)
            pick = balpm_select(bald, prompt, labelled, batch, **select)
        labelled[pick] = True
    return int(labelled.sum()) + (0 if reached() else batch)  # not reached: one batch past the budget


def test_balpm_needs_fewer_labels_than_random_selection() -> None:
    seeds = range(3)
    # beta sized to this pool's BALD (up to log 2): at the main run's 0.01 the entropy term hardly
    # moves BALD's picks here (30 seeds: 147 labels vs BALD alone 153, random 204; beta 0.1: 135)
    balpm = [labels_to_target(s, {"beta": 0.1}) for s in seeds]
    rand = [labels_to_target(s, None) for s in seeds]
    assert sum(balpm) / 3 < 0.8 * sum(rand) / 3, (balpm, rand)


# --- scripts/select_pairs.py on a features file ------------------------------------------------


def write_ensemble(folder: Path, in_dim: int, members: int) -> None:
    """A model folder as scripts/train_reward.py writes it, heads fitted to random pairs."""
    from dataclasses import asdict

    from diffalign_rewards.bradley_terry import ModelSpec, TrainRewardConfig, fit_heads

    spec = ModelSpec(hidden_dim=8, ensemble_size=members)
    cfg = TrainRewardConfig(data=folder, output_dir=folder, epochs=1)
    emb = torch.randn(20, in_dim, generator=torch.Generator().manual_seed(5))
    pairs = torch.arange(20).reshape(10, 2)
    heads = fit_heads(emb, pairs, torch.ones(10), torch.arange(10), spec, cfg)
    folder.mkdir(parents=True)
    (folder / "bradley_terry.json").write_text(json.dumps(asdict(spec)))
    save_file(heads.file_state(), str(folder / "head.safetensors"))


def test_select_pairs_script(tmp_path: Path) -> None:
    from script_loader import load_script

    from diffalign_rewards.bradley_terry import load_heads, preference_probability

    main = load_script("select_pairs").main
    write_ensemble(tmp_path / "ens", in_dim=4, members=3)
    g = torch.Generator().manual_seed(4)
    first, second = torch.randn(50, 4, generator=g), torch.randn(50, 4, generator=g)
    labelled = (torch.arange(50) < 10).to(torch.uint8)
    pool = tmp_path / "pool.safetensors"
    save_file({"first": first, "second": second, "labelled": labelled}, str(pool))
    out = tmp_path / "sel.json"
    args = [f"reward={tmp_path / 'ens'}", f"pool={pool}", f"output={out}"]
    assert main([*args, "batch=5"]) == 0
    chosen = [row["index"] for row in json.loads(out.read_text())["selected"]]
    _, heads = load_heads(tmp_path / "ens", 4)
    with torch.no_grad():
        probs = preference_probability(heads.member_scores(first) - heads.member_scores(second), "logistic")
    bald = binary_bald(probs)
    features = (first + second).double() / 2
    assert chosen == balpm_select(bald, features, labelled.bool(), 5).tolist()
    assert all(i >= 10 for i in chosen)
    with pytest.raises(ValueError, match="between 1 and the pool's 40 unlabelled"):
        main([*args, "batch=41"])
    save_file({"first": first, "second": second, "labelled": torch.ones(50, dtype=torch.uint8)}, str(pool))
    with pytest.raises(ValueError, match="no unlabelled pairs"):
        main([*args, "batch=1"])
    with pytest.raises(FileNotFoundError, match=r"missing\.safetensors"):
        main(
            [
                f"reward={tmp_path / 'ens'}",
                f"pool={tmp_path / 'missing.safetensors'}",
                f"output={out}",
                "batch=1",
            ]
        )
    write_ensemble(tmp_path / "one", in_dim=4, members=1)
    with pytest.raises(ValueError, match="ensemble_size >= 2"):
        main([f"reward={tmp_path / 'one'}", f"pool={pool}", f"output={out}", "batch=1"])
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"empty\.jsonl"):
        main([f"reward={tmp_path / 'ens'}", f"pool={tmp_path / 'empty.jsonl'}", f"output={out}", "batch=1"])


def test_select_pairs_names_the_bad_tensor_and_option(tmp_path: Path) -> None:
    from script_loader import load_script

    main = load_script("select_pairs").main
    write_ensemble(tmp_path / "ens", in_dim=4, members=2)
    g = torch.Generator().manual_seed(4)
    first, second = torch.randn(30, 4, generator=g), torch.randn(30, 4, generator=g)
    wide = {"first": torch.randn(30, 5), "second": torch.randn(30, 5)}
    nan = first.clone().index_fill_(0, torch.tensor([3]), torch.nan)
    bad = {
        "width": (wide, "pool has E=5 features but reward .*/ens expects 4"),
        "prompt_rows": ({"prompt": torch.randn(7, 3)}, r"`prompt` has 7 rows but the pool has 30 pairs"),
        "prompt_1d": ({"prompt": torch.randn(30)}, r"`prompt` must be \(N, D\), got shape \(30,\)"),
        "labelled_rows": ({"labelled": torch.zeros(5)}, r"`labelled` has 5 rows but the pool has 30 pairs"),
        "labelled_half": ({"labelled": torch.full((30,), 0.5)}, r"`labelled` must hold 0 .* or 1"),
        "nan": ({"first": nan}, "`first` and `second` must be finite"),
    }  # fmt: skip
    for name, (tensors, message) in bad.items():
        pool = tmp_path / f"{name}.safetensors"
        save_file({"first": first, "second": second, **tensors}, str(pool))
        args = [f"reward={tmp_path / 'ens'}", f"pool={pool}", f"output={tmp_path / 'o.json'}", "batch=1"]
        with pytest.raises(ValueError, match=rf"{name}\.safetensors: {message}"):
            main(args)
    pool = tmp_path / "good.safetensors"
    save_file({"first": first, "second": second}, str(pool))
    args = [f"reward={tmp_path / 'ens'}", f"pool={pool}", f"output={tmp_path / 'o.json'}", "batch=1"]
    with pytest.raises(ValueError, match=r"labelled=.*good\.safetensors: only for image pools"):
        main([*args, f"labelled={pool}"])
    assert main(args) == 0
