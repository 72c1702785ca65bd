"""Reward scores in image preference data: read from scripts/score_dataset.py's columns or JSONL
fields, carried by batches to the objectives that use them, and checked when the method is built;
MaPPO, MADPO and SmPO train Diffusion-DPO from a scored parquet."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from script_loader import load_script

from diffalign.data import read_preference_pairs
from diffalign.data.pairs import PreferencePairDataset, collate_pairs
from diffalign.methods import get_method
from diffalign.training.config import DataConfig, ModelConfig, TrainConfig

score_script = load_script("score_dataset")


def png(pixels: torch.Tensor) -> bytes:
    """PNG bytes of a float (3, H, W) image in [0, 1]."""
    array = (pixels.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def noise(seed: int, scale: float) -> bytes:
    return png(torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(seed)) * scale)


def flat(level: int) -> bytes:
    return png(torch.full((3, 32, 32), level / 255))


def scored_parquet(
    folder: Path, jpg_0: list[bytes], jpg_1: list[bytes], label_0: list[float], on_bad_sample: str = "error"
) -> Path:
    """A Pick-a-Pic parquet of these pairs, scored by scripts/score_dataset.py (columns jpeg_0, jpeg_1)."""
    folder.mkdir(parents=True, exist_ok=True)
    raw = folder / "pairs.parquet"
    captions = ["a red square"] * len(jpg_0)
    pq.write_table(pa.table({"caption": captions, "jpg_0": jpg_0, "jpg_1": jpg_1, "label_0": label_0}), raw)
    cfg = score_script.ScoreDatasetConfig(
        data=raw, output=folder / "scored.parquet", reward="jpeg_compressibility", column_prefix="jpeg",
        on_bad_sample=on_bad_sample,
    )  # fmt: skip
    return score_script.score_dataset(cfg)


def config(
    pipeline: str, data: Path, out: Path, objective: dict, ties: str = "drop", **options: Any
) -> TrainConfig:
    return TrainConfig(
        method="diffusion_dpo",
        model=ModelConfig(pretrained=pipeline),
        data=DataConfig(path=data, resolution=32, caption_dropout=0.0, hflip=False, ties=ties),
        objective=objective,
        method_options=options,
        output_dir=out,
        max_steps=1,
        checkpoint_every=1,
        log_every=1,
        report_to=[],
    )


def test_score_columns_follow_the_chosen_image(tmp_path: Path) -> None:
    """label_0 = 0 makes jpg_1 the chosen image: its score must become the chosen reward."""
    path = scored_parquet(tmp_path, [noise(i, 0.3 + 0.2 * i) for i in range(3)],
                          [noise(10 + i, 1.0) for i in range(3)], [1.0, 0.0, 0.5])  # fmt: skip
    table = pq.read_table(path).to_pydict()
    s0, s1 = table["jpeg_0"], table["jpeg_1"]
    assert len(set(s0 + s1)) == 6  # distinct scores: a swap cannot pass unnoticed
    records = read_preference_pairs(path, score_prefix="jpeg")
    assert [r.rewards for r in records] == [(s0[0], s1[0]), (s1[1], s0[1])]  # the tie is dropped
    assert records[1].chosen == table["jpg_1"][1]
    kept = read_preference_pairs(path, ties="half", score_prefix="jpeg")
    assert kept[2].rewards == (s0[2], s1[2]) and kept[2].label == 0.5
    assert all(r.rewards is None for r in read_preference_pairs(path))  # no prefix: no scores read
    dataset = PreferencePairDataset(records, resolution=32, hflip=False)
    batch = collate_pairs([dataset[i] for i in range(len(dataset))])
    assert batch["chosen_rewards"].tolist() == [s0[0], s1[1]]
    assert batch["rejected_rewards"].tolist() == [s1[0], s0[1]]
    assert batch["chosen_rewards"].dtype == torch.float64


def test_jsonl_fields_and_the_scored_jsonl_output_read_back(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    for i in range(4):
        (tmp_path / "img" / f"{i}.png").write_bytes(noise(i, 0.25 * (i + 1)))
    rows = [{"prompt": "p", "chosen": f"img/{i}.png", "rejected": f"img/{i + 1}.png"} for i in range(3)]
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        "\n".join(json.dumps({**r, "chosen_reward": i, "rejected_reward": -i}) for i, r in enumerate(rows))
    )
    assert [r.rewards for r in read_preference_pairs(data)] == [(0.0, 0.0), (1.0, -1.0), (2.0, -2.0)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "elsewhere" / "scored.parquet"
    out.parent.mkdir()
    score_script.score_dataset(score_script.ScoreDatasetConfig(
        data=data, output=out, reward="jpeg_compressibility", column_prefix="jpeg"
    ))  # fmt: skip
    table = pq.read_table(out).to_pydict()
    records = read_preference_pairs(out, score_prefix="jpeg")
    assert [r.rewards for r in records] == list(
        zip(table["jpeg_chosen"], table["jpeg_rejected"], strict=True)
    )
    # the image paths were rewritten relative to the output: the records load the original images
    for record, row in zip(records, rows, strict=True):
        assert record.chosen.resolve() == (tmp_path / row["chosen"]).resolve()
        assert record.rejected.read_bytes() == (tmp_path / row["rejected"]).read_bytes()


def test_bad_scores_are_named(tmp_path: Path) -> None:
    # an image scoring could not read is NaN in its column
    scored = scored_parquet(
        tmp_path, [noise(1, 1.0), b"not an image"], [noise(2, 1.0)] * 2, [1.0, 1.0], "skip"
    )
    with pytest.raises(ValueError, match=r"scored\.parquet:1: reward score 'jpeg_0' must be finite, got nan"):
        read_preference_pairs(scored, score_prefix="jpeg")
    with pytest.raises(ValueError, match=r"scored\.parquet: missing column 'pick_0'"):
        read_preference_pairs(scored, score_prefix="pick")

    def jsonl(*rows: dict) -> Path:
        path = tmp_path / "pairs.jsonl"
        base = {"prompt": "p", "chosen": "a.png", "rejected": "b.png"}
        path.write_text("\n".join(json.dumps({**base, **r}) for r in rows))
        return path

    both = {"chosen_reward": 1.0, "rejected_reward": 0.0}
    with pytest.raises(ValueError, match=r"pairs\.jsonl:2: no reward scores, while other rows have them"):
        read_preference_pairs(jsonl(both, {}))
    with pytest.raises(ValueError, match=r"pairs\.jsonl:1: missing reward score 'rejected_reward'"):
        read_preference_pairs(jsonl({"chosen_reward": 1.0}))
    with pytest.raises(
        ValueError, match=r"pairs\.jsonl:2: reward score 'chosen_reward' must be a number, got None"
    ):
        read_preference_pairs(jsonl(both, {**both, "chosen_reward": None}))
    with pytest.raises(ValueError, match=r"pairs\.jsonl:1: missing reward scores \(needs 'jpeg_chosen' and"):
        read_preference_pairs(jsonl(both), score_prefix="jpeg")


def test_objectives_are_checked_before_the_model_loads(tmp_path: Path) -> None:
    """Refusals come from the data and the objective alone: no pipeline needs to exist."""
    unscored = load_script("make_tiny_assets").make_pairs(tmp_path / "pairs", n_pairs=2)
    scored = scored_parquet(tmp_path / "scored", [noise(1, 1.0)], [noise(2, 0.5)], [1.0])

    def build(data: Path, objective: dict, **kwargs: Any) -> Any:
        return get_method("diffusion_dpo")(
            config(str(tmp_path / "no-pipeline"), data, tmp_path, objective, **kwargs)
        )

    for name in ("mappo", "madpo", "smoothed_dpo"):
        with pytest.raises(ValueError, match=rf"diffusion_dpo: objective '{name}' requires .*score_prefix"):
            build(unscored, {"name": name})
    with pytest.raises(ValueError, match=r"diffusion_dpo: objective 'smoothed_dpo' requires .*score_prefix"):
        build(unscored, {"name": "smoothed_dpo"}, ties="half")  # a batch of wins would have no soft label
    with pytest.raises(ValueError, match="objective 'smoothed_dpo' takes its targets from the reward scores"):
        build(scored, {"name": "smoothed_dpo"}, ties="half", score_prefix="jpeg")
    with pytest.raises(
        ValueError, match=r"objective 'ipo' requires `chosen_lengths`; .* no candidate lengths"
    ):
        build(unscored, {"name": "ipo", "length_normalized": True})
    with pytest.raises(FileNotFoundError):  # the data fits: now the missing pipeline is the problem
        build(scored, {"name": "mappo"}, score_prefix="jpeg")


def one_step(method: Any) -> tuple[float, dict[str, float], list[torch.Tensor]]:
    method.setup(torch.device("cpu"), torch.float32)
    dataset, collate = method.dataset()
    torch.manual_seed(0)
    loss, metrics = method.step(collate([dataset[i] for i in range(len(dataset))]))
    loss.backward()
    return (
        float(loss.detach()),
        metrics,
        [p.grad for p in method.policy.unet.parameters() if p.grad is not None],
    )


def test_smoothed_dpo_learns_nothing_from_equal_scores(tiny_pipelines, tmp_path: Path) -> None:
    """Flat greys of different brightness compress to JPEGs of one size: equal scores, so SmPO's
    soft label is 1/2, its loss log 2 and its gradient zero, while DPO on the same pairs moves the
    model; unequal scores give the soft label sigmoid(gap / range) and a gradient."""
    equal = scored_parquet(tmp_path / "eq", [flat(60), flat(180)], [flat(90), flat(230)], [1.0, 1.0])
    table = pq.read_table(equal).to_pydict()
    assert table["jpeg_0"] == table["jpeg_1"]  # the premise
    smpo = {"name": "smoothed_dpo", "beta": 2000.0, "reward_min": -2.0, "reward_max": 0.0}
    method = get_method("diffusion_dpo")(
        config(tiny_pipelines["sd"], equal, tmp_path, smpo, score_prefix="jpeg")
    )
    loss, metrics, grads = one_step(method)
    assert loss == pytest.approx(math.log(2), abs=1e-12) and metrics["smpo/soft_label"] == 0.5
    assert grads and all(bool((g == 0).all()) for g in grads)
    dpo = get_method("diffusion_dpo")(
        config(tiny_pipelines["sd"], equal, tmp_path, {"name": "dpo", "beta": 2000.0})
    )
    assert sum(float(g.abs().sum()) for g in one_step(dpo)[2]) > 0

    unequal = scored_parquet(
        tmp_path / "ne", [noise(1, 0.2), noise(2, 1.0)], [noise(3, 1.0), noise(4, 0.2)], [1.0, 1.0]
    )
    table = pq.read_table(unequal).to_pydict()
    method = get_method("diffusion_dpo")(
        config(tiny_pipelines["sd"], unequal, tmp_path, smpo, score_prefix="jpeg")
    )
    loss, metrics, grads = one_step(method)
    gaps = torch.tensor(table["jpeg_0"], dtype=torch.float64) - torch.tensor(
        table["jpeg_1"], dtype=torch.float64
    )
    assert metrics["smpo/soft_label"] == pytest.approx(float(torch.sigmoid(gaps / 2).mean()))
    assert sum(float(g.abs().sum()) for g in grads) > 0


@pytest.mark.parametrize(
    "objective",
    [{"name": "mappo", "reward_mapping": "min_max", "reward_min": -2.0, "reward_max": 0.0},
     {"name": "madpo"},
     {"name": "smoothed_dpo", "reward_min": -2.0, "reward_max": 0.0}],
    ids=["mappo", "madpo", "smoothed_dpo"],
)  # fmt: skip
def test_reward_objectives_train_from_a_scored_parquet(
    tiny_pipelines, tmp_path: Path, objective: dict
) -> None:
    """One step through the training loop, as scripts/train.py runs it, from a parquet scored by
    scripts/score_dataset.py."""
    from diffalign.api import train

    data = scored_parquet(tmp_path, [noise(i, 0.3 + 0.1 * i) for i in range(4)],
                          [noise(10 + i, 1.0) for i in range(4)], [1.0, 0.0, 1.0, 0.0])  # fmt: skip
    result = train(config(tiny_pipelines["sd"], data, tmp_path / "run", objective, score_prefix="jpeg"))
    assert result.global_step == 1 and math.isfinite(result.metrics["loss"])


class Recorder:
    """An objective that records the inputs it was called with."""

    def __init__(self, objective: Any) -> None:
        self.objective, self.inputs = objective, {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.objective, name)

    def __call__(self, **inputs: Any) -> Any:
        self.inputs = inputs
        return self.objective(**inputs)


@pytest.mark.parametrize("name", ["mappo", "nca", "dpo"])
def test_scores_reach_only_the_objectives_that_use_them(tiny_pipelines, tmp_path: Path, name: str) -> None:
    data = scored_parquet(
        tmp_path, [noise(1, 0.3), noise(2, 0.6)], [noise(3, 1.0), noise(4, 0.9)], [1.0, 0.0]
    )
    table = pq.read_table(data).to_pydict()
    method = get_method("diffusion_dpo")(
        config(tiny_pipelines["sd"], data, tmp_path, {"name": name}, score_prefix="jpeg")
    )
    method.objective = Recorder(method.objective)
    one_step(method)
    seen = method.objective.inputs
    if name == "dpo":
        assert seen["chosen_rewards"] is None and seen["rejected_rewards"] is None
    else:  # the second pair's chosen image is jpg_1
        assert seen["chosen_rewards"].tolist() == [table["jpeg_0"][0], table["jpeg_1"][1]]
        assert seen["rejected_rewards"].tolist() == [table["jpeg_1"][0], table["jpeg_0"][1]]
