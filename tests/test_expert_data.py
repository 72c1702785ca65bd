"""Diffusion-DRO's expert images: read from an image folder (the official caption.txt layout, or
sidecar .txt files), expert rows (JSONL / parquet) or preference pairs (scored or not), ranked by
top_k, checked by usable_experts and served by ExpertDataset."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from diffalign.data import (
    ExpertDataset,
    ExpertRecord,
    PairRecord,
    collate_experts,
    load_image,
    read_experts,
    usable_experts,
)
from diffalign.data.pairs import PreferencePairDataset


def encoded(level: int, size: tuple[int, int] = (6, 6), fmt: str = "PNG") -> bytes:
    """An image of one grey ``level`` (0-255), width x height ``size``, encoded as ``fmt``."""
    buffer = io.BytesIO()
    Image.new("RGB", size, (level, level, level)).save(buffer, format=fmt)
    return buffer.getvalue()


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
    return path


def jsonl(path: Path, rows: list[dict]) -> Path:
    return write(path, "\n".join(json.dumps(row) for row in rows) + "\n")


def level(ref) -> int:
    """The grey level of a one-level image (reference), to tell images apart."""
    return round(float(load_image(ref, "test").mean()) * 255)


def summary(records: list[ExpertRecord]) -> list[tuple[str, int, float | None]]:
    return [(r.prompt, level(r.image), r.score) for r in records]


# --- folders -------------------------------------------------------------------------------


def test_official_layout_one_folder_per_image_with_caption_txt(tmp_path: Path) -> None:
    root = tmp_path / "experts"
    write(root / "0" / "0.png", encoded(10))
    write(root / "0" / "caption.txt", "  a red cat \n")
    write(root / "1" / "1.jpg", encoded(100, fmt="JPEG"))
    write(root / "1" / "caption.txt", "a blue dog")
    write(root / "10" / "10.PNG", encoded(200))
    write(root / "10" / "caption.txt", "a green bird\n")
    write(root / "notes.md", "not an image")
    records = read_experts(root)
    assert [r.image for r in records] == [root / "0" / "0.png", root / "1" / "1.jpg", root / "10" / "10.PNG"]
    assert [r.prompt for r in records] == ["a red cat", "a blue dog", "a green bird"]
    assert [r.where for r in records] == [str(r.image) for r in records]
    assert [r.score for r in records] == [None, None, None]
    assert abs(level(records[1].image) - 100) <= 2  # JPEG: nearly the level written


def test_flat_folder_sidecar_txt_before_caption_txt(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    write(root / "b.webp", encoded(30, fmt="WEBP"))
    write(root / "b.txt", "prompt of b\n")
    write(root / "a.png", encoded(60))
    write(root / "a.txt", "prompt of a")
    write(root / "c.bmp", encoded(90, fmt="BMP"))
    write(root / "caption.txt", "the folder's prompt")
    records = read_experts(root)
    assert [(r.image.name, r.prompt) for r in records] == [
        ("a.png", "prompt of a"),
        ("b.webp", "prompt of b"),
        ("c.bmp", "the folder's prompt"),
    ]
    assert level(records[2].image) == 90


def test_folder_image_without_a_prompt_is_named(tmp_path: Path) -> None:
    write(tmp_path / "x" / "ok.png", encoded(1))
    write(tmp_path / "x" / "ok.txt", "fine")
    write(tmp_path / "x" / "orphan.jpeg", encoded(2, fmt="JPEG"))
    with pytest.raises(ValueError, match=r"orphan\.jpeg: no prompt .*orphan\.txt or a caption\.txt"):
        read_experts(tmp_path / "x")
    write(tmp_path / "y" / "blank.png", encoded(1))
    write(tmp_path / "y" / "blank.txt", " \n")
    with pytest.raises(ValueError, match=r"blank\.png: blank prompt in blank\.txt"):
        read_experts(tmp_path / "y")


# --- expert rows ---------------------------------------------------------------------------


def test_expert_jsonl_and_parquet_rows_with_scores(tmp_path: Path) -> None:
    write(tmp_path / "images" / "a.png", encoded(40))
    write(tmp_path / "images" / "b.png", encoded(80))
    rows = [
        {"prompt": "a fox", "image": "images/a.png", "score": 0.25},
        {"prompt": "an owl", "image": "images/b.png", "score": 3},
    ]
    records = read_experts(jsonl(tmp_path / "experts.jsonl", rows))
    assert summary(records) == [("a fox", 40, 0.25), ("an owl", 80, 3.0)]
    assert records[0].image == tmp_path / "images" / "a.png"
    assert records[1].where == f"{tmp_path / 'experts.jsonl'}:2"
    # a parquet of expert rows: images as encoded bytes
    table = pa.table({"prompt": ["p0", "p1"], "image": [encoded(5), encoded(250)], "score": [1.5, -2.0]})
    pq.write_table(table, tmp_path / "experts.parquet")
    assert summary(read_experts(tmp_path / "experts.parquet")) == [("p0", 5, 1.5), ("p1", 250, -2.0)]
    unscored = read_experts(jsonl(tmp_path / "plain.jsonl", [{"prompt": "a fox", "image": "images/a.png"}]))
    assert summary(unscored) == [("a fox", 40, None)]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "x"}, r"experts\.jsonl:2: missing key 'image'"),
        ({"image": "a.png"}, r"experts\.jsonl:2: missing key 'prompt'"),
        ({"prompt": "  ", "image": "a.png"}, r"experts\.jsonl:2: blank or missing prompt"),
        ({"prompt": "x", "image": "a.png", "score": "high"}, r"experts\.jsonl:2: 'score' must be a number"),
        ({"prompt": "x", "image": "a.png", "score": None}, r"experts\.jsonl:2: 'score' must be a number"),
        ({"prompt": "x", "image": "a.png", "score": math.nan}, r"experts\.jsonl:2: 'score' must be finite"),
        ({"prompt": "x", "image": "a.png", "score": math.inf}, r"experts\.jsonl:2: 'score' must be finite"),
        ({"prompt": "x", "image": ""}, r"experts\.jsonl:2: 'image' must be an image path or encoded bytes"),
    ],
)
def test_bad_expert_rows_are_named(tmp_path: Path, row: dict, message: str) -> None:
    path = jsonl(tmp_path / "experts.jsonl", [{"prompt": "ok", "image": "a.png", "score": 1.0}, row])
    with pytest.raises(ValueError, match=message):
        read_experts(path)


def test_expert_rows_are_scored_all_or_none(tmp_path: Path) -> None:
    rows = [{"prompt": "x", "image": "a.png", "score": 1.0}, {"prompt": "y", "image": "b.png"}]
    with pytest.raises(ValueError, match=r"experts\.jsonl:2: no 'score', while other rows have one"):
        read_experts(jsonl(tmp_path / "experts.jsonl", rows))


# --- preference pairs ----------------------------------------------------------------------


def pair_images(folder: Path, levels: dict[str, int]) -> None:
    for name, grey in levels.items():
        write(folder / f"{name}.png", encoded(grey))


def test_scored_pair_jsonl_gives_every_image_with_its_score_once(tmp_path: Path) -> None:
    pair_images(tmp_path, {"a": 10, "b": 20, "c": 30, "d": 40})
    rows = [
        {"prompt": "p", "chosen": "a.png", "rejected": "b.png", "chosen_reward": 2.0, "rejected_reward": 1.0},
        {"prompt": "p", "chosen": "c.png", "rejected": "a.png", "chosen_reward": 3.0, "rejected_reward": 2.0},
        {"prompt": "q", "chosen": "a.png", "rejected": "d.png", "chosen_reward": 5.0, "rejected_reward": 4.0},
        {"prompt": "p", "chosen": "b.png", "rejected": "d.png", "label": 0.5,
         "chosen_reward": 1.0, "rejected_reward": 0.5},
    ]  # fmt: skip
    records = read_experts(jsonl(tmp_path / "pairs.jsonl", rows))
    # a.png with prompt p twice → once (its first score); a.png with prompt q is another expert;
    # the tie (row 4) counts too: only its d.png with prompt p is new
    assert summary(records) == [("p", 10, 2.0), ("p", 20, 1.0), ("p", 30, 3.0), ("q", 10, 5.0),
                                ("q", 40, 4.0), ("p", 40, 0.5)]  # fmt: skip
    assert records[1].where == f"{tmp_path / 'pairs.jsonl'}:1 (rejected)"
    assert records[1].image == tmp_path / "b.png"


def test_unscored_pairs_give_their_chosen_images_only(tmp_path: Path) -> None:
    pair_images(tmp_path, {"a": 10, "b": 20, "c": 30})
    rows = [
        {"prompt": "p", "chosen": "a.png", "rejected": "b.png"},
        {"prompt": "p", "chosen": "a.png", "rejected": "c.png"},
        {"prompt": "p", "chosen": "c.png", "rejected": "b.png", "label": 0.5},
        {"prompt": "q", "chosen": "b.png", "rejected": "a.png"},
    ]
    records = read_experts(jsonl(tmp_path / "pairs.jsonl", rows))
    assert summary(records) == [("p", 10, None), ("q", 20, None)]
    ties = jsonl(tmp_path / "ties.jsonl", [rows[2]])
    with pytest.raises(ValueError, match=r"ties\.jsonl: no expert images"):
        read_experts(ties)


def pick_a_pic(path: Path, with_scores: bool = True) -> Path:
    """Three Pick-a-Pic rows, scored as scripts/score_dataset.py writes (column_prefix=pick): row 0
    jpg_0 wins, row 1 jpg_1 wins, row 2 a tie; row 1's jpg_1 is row 0's jpg_0 (same caption)."""
    columns = {
        "caption": ["cat", "cat", "dog"],
        "jpg_0": [encoded(11), encoded(22), encoded(33)],
        "jpg_1": [encoded(44), encoded(11), encoded(55)],
        "label_0": [1.0, 0.0, 0.5],
        "label_1": [0.0, 1.0, 0.5],
    }
    if with_scores:
        columns |= {"pick_0": [0.9, 0.2, 0.4], "pick_1": [0.1, 0.8, 0.6]}
    pq.write_table(pa.table(columns), path)
    return path


def test_pick_a_pic_parquet_scored_by_score_dataset(tmp_path: Path) -> None:
    path = pick_a_pic(tmp_path / "pickapic.parquet")
    records = read_experts(path, score_prefix="pick")
    # every image with the score of its own column; row 1's jpg_1 (level 11, caption cat) is row 0's jpg_0
    assert summary(records) == [("cat", 11, 0.9), ("cat", 44, 0.1), ("cat", 22, 0.2), ("dog", 33, 0.4),
                                ("dog", 55, 0.6)]  # fmt: skip
    assert isinstance(records[0].image, bytes) and records[0].where == f"{path}:0 (chosen)"
    # unscored: the chosen image of each non-tie row (row 1: jpg_1, already kept from row 0)
    assert summary(read_experts(path)) == [("cat", 11, None)]
    assert summary(read_experts(path, score_prefix="pick", top_k=2)) == [("cat", 11, 0.9), ("dog", 55, 0.6)]
    with pytest.raises(ValueError, match=r"missing column 'other_0'"):
        read_experts(path, score_prefix="other")


# --- top_k ---------------------------------------------------------------------------------


def scored_rows(tmp_path: Path, prompts: list[str], scores: list[float]) -> Path:
    rows = [
        {"prompt": p, "image": f"{i}.png", "score": s}
        for i, (p, s) in enumerate(zip(prompts, scores, strict=True))
    ]
    return jsonl(tmp_path / "scored.jsonl", rows)


def test_top_k_overall_keeps_the_best_and_the_earlier_of_equal_scores(tmp_path: Path) -> None:
    path = scored_rows(tmp_path, ["a"] * 6, [0.5, 0.9, 0.7, 0.9, 0.7, 0.1])
    names = [r.image.name for r in read_experts(path, top_k=3)]
    assert names == ["1.png", "2.png", "3.png"]  # 0.9, 0.9, then the first 0.7; original order
    assert [r.image.name for r in read_experts(path, top_k=4)] == ["1.png", "2.png", "3.png", "4.png"]
    assert [r.image.name for r in read_experts(path, top_k=1)] == ["1.png"]
    assert len(read_experts(path, top_k=100)) == 6


def test_top_k_per_prompt(tmp_path: Path) -> None:
    prompts = ["a", "b", "a", "b", "a", "b", "c"]
    path = scored_rows(tmp_path, prompts, [0.3, 0.2, 0.8, 0.9, 0.8, 0.1, -5.0])
    # a: 0.8 (#2) and 0.8 (#4) tie → #2; b: 0.9 (#3); c: its only one
    assert [r.image.name for r in read_experts(path, top_k=1, per_prompt=True)] == ["2.png", "3.png", "6.png"]
    kept = read_experts(path, top_k=2, per_prompt=True)
    assert [r.image.name for r in kept] == ["1.png", "2.png", "3.png", "4.png", "6.png"]


def test_top_k_needs_scores_and_sensible_arguments(tmp_path: Path) -> None:
    write(tmp_path / "folder" / "0.png", encoded(1))
    write(tmp_path / "folder" / "caption.txt", "x")
    with pytest.raises(
        ValueError, match=r"folder: top_k needs a reward score .*score_dataset\.py.*score_prefix"
    ):
        read_experts(tmp_path / "folder", top_k=1)
    path = pick_a_pic(tmp_path / "pickapic.parquet")
    with pytest.raises(ValueError, match=r"pickapic\.parquet: top_k needs .*method_options\.score_prefix"):
        read_experts(path, top_k=1)
    with pytest.raises(ValueError, match="top_k must be at least 1, got 0"):
        read_experts(path, score_prefix="pick", top_k=0)
    with pytest.raises(ValueError, match=r"per_prompt .* set top_k"):
        read_experts(path, score_prefix="pick", per_prompt=True)
    with pytest.raises(ValueError, match=r"folder: score_prefix .* a folder of images"):
        read_experts(tmp_path / "folder", score_prefix="pick")


def test_nothing_found_names_the_source(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    write(tmp_path / "empty" / "caption.txt", "a prompt without an image")
    with pytest.raises(ValueError, match=r"empty: no expert images"):
        read_experts(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"blank\.jsonl: no expert images"):
        read_experts(write(tmp_path / "blank.jsonl", "\n"))
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl"):
        read_experts(tmp_path / "missing.jsonl")


# --- decoding and the dataset --------------------------------------------------------------


def folder_of(tmp_path: Path, images: dict[str, bytes]) -> list[ExpertRecord]:
    for name, data in images.items():
        write(tmp_path / "set" / name, data)
    write(tmp_path / "set" / "caption.txt", "a prompt")
    return read_experts(tmp_path / "set")


def test_usable_experts_error_skip_and_none_usable(tmp_path: Path) -> None:
    records = folder_of(tmp_path, {"0.png": encoded(10), "1.png": b"not a png", "2.png": encoded(30)})
    with pytest.raises(ValueError, match=r"1\.png: cannot decode image"):
        usable_experts(records, "error")
    usable, dropped = usable_experts(records, "skip")
    assert [r.image.name for r in usable] == ["0.png", "2.png"] and dropped == 1
    assert usable_experts(usable, "error") == (usable, 0)
    missing = [*usable, ExpertRecord("x", tmp_path / "gone.png", "rows.jsonl:7")]
    with pytest.raises(FileNotFoundError, match=r"rows\.jsonl:7: image file not found"):
        usable_experts(missing, "error")
    with pytest.raises(ValueError, match=r"no usable image; the first failure: .*1\.png: cannot decode"):
        usable_experts([records[1], ExpertRecord("x", b"junk", "rows.jsonl:3")], "skip")


def test_expert_dataset_items_and_seeded_augmentation(tmp_path: Path) -> None:
    # 16 x 8 (w x h): left half black, right half white; the center 8 x 8 crop is half and half
    half = Image.new("RGB", (16, 8))
    half.paste((255, 255, 255), (8, 0, 16, 8))
    buffer = io.BytesIO()
    half.save(buffer, format="PNG")
    records = [
        ExpertRecord("half", buffer.getvalue(), "mem:0"),
        ExpertRecord("grey", encoded(128, (10, 20)), "mem:1"),
    ]
    center = ExpertDataset(records, resolution=8, hflip=False)
    item = center[0]
    assert (
        item["prompt"] == "half" and item["image"].shape == (3, 8, 8) and item["image"].dtype == torch.float32
    )
    assert torch.equal(item["image"][:, :, :4], torch.zeros(3, 8, 4))
    assert torch.equal(item["image"][:, :, 4:], torch.ones(3, 8, 4))
    assert torch.allclose(center[1]["image"], torch.full((3, 8, 8), 128 / 255), atol=1e-6)
    batch = collate_experts([center[0], center[1]])
    assert batch["prompts"] == ["half", "grey"] and batch["images"].shape == (2, 3, 8, 8)

    def views(seed: int, epoch: int) -> torch.Tensor:
        dataset = ExpertDataset(records, resolution=8, random_crop=True, hflip=True, seed=seed)
        dataset.set_epoch(epoch)
        return dataset[0]["image"]

    first = [views(0, epoch) for epoch in range(12)]
    assert all(v.min() >= 0 and v.max() <= 1 for v in first)
    assert all(torch.equal(a, views(0, e)) for e, a in enumerate(first[:3]))  # (seed, epoch, index) → same
    assert len({tuple(v[0, 0].tolist()) for v in first}) > 1  # other epochs crop or flip differently


def test_expert_dataset_bad_images_error_or_skip(tmp_path: Path) -> None:
    records = [ExpertRecord("bad", b"junk", "rows.jsonl:1"), ExpertRecord("ok", encoded(64), "rows.jsonl:2")]
    with pytest.raises(ValueError, match=r"rows\.jsonl:1: cannot decode image"):
        ExpertDataset(records, resolution=4)[0]
    dataset = ExpertDataset(records, resolution=4, on_bad_sample="skip")
    assert dataset[0]["prompt"] == "ok" and dataset.skipped == 1
    with pytest.raises(ValueError, match="every expert image failed to load"):
        ExpertDataset(records[:1], resolution=4, on_bad_sample="skip")[0]
    with pytest.raises(ValueError, match="no expert images to train on"):
        ExpertDataset([], resolution=4)


def test_experts_and_pairs_share_one_transform(tmp_path: Path) -> None:
    """The same (seed, epoch, index) crops and flips an expert image as it would the pair's chosen one."""
    image = torch.rand(3, 9, 14, generator=torch.Generator().manual_seed(0))
    buffer = io.BytesIO()
    Image.fromarray((image.permute(1, 2, 0) * 255).to(torch.uint8).numpy()).save(buffer, format="PNG")
    data = buffer.getvalue()
    experts = ExpertDataset([ExpertRecord("p", data, "e")] * 3, 6, random_crop=True, seed=7)
    pairs = PreferencePairDataset([PairRecord("p", data, data, 1.0, "p")] * 3, 6, random_crop=True, seed=7)
    for epoch in range(3):
        experts.set_epoch(epoch)
        pairs.set_epoch(epoch)
        for index in range(3):
            assert torch.equal(experts[index]["image"], pairs[index]["chosen"])


# --- defects a tester found -----------------------------------------------------------------


def test_top_k_skips_broken_images_for_the_next_best(tmp_path: Path) -> None:
    """With data.on_bad_sample=skip, a broken image among the best leaves its place to the next
    best: top_k still keeps K experts (per prompt too), and images below them are never decoded."""
    for i, grey in enumerate((10, 20, 30, 40)):
        write(tmp_path / f"{i}.png", encoded(grey))
    write(tmp_path / "3.png", b"not an image")  # the best-scored one is broken
    write(tmp_path / "4.png", b"also broken, but never decoded: below the top 2")
    path = scored_rows(tmp_path, ["a", "a", "a", "a", "a"], [1.0, 2.0, 3.0, 4.0, 0.5])
    usable, dropped = usable_experts(read_experts(path), "skip", top_k=2)
    assert [r.image.name for r in usable] == ["1.png", "2.png"] and dropped == 1
    with pytest.raises(ValueError, match=r"3\.png"):
        usable_experts(read_experts(path), "error", top_k=2)
    per_prompt = scored_rows(tmp_path, ["a", "b", "a", "b", "a"], [1.0, 2.0, 3.0, 4.0, 0.5])
    usable, dropped = usable_experts(read_experts(per_prompt), "skip", top_k=1, per_prompt=True)
    assert [r.image.name for r in usable] == ["1.png", "2.png"] and dropped == 1  # b: 3.png broken → 1.png
    with pytest.raises(ValueError, match=r"top_k needs a reward score"):
        usable_experts(folder_of(tmp_path / "f", {"x.png": encoded(1)}), "skip", top_k=1)


def test_blank_prompts_in_pairs_and_captions_that_are_not_utf8_are_named(tmp_path: Path) -> None:
    pair_images(tmp_path, {"a": 10, "b": 20})
    rows = [
        {"prompt": "p", "chosen": "a.png", "rejected": "b.png"},
        {"prompt": " ", "chosen": "b.png", "rejected": "a.png"},
    ]
    with pytest.raises(ValueError, match=r"pairs\.jsonl:2: blank prompt"):
        read_experts(jsonl(tmp_path / "pairs.jsonl", rows))
    write(tmp_path / "latin" / "x.png", encoded(5))
    write(tmp_path / "latin" / "x.txt", "café".encode("latin-1"))
    with pytest.raises(ValueError, match=r"x\.txt: the prompt of x\.png is not UTF-8"):
        read_experts(tmp_path / "latin")
    with pytest.raises(FileNotFoundError, match="expert data not found"):
        read_experts(tmp_path / "no_such_folder")
