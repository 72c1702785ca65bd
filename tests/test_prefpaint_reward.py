"""PrefPaint's trust matrix V^-1 (computing, saving, loading) and training the PrefPaint reward on
synthetic inpainting pairs whose better image is known: the brighter fill of the hole wins."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from script_loader import load_script

from diffalign.data import load_image, read_preference_pairs
from diffalign.images import to_pil
from diffalign.rewards import load_reward
from diffalign_rewards._weights import WeightsError
from diffalign_rewards.bradley_terry import TrainRewardConfig, index_pair_images, split_usable_pairs
from diffalign_rewards.prefpaint import (
    OFFICIAL_PREFIXES,
    PrefPaintReward,
    PrefPaintTrainSpec,
    register_open_clip_config,
    trust_bounds,
    trust_matrix,
)
from diffalign_rewards.prefpaint_training import build_trainee, fit_prefpaint, save_prefpaint

SIZE = 16
TINY_MODEL = "diffalign-test-prefpaint-vit"
# a ViT small enough to train on a CPU in seconds; its text tower is never used by PrefPaint
TINY_CONFIG = {
    "embed_dim": 32,
    "quick_gelu": True,  # as OpenAI's CLIP, which the official checkpoint carries
    "vision_cfg": {"image_size": SIZE, "layers": 2, "width": 64, "head_width": 32, "patch_size": 4},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}
register_open_clip_config(TINY_MODEL, TINY_CONFIG, __file__)


def tiny_spec(**overrides: object) -> PrefPaintTrainSpec:
    options = {"model_name": TINY_MODEL, "open_clip_config": TINY_CONFIG, "heads": 4, "ff_dim": 128}
    return PrefPaintTrainSpec(**{**options, "train_backbone": True, **overrides})


def official_state(reward: PrefPaintReward) -> dict[str, torch.Tensor]:
    """The reward's weights under the official ``ImageReward`` module's key names."""
    state = {f"clip.{k}": v for k, v in reward.towers.model.state_dict().items()}
    state |= {f"head.{k}": v for k, v in reward.head.state_dict().items()}
    out = {}
    for key, value in state.items():
        official, ours = next((o, d) for o, d in OFFICIAL_PREFIXES if key.startswith(d))
        out[official + key.removeprefix(ours)] = value.cpu()
    return out


def save_png(image: torch.Tensor, path: Path) -> None:
    to_pil(image[None])[0].save(path)


def inpainting(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth background (3, S, S) and a 6 x 6 hole (1, S, S) somewhere in it."""
    coarse = torch.rand(1, 3, 4, 4, generator=g)
    background = torch.nn.functional.interpolate(coarse, size=SIZE, mode="bilinear")[0]
    top, left = torch.randint(0, SIZE - 6, (2,), generator=g).tolist()
    mask = torch.zeros(1, SIZE, SIZE)
    mask[:, top : top + 6, left : left + 6] = 1.0
    return background, mask


def filled(
    background: torch.Tensor, mask: torch.Tensor, brightness: float, g: torch.Generator
) -> torch.Tensor:
    fill = (brightness + 0.05 * torch.randn(3, SIZE, SIZE, generator=g)).clamp(0, 1)
    return torch.where(mask >= 0.5, fill, background)


def write_pairs(root: Path, n_pairs: int, seed: int = 0) -> Path:
    """Pair rows with a mask; every image is in one pair only, so held-out images are unseen."""
    g = torch.Generator().manual_seed(seed)
    (root / "img").mkdir(parents=True)
    rows = []
    for i in range(n_pairs):
        background, mask = inpainting(g)
        low, high = sorted(torch.rand(2, generator=g).tolist())
        high = min(1.0, high + 0.15)  # a visible gap: the truth is exact, not a near-tie
        files = {"mask": mask.expand(3, -1, -1), "w": filled(background, mask, high, g)}
        files["l"] = filled(background, mask, low, g)
        for name, image in files.items():
            save_png(image, root / "img" / f"{i}_{name}.png")
        rows.append({"prompt": "", "chosen": f"img/{i}_w.png", "rejected": f"img/{i}_l.png"})
        rows[-1]["mask"] = f"img/{i}_mask.png"
    path = root / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    root = tmp_path_factory.mktemp("prefpaint")
    cfg = TrainRewardConfig(
        data=write_pairs(root / "data", 200), output_dir=root / "model", architecture="prefpaint",
        prefpaint=tiny_spec(), epochs=10,
    )  # fmt: skip
    reward, metrics = fit_prefpaint(cfg)
    save_prefpaint(reward, metrics, cfg.output_dir)
    return reward, metrics, cfg


def test_trust_matrix_is_the_ridge_inverse_of_the_second_moment() -> None:
    features = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 2.0], [0.0, 0.0]])
    # F^T F / 4 + 1 I = [[8, 4], [4, 8]] / 4 + I = [[3, 1], [1, 3]], determinant 8
    got = trust_matrix(features, ridge=1.0)
    assert got.dtype == torch.float32 and got.shape == (2, 2)
    torch.testing.assert_close(got, torch.tensor([[3.0, -1.0], [-1.0, 3.0]]) / 8)
    # one feature direction: V^-1 is 1 / ridge across it, 1 / (second moment + ridge) along it
    along = trust_matrix(torch.tensor([[2.0, 0.0]]))  # ridge 0.01 by default
    torch.testing.assert_close(along, torch.diag(torch.tensor([1 / 4.01, 100.0])))
    # the bound ||f V^-1||: 100 across the data, 2 / 4.01 on a training feature
    bounds = trust_bounds(torch.tensor([[0.0, 1.0], [2.0, 0.0]]), along)
    torch.testing.assert_close(bounds, torch.tensor([100.0, 2 / 4.01]))


@pytest.mark.parametrize(
    ("features", "ridge", "message"),
    [
        (torch.zeros(0, 3), 0.01, "N >= 1"),
        (torch.zeros(3), 0.01, "N >= 1"),
        (torch.tensor([[1.0, float("nan")]]), 0.01, "NaN or inf"),
        (torch.ones(2, 2), 0.0, "ridge must be a positive"),
    ],
)
def test_trust_matrix_refuses_bad_input(features: torch.Tensor, ridge: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        trust_matrix(features, ridge)


def test_training_ranks_held_out_pairs_and_saves_a_loadable_reward(trained) -> None:
    reward, metrics, cfg = trained
    assert metrics["validation_pairs"] == 20 and metrics["pairs"] == 200
    assert metrics["validation_accuracy"] > 0.8, metrics
    loaded = load_reward("prefpaint", weights=cfg.output_dir)
    g = torch.Generator().manual_seed(7)
    background, mask = inpainting(g)
    images = torch.stack([filled(background, mask, b, g) for b in (0.1, 0.5, 0.9)])
    images = (images * 255).round() / 255
    masks = mask.expand(3, 1, -1, -1)
    for normalize in (False, True):
        reward.normalize = loaded.normalize = normalize
        torch.testing.assert_close(loaded(images, masks=masks), reward(images, masks=masks), rtol=0, atol=0)
    reward.normalize = loaded.normalize = False
    torch.testing.assert_close(loaded.v_inverse, reward.v_inverse, rtol=0, atol=0)
    scores, features = loaded.score_with_features(images, masks)
    assert features.shape == (3, 256) and loaded.v_inverse.shape == (256, 256)
    assert scores[2] > scores[1] > scores[0]  # brighter fills win on an input never seen


def test_metrics_trust_bounds_match_the_saved_v_inverse(trained) -> None:
    _, metrics, cfg = trained
    assert json.loads((cfg.output_dir / "metrics.json").read_text()) == metrics
    loaded = load_reward("prefpaint", weights=cfg.output_dir)
    v_inverse = load_file(str(cfg.output_dir / "v_inverse.safetensors"))["v_inverse"]
    records = read_preference_pairs(cfg.data)
    images, index = index_pair_images(records, inpainting=True)
    split = split_usable_pairs(records, index, torch.ones(len(images), dtype=torch.bool), cfg)
    pixels = torch.stack([load_image(im.image, im.where, SIZE) for im in images])
    masks = torch.stack([load_image(im.mask, im.where, SIZE, grey=True) for im in images])
    bounds = trust_bounds(loaded.score_with_features(pixels, masks)[1], v_inverse)
    train = split.pairs[split.train].unique()
    held_out = split.pairs[split.val].unique()  # every image is in one pair: none is also trained on
    assert (
        metrics["train_images"] == len(train) == 360 and metrics["validation_images"] == len(held_out) == 40
    )
    for name, ids in (("train", train), ("validation", held_out)):
        expected = torch.quantile(bounds[ids].double(), torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
        got = [metrics[f"trust_bound_{name}_{q}"] for q in ("min", "median", "max")]
        assert got == pytest.approx(expected.tolist(), rel=1e-4)
    # V^-1 is the trust matrix of the training images' features
    torch.testing.assert_close(
        trust_matrix(loaded.score_with_features(pixels[train], masks[train])[1], cfg.prefpaint.ridge),
        v_inverse, rtol=1e-3, atol=1e-3,
    )  # fmt: skip


def copy_model(source: Path, target: Path) -> Path:
    target.mkdir()
    for name in ("prefpaint.json", "prefpaint.safetensors"):
        shutil.copy(source / name, target / name)
    return target


def test_v_inverse_files_beside_the_weights(trained, tmp_path: Path) -> None:
    reward, _, cfg = trained
    matrix = reward.v_inverse.cpu()
    ours = copy_model(cfg.output_dir, tmp_path / "ours")
    assert load_reward("prefpaint", weights=ours).v_inverse is None  # no file: no trust weights
    save_file({"v_inverse": matrix}, str(ours / "v_inverse.safetensors"))
    assert torch.equal(load_reward("prefpaint", weights=ours / "prefpaint.safetensors").v_inverse, matrix)

    official = tmp_path / "official"
    official.mkdir()
    torch.save(official_state(reward), official / "prefpaintReward.pt")
    torch.save(matrix.T.contiguous().T, official / "V_inverse.pt")  # non-contiguous, as the release's
    kwargs = {"model_name": TINY_MODEL, "heads": 4, "ff_dim": 128}
    from_pt = load_reward("prefpaint", weights=official, **kwargs)
    assert torch.equal(from_pt.v_inverse, matrix)
    images, masks = torch.rand(2, 3, SIZE, SIZE), torch.ones(2, 1, SIZE, SIZE)
    torch.testing.assert_close(from_pt(images, masks=masks), reward(images, masks=masks), rtol=0, atol=0)

    explicit = load_reward("prefpaint", random_weights=True, v_inverse=official / "V_inverse.pt", **kwargs)
    assert torch.equal(explicit.v_inverse, matrix)
    shutil.copy(official / "V_inverse.pt", ours / "V_inverse.pt")
    with pytest.raises(WeightsError, match="are both beside the weights; pass v_inverse="):
        load_reward("prefpaint", weights=ours)
    # random weights look for no file beside anything
    assert load_reward("prefpaint", random_weights=True, **kwargs).v_inverse is None


@pytest.mark.parametrize(
    ("file", "content", "message"),
    [
        ("v_inverse.safetensors", {"v_inverse": torch.eye(3)}, r"V\^-1 must be a float \(256, 256\)"),
        (
            "v_inverse.safetensors",
            {"v_inverse": torch.full((256, 256), float("nan"))},
            r"V\^-1 has NaN or infinite entries",
        ),
        ("v_inverse.safetensors", {"V_inverse": torch.eye(256)}, "no tensor 'v_inverse' \\(has V_inverse\\)"),
        ("V_inverse.pt", torch.eye(256)[:, :8], r"V\^-1 must be a float \(256, 256\)"),
        (
            "V_inverse.pt",
            torch.eye(256, dtype=torch.int64),
            r"V\^-1 must be a float \(256, 256\) .*torch.int64",
        ),
        ("V_inverse.pt", b"not a tensor file", "not a weights-only tensor file"),
    ],
)
def test_bad_v_inverse_is_named(trained, tmp_path: Path, file: str, content: object, message: str) -> None:
    folder = copy_model(trained[2].output_dir, tmp_path / "model")
    if isinstance(content, bytes):
        (folder / file).write_bytes(content)
    elif file.endswith(".safetensors"):
        save_file(content, str(folder / file))
    else:
        torch.save(content, folder / file)
    with pytest.raises(WeightsError, match=rf"{file}: {message}"):
        load_reward("prefpaint", weights=folder)


def test_the_model_description_rebuilds_an_unknown_clip(trained, tmp_path: Path) -> None:
    reward, _, cfg = trained
    folder = copy_model(cfg.output_dir, tmp_path / "renamed")
    spec = json.loads((folder / "prefpaint.json").read_text())
    spec["model_name"] = "diffalign-test-prefpaint-vit-renamed"  # as in a fresh process: unknown
    (folder / "prefpaint.json").write_text(json.dumps(spec))
    images, masks = torch.rand(2, 3, SIZE, SIZE), torch.ones(2, 1, SIZE, SIZE)
    torch.testing.assert_close(
        load_reward("prefpaint", weights=folder)(images, masks=masks),
        reward(images, masks=masks),
        rtol=0,
        atol=0,
    )
    with pytest.raises(ValueError, match=r"prefpaint\.json: the model has heads=4, but heads=8 was passed"):
        load_reward("prefpaint", weights=folder, heads=8)
    spec["open_clip_config"]["embed_dim"] = 16
    (folder / "prefpaint.json").write_text(json.dumps(spec))
    with pytest.raises(
        ValueError, match="already has a different model config named 'diffalign-test-prefpaint"
    ):
        load_reward("prefpaint", weights=folder)


def test_frozen_clip_from_open_clip_weights(tmp_path: Path) -> None:
    """The CLIP is read from open_clip weights and stays as read; only the head trains."""
    import open_clip

    clip_file = tmp_path / "clip.safetensors"
    save_file(open_clip.create_model(TINY_MODEL).state_dict(), str(clip_file))
    cfg = TrainRewardConfig(
        data=write_pairs(tmp_path / "data", 24, seed=3), output_dir=tmp_path / "model",
        architecture="prefpaint", prefpaint=tiny_spec(train_backbone=False, clip_weights=str(clip_file)),
        epochs=2,
    )  # fmt: skip
    reward, metrics = fit_prefpaint(cfg)
    assert metrics["pairs"] == 24 and metrics["trust_bound_train_max"] > 0
    for key, value in load_file(str(clip_file)).items():
        assert torch.equal(reward.towers.model.state_dict()[key], value), key


def test_training_starts_from_a_trained_folder(trained) -> None:
    reward, _, cfg = trained
    trainee = build_trainee(tiny_spec(init_weights=str(cfg.output_dir), dropout=0.3))
    for key, value in reward.head.state_dict().items():
        assert torch.equal(trainee.head.state_dict()[key], value.cpu()), key
    assert trainee.head.block.dropout.p == 0.3 and trainee.head.mlp[1].p == 0.2
    with pytest.raises(ValueError, match="not both"):
        tiny_spec(init_weights="a", clip_weights="b")


def test_the_script_trains_prefpaint(tmp_path: Path) -> None:
    data = write_pairs(tmp_path / "data", 20, seed=4)
    config = tmp_path / "prefpaint.yaml"
    spec = {"model_name": TINY_MODEL, "open_clip_config": TINY_CONFIG, "heads": 4, "ff_dim": 128}
    config.write_text(
        json.dumps({"architecture": "prefpaint", "prefpaint": {**spec, "train_backbone": True}})
    )
    out = tmp_path / "model"
    assert (
        load_script("train_reward").main(
            ["--config", str(config), f"data={data}", f"output_dir={out}", "epochs=1"]
        )
        == 0
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "metrics.json", "prefpaint.json", "prefpaint.safetensors", "v_inverse.safetensors"
    ]  # fmt: skip
    assert load_reward("prefpaint", weights=out).v_inverse.shape == (256, 256)


def dihedral_moves(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 flips and quarter turns of the square images ``x`` (..., S, S); identity first, then
    the left-right flip."""
    turns = [torch.rot90(x, k, dims=(-2, -1)) for k in range(4)]
    return [turns[0], x.flip(-1), *turns[1:], *(torch.rot90(x.flip(-1), k, dims=(-2, -1)) for k in (1, 2, 3))]


@pytest.mark.parametrize("kind, moves", [("none", 1), ("hflip", 2), ("dihedral", 8)])
def test_augmentation_moves_an_image_and_its_masked_input_together(kind: str, moves: int) -> None:
    from diffalign_rewards.prefpaint_training import augment_pixels

    torch.manual_seed(0)
    pixels = torch.randint(0, 256, (400, 2, 3, 5, 5), dtype=torch.uint8)
    out = augment_pixels(pixels, kind)
    used = set()
    for before, after in zip(pixels, out, strict=True):
        # the image and its masked input (dim 0 of each sample) undergo one and the same move
        used.add(next(k for k, moved in enumerate(dihedral_moves(before)) if torch.equal(moved, after)))
    assert used == set(range(moves))


def test_augmentation_in_training_only(trained) -> None:
    from diffalign_rewards.prefpaint_training import PairScorer

    reward = trained[0]
    torch.manual_seed(0)
    pixels = torch.randint(0, 256, (6, 2, 3, SIZE, SIZE), dtype=torch.uint8)
    scorer = PairScorer(reward, pixels, "dihedral").eval()
    ids = torch.arange(6)
    plain = reward.head(*reward.embed(pixels.flatten(0, 1).float() / 255).unflatten(0, (6, 2)).unbind(1))
    torch.testing.assert_close(scorer(ids), plain)  # eval: the stored pixels as they are
    scorer.train()
    scorer.reward.eval()  # no dropout: only the moves differ
    assert not torch.allclose(scorer(ids)[0], plain[0])
    with pytest.raises(ValueError, match="augment='hflip' needs train_backbone=true"):
        tiny_spec(train_backbone=False, augment="hflip")


def test_the_packaged_config_reads() -> None:
    from diffalign.config import load_config

    path = Path(__file__).resolve().parents[1] / "configs" / "rewards" / "prefpaint.yaml"
    cfg = load_config(TrainRewardConfig, path)
    assert cfg.architecture == "prefpaint" and cfg.prefpaint.init_weights == "kd5678/prefpaintReward"
    assert not cfg.prefpaint.train_backbone and cfg.prefpaint.ridge == 0.01


def test_scored_images_become_pairs(tmp_path: Path) -> None:
    rows = [
        {"image": "a1.png", "mask": "ma.png", "score": 3, "group": "a"},
        {"image": "b1.png", "mask": "mb.png", "score": 1.0, "group": 7},
        {"image": "a2.png", "mask": "ma.png", "score": 1, "group": "a"},
        {"image": "c1.png", "score": 2, "group": "c"},  # alone in its group: no pair
        {"image": "a3.png", "mask": "ma.png", "score": 3.0, "group": "a"},
        {"image": "b2.png", "mask": "mb.png", "score": 5, "group": 7},
    ]
    path = tmp_path / "scored.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))

    def as_tuples(records: list) -> list[tuple]:
        return [(r.chosen.name, r.rejected.name, r.mask.name, r.label, r.where, r.rewards) for r in records]

    assert as_tuples(read_preference_pairs(path)) == [
        ("a1.png", "a2.png", "ma.png", 1.0, f"{path}:1+3", (3.0, 1.0)),
        ("a3.png", "a2.png", "ma.png", 1.0, f"{path}:3+5", (3.0, 1.0)),
        ("b2.png", "b1.png", "mb.png", 1.0, f"{path}:2+6", (5.0, 1.0)),
    ]
    tie = ("a1.png", "a3.png", "ma.png", 0.5, f"{path}:1+5", (3.0, 3.0))
    assert as_tuples(read_preference_pairs(path, ties="half"))[1] == tie
    assert read_preference_pairs(path)[0].chosen == tmp_path / "a1.png"


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"image": "x.png", "score": 1, "mask": "ma.png"}, r"scored\.jsonl:2: missing key 'group'"),
        (
            {"image": "x.png", "score": float("nan"), "group": "a"},
            r"scored\.jsonl:2: 'score' must be a finite number",
        ),
        (
            {"image": "x.png", "score": "high", "group": "a"},
            r"scored\.jsonl:2: 'score' must be a finite number",
        ),
        (
            {"image": "x.png", "score": 1, "group": "a", "mask": "other.png"},
            r"scored\.jsonl:2: 'mask' differs",
        ),
        (
            {"image": "x.png", "score": 1, "group": None, "mask": "ma.png"},
            r"scored\.jsonl:2: 'group' must be",
        ),
    ],
)
def test_bad_scored_rows_are_named(tmp_path: Path, row: dict, message: str) -> None:
    first = {"image": "a.png", "mask": "ma.png", "score": 2, "group": "a"}
    path = tmp_path / "scored.jsonl"
    path.write_text(json.dumps(first) + "\n" + json.dumps(row))
    with pytest.raises(ValueError, match=message):
        read_preference_pairs(path)
