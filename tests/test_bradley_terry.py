"""Bradley-Terry reward training on synthetic pairs whose truth is a known function of the image."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from diffalign.data import read_preference_pairs
from diffalign.images import to_pil
from diffalign.rewards import load_reward
from diffalign_rewards.bradley_terry import TrainRewardConfig, train_bradley_terry


def redness(image: torch.Tensor) -> float:
    return float(image[0].mean() - image[2].mean())


def synthetic_images(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    colours = torch.rand(n, 3, 1, 1, generator=g)
    return [
        ((c + 0.1 * torch.randn(3, 32, 32, generator=g)).clamp(0, 1) * 255).round() / 255 for c in colours
    ]


def png(image: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    to_pil(image[None])[0].save(buffer, format="PNG")
    return buffer.getvalue()


def write_jsonl(
    root: Path, n_images: int = 240, n_pairs: int = 1200, seed: int = 0, masks: bool = False
) -> Path:
    images = synthetic_images(n_images, seed)
    (root / "img").mkdir(parents=True)
    for i, im in enumerate(images):
        (root / "img" / f"{i}.png").write_bytes(png(im))
    if masks:
        (root / "img" / "mask.png").write_bytes(
            png(torch.zeros(3, 32, 32).index_fill_(2, torch.arange(16), 1.0))
        )
    g = torch.Generator().manual_seed(seed + 1)
    rows = []
    while len(rows) < n_pairs:
        a, b = torch.randint(n_images, (2,), generator=g).tolist()
        gap = redness(images[a]) - redness(images[b])
        if abs(gap) < 0.05:  # near-ties carry no signal for an exact truth
            continue
        w, lo = (a, b) if gap > 0 else (b, a)
        row = {"prompt": "an image", "chosen": f"img/{w}.png", "rejected": f"img/{lo}.png"}
        if masks:
            row["mask"] = "img/mask.png"
        rows.append(row)
    path = root / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def _spec(clip: Path, inpainting: bool = False):  # type: ignore[no-untyped-def]
    from diffalign_rewards.bradley_terry import ModelSpec

    return ModelSpec(backbone="transformers", backbone_path=str(clip), inpainting=inpainting, hidden_dim=64)


def test_training_reaches_90_percent_held_out_accuracy(tmp_path: Path, reward_assets) -> None:
    data = write_jsonl(tmp_path / "data")
    out = tmp_path / "bt"
    metrics = train_bradley_terry(
        TrainRewardConfig(data=data, output_dir=out, model=_spec(reward_assets["clip"]), epochs=60, lr=3e-3)
    )
    assert metrics["validation_pairs"] == 120
    assert metrics["validation_accuracy"] >= 0.9, metrics
    # the saved model is a reward like any other, and ranks unseen images by the truth
    reward = load_reward("bradley_terry", path=out)
    fresh = torch.stack(synthetic_images(40, seed=99))
    scores = reward(fresh)
    truth = torch.tensor([redness(im) for im in fresh])
    i, j = torch.triu_indices(40, 40, 1)
    decided = (truth[i] - truth[j]).abs() > 0.05
    agree = ((scores[i] > scores[j]) == (truth[i] > truth[j]))[decided].float().mean()
    assert float(agree) >= 0.85
    assert (
        json.loads((out / "metrics.json").read_text())["validation_accuracy"]
        == metrics["validation_accuracy"]
    )


def test_inpainting_variant_needs_masks(tmp_path: Path, reward_assets) -> None:
    data = write_jsonl(tmp_path / "data", n_images=30, n_pairs=40, masks=True)
    out = tmp_path / "bt"
    train_bradley_terry(
        TrainRewardConfig(
            data=data, output_dir=out, model=_spec(reward_assets["clip"], inpainting=True), epochs=1
        )
    )
    reward = load_reward("bradley_terry", path=out)
    images = torch.stack(synthetic_images(2, seed=5))
    assert reward(images, masks=torch.zeros(2, 1, 32, 32)).shape == (2,)
    with pytest.raises(ValueError, match="needs `masks`"):
        reward(images)


def test_open_clip_backbone(tmp_path: Path, reward_assets) -> None:
    from reward_assets import TINY_OPEN_CLIP

    from diffalign_rewards.bradley_terry import ModelSpec

    data = write_jsonl(tmp_path / "data", n_images=30, n_pairs=40)
    spec = ModelSpec(
        backbone="open_clip", backbone_path=TINY_OPEN_CLIP, backbone_weights=str(reward_assets["open_clip"])
    )
    out = tmp_path / "bt"
    train_bradley_terry(TrainRewardConfig(data=data, output_dir=out, model=spec, epochs=1))
    reward = load_reward("bradley_terry", path=out)
    assert reward.embed.dim == 16
    assert reward(torch.stack(synthetic_images(3, seed=4))).shape == (3,)


def test_pick_a_pic_parquet_and_ties(tmp_path: Path) -> None:
    images = [png(im) for im in synthetic_images(4, seed=3)]
    table = pa.table({
        "caption": ["a", "b", "c"],
        "jpg_0": images[:3],
        "jpg_1": images[1:],
        "label_0": [1.0, 0.0, 0.5],
        "label_1": [0.0, 1.0, 0.5],
    })  # fmt: skip
    path = tmp_path / "pairs.parquet"
    pq.write_table(table, path)
    dropped = read_preference_pairs(path)
    assert [r.prompt for r in dropped] == ["a", "b"]
    assert dropped[0].chosen == images[0] and dropped[1].chosen == images[2]  # label_0 = 0: jpg_1 wins
    kept = read_preference_pairs(path, ties="half")
    assert [r.label for r in kept] == [1.0, 1.0, 0.5]


def test_bad_rows_are_named_or_skipped(tmp_path: Path, reward_assets) -> None:
    data = write_jsonl(tmp_path / "data", n_images=20, n_pairs=30)
    lines = data.read_text().splitlines()
    lines[3] = json.dumps({"prompt": "x", "chosen": "img/missing.png", "rejected": "img/0.png"})
    (tmp_path / "data" / "img" / "1.png").write_bytes(b"not an image")
    lines[4] = json.dumps({"prompt": "x", "chosen": "img/1.png", "rejected": "img/0.png"})
    data.write_text("\n".join(lines))
    cfg = TrainRewardConfig(
        data=data, output_dir=tmp_path / "bt", model=_spec(reward_assets["clip"]), epochs=1
    )
    with pytest.raises(FileNotFoundError, match=r"pairs\.jsonl:4: image file not found: .*missing\.png"):
        train_bradley_terry(cfg)
    cfg.on_bad_sample = "skip"
    metrics = train_bradley_terry(cfg)
    bad = sum(1 for line in lines if '"img/1.png"' in line or "missing" in line)
    assert metrics["skipped_pairs"] == bad and metrics["pairs"] == 30 - bad
    (tmp_path / "broken.jsonl").write_text('{"prompt": "x", "chosen": "a.png"}\n')
    with pytest.raises(ValueError, match=r"broken\.jsonl:1: missing key 'rejected'"):
        read_preference_pairs(tmp_path / "broken.jsonl")


def test_script_help_documents_every_option() -> None:
    import dataclasses
    import subprocess
    import sys

    from diffalign_rewards.bradley_terry import ModelSpec
    from diffalign_rewards.prefpaint import PrefPaintTrainSpec

    root = Path(__file__).resolve().parents[1]
    text = subprocess.run(
        [sys.executable, str(root / "scripts" / "train_reward.py"), "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    sections = {"model": ModelSpec, "prefpaint": PrefPaintTrainSpec}
    for f in dataclasses.fields(TrainRewardConfig):
        assert f"  {f.name} (" in text or f.name in sections, f.name
    for section, spec in sections.items():
        for f in dataclasses.fields(spec):
            assert f"  {section}.{f.name} (" in text, f"{section}.{f.name}"


def test_hf_dataset_folder(tmp_path: Path) -> None:
    import datasets

    images = [png(im) for im in synthetic_images(3, seed=6)]
    data = datasets.Dataset.from_dict(
        {
            "caption": ["a", "b"],
            "jpg_0": images[:2],
            "jpg_1": images[1:],
            "label_0": [0.0, 0.5],
            "label_1": [1.0, 0.5],
        }
    )
    datasets.DatasetDict({"train": data}).save_to_disk(str(tmp_path / "ds"))
    records = read_preference_pairs(tmp_path / "ds")
    assert [r.prompt for r in records] == ["a"] and records[0].chosen == images[1]
    with pytest.raises(ValueError, match="no split 'validation'"):
        read_preference_pairs(tmp_path / "ds", split="validation")
    with pytest.raises(FileNotFoundError, match="preference data not found"):
        read_preference_pairs(tmp_path / "missing.parquet")


def test_pairs_sharing_an_image_are_held_out_together(tmp_path: Path) -> None:
    """Four inpaintings of one masked input make six pairs: none of their images may sit on both
    sides of the split, or held-out accuracy would score images the model trained on."""
    from itertools import combinations

    from diffalign.data.preference import PairRecord
    from diffalign_rewards.bradley_terry import TrainRewardConfig, split_usable_pairs

    groups = [list(combinations(range(4 * g, 4 * g + 4), 2)) for g in range(10)]
    singles = [(40 + 2 * i, 41 + 2 * i) for i in range(20)]  # pairs of distinct images
    index = torch.tensor([pair for group in groups for pair in group] + singles)
    records = [
        PairRecord(prompt="", chosen=b"", rejected=b"", label=1.0, where=f"row {i}")
        for i in range(len(index))
    ]
    cfg = TrainRewardConfig(
        data=tmp_path / "pairs.jsonl", output_dir=tmp_path / "out", validation_fraction=0.2
    )
    split = split_usable_pairs(records, index, torch.ones(80, dtype=torch.bool), cfg)
    train_images = set(split.pairs[split.train].flatten().tolist())
    val_images = set(split.pairs[split.val].flatten().tolist())
    assert train_images.isdisjoint(val_images)
    assert len(split.val) >= round(0.2 * len(index)) and len(split.val) + len(split.train) == len(index)
    assert 0 < len(split.val) < len(index)


def test_link_log_likelihoods_match_their_formulas() -> None:
    from diffalign_rewards.bradley_terry import pair_log_likelihood, pair_nll, preference_probability

    margin = torch.tensor([-3.0, -0.4, 0.0, 0.7, 5.0], dtype=torch.float64)
    labels = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.5], dtype=torch.float64)

    def by_hand(link: str) -> list[float]:
        out = []
        for m, y in zip(margin.tolist(), labels.tolist(), strict=True):
            # Thurstone case V: Phi(m / sqrt(2)) = (1 + erf(m / 2)) / 2
            p = 1 / (1 + math.exp(-m)) if link == "logistic" else 0.5 * (1 + math.erf(m / 2))
            out.append(y * math.log(p) + (1 - y) * math.log(1 - p))
        return out

    for link in ("logistic", "thurstone"):
        got = pair_log_likelihood(margin, labels, link)
        torch.testing.assert_close(got, torch.tensor(by_hand(link), dtype=torch.float64), atol=1e-6, rtol=0)
        torch.testing.assert_close(pair_nll(margin, labels, link), -got.mean(), atol=1e-6, rtol=0)
        torch.testing.assert_close(
            preference_probability(margin, link),
            pair_log_likelihood(margin, torch.ones_like(margin), link).exp(),
        )
        m = margin.clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda x, link=link: pair_log_likelihood(x, labels, link), (m,))
    far = torch.tensor([-60.0], dtype=torch.float64)  # log space: no log(0)
    assert torch.isfinite(pair_log_likelihood(far, torch.ones(1, dtype=torch.float64), "thurstone")).all()
    with pytest.raises(ValueError, match="link must be"):
        pair_log_likelihood(margin, labels, "probit")


def test_single_head_file_keeps_its_keys_and_members_differ(tmp_path: Path) -> None:
    from diffalign_rewards.bradley_terry import ModelSpec, fit_heads

    emb = torch.randn(30, 5, generator=torch.Generator().manual_seed(0))
    pairs, labels = torch.arange(30).reshape(15, 2), torch.ones(15)
    cfg = TrainRewardConfig(data=tmp_path, output_dir=tmp_path, epochs=2, batch_size=4)
    one = fit_heads(emb, pairs, labels, torch.arange(15), ModelSpec(hidden_dim=4), cfg)
    assert set(one.file_state()) == {"0.weight", "0.bias", "2.weight", "2.bias"}  # as before ensembles
    three = fit_heads(emb, pairs, labels, torch.arange(15), ModelSpec(hidden_dim=4, ensemble_size=3), cfg)
    assert set(three.file_state()) == {f"{m}.{k}" for m in range(3) for k in one.file_state()}
    scores = three.member_scores(emb)
    assert scores.shape == (3, 30) and not torch.allclose(scores[0], scores[1])
    torch.testing.assert_close(three(emb), scores.mean(0))
    # member 0 is seeded as a single head is: the same head
    torch.testing.assert_close(scores[0], one(emb))
    with pytest.raises(ValueError, match="ensemble_size"):
        ModelSpec(ensemble_size=0)


def test_ensemble_thurstone_and_annotator_report(tmp_path: Path, reward_assets) -> None:
    data = write_jsonl(tmp_path / "data", n_images=40, n_pairs=120)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    data.write_text("\n".join(json.dumps(r | {"annotator": f"u{i % 3}"}) for i, r in enumerate(rows)))
    spec = _spec(reward_assets["clip"])
    spec.ensemble_size, spec.link = 3, "thurstone"
    out = tmp_path / "bt"
    metrics = train_bradley_terry(
        TrainRewardConfig(data=data, output_dir=out, model=spec, epochs=3, annotator_min_pairs=5)
    )
    assert metrics["annotators"] == 3 and metrics["annotators_modelled"] == 3
    assert math.isfinite(metrics["validation_loglik_gain"])
    saved = json.loads((out / "bradley_terry.json").read_text())
    assert saved["link"] == "thurstone" and saved["ensemble_size"] == 3
    reward = load_reward("bradley_terry", path=out)
    images = torch.stack(synthetic_images(4, seed=7))
    members = reward.member_scores(images)
    assert members.shape == (3, 4)
    torch.testing.assert_close(reward(images), members.mean(0))


def test_annotator_ids_are_read(tmp_path: Path) -> None:
    images = [png(im) for im in synthetic_images(3, seed=8)]
    table = pa.table({
        "caption": ["a", "b"], "jpg_0": images[:2], "jpg_1": images[1:],
        "label_0": [1.0, 0.0], "label_1": [0.0, 1.0], "user_id": [7, 9],
    })  # fmt: skip
    pq.write_table(table, tmp_path / "pairs.parquet")
    assert [r.annotator for r in read_preference_pairs(tmp_path / "pairs.parquet")] == ["7", "9"]
    rows = [
        {"prompt": "x", "chosen": "a.png", "rejected": "b.png", "annotator": "ann"},
        {"prompt": "y", "chosen": "a.png", "rejected": "b.png"},
    ]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert [r.annotator for r in read_preference_pairs(tmp_path / "pairs.jsonl")] == ["ann", None]
