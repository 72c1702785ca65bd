"""Malformed rows in every row reader (Pick-a-Pic parquet, pair JSONL, scored images, text pairs):
an error naming the row by default, or, with ``on_bad_sample=skip``, dropped, counted and reported
by the training loop's ``dropped_samples``; duplicate pairs kept and counted in a warning."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from diffalign.config import load_config
from diffalign.data.preference import read_preference_pairs
from diffalign.methods import get_method
from diffalign.text.data import read_text_preferences
from diffalign.training.config import TrainConfig
from diffalign.training.loop import run_training


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (value, value, value)).save(buffer, format="PNG")
    return buffer.getvalue()


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_pick_a_pic_rows_error_or_skip_and_count(tmp_path: Path) -> None:
    labels = [1.0, 0.7, None, 0.0, 1.0]  # rows 1 and 2 are malformed; row 4 repeats row 0
    table = pa.table({
        "caption": ["a", "b", "c", "d", "a"],
        "jpg_0": [_png(10), _png(20), _png(30), _png(40), _png(10)],
        "jpg_1": [_png(50), _png(60), _png(70), _png(80), _png(50)],
        "label_0": labels,
        "label_1": [None if v is None else 1 - v for v in labels],
    })  # fmt: skip
    path = tmp_path / "pap.parquet"
    pq.write_table(table, path)
    with pytest.raises(ValueError, match=r"pap\.parquet:1: label_0 must be 0, 0.5 or 1, got 0.7"):
        read_preference_pairs(path)
    with pytest.warns(UserWarning) as caught:
        records = read_preference_pairs(path, on_bad_sample="skip")
    messages = [str(w.message) for w in caught]
    assert any("skipped 2 malformed rows of 5" in m and "pap.parquet:1" in m for m in messages)
    assert any("1 of 3 pairs repeat an earlier pair" in m for m in messages)
    assert [r.prompt for r in records] == ["a", "d", "a"] and records.skipped == 2
    assert records[1].chosen == _png(80)  # label_0 = 0: the second image won


def test_pair_and_scored_rows_error_or_skip(tmp_path: Path) -> None:
    pairs = _jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "a", "chosen": "x.png", "rejected": "y.png"},
        {"prompt": "b", "chosen": "x.png"},
        {"prompt": "c", "chosen": "", "rejected": "y.png"},
    ])  # fmt: skip
    with pytest.raises(ValueError, match=r"pairs\.jsonl:2: missing key 'rejected'"):
        read_preference_pairs(pairs)
    with pytest.warns(UserWarning, match="skipped 2 malformed rows of 3"):
        assert read_preference_pairs(pairs, on_bad_sample="skip").skipped == 2
    scored = _jsonl(tmp_path / "scored.jsonl", [
        {"image": "1.png", "score": 0.9, "group": "g", "mask": "m.png"},
        {"image": "2.png", "score": float("nan"), "group": "g", "mask": "m.png"},
        {"image": "3.png", "score": 0.1, "group": "g", "mask": "other.png"},
        {"image": "4.png", "score": 0.2, "group": "g", "mask": "m.png"},
    ])  # fmt: skip
    with pytest.raises(ValueError, match=r"scored\.jsonl:2: 'score' must be a finite number"):
        read_preference_pairs(scored)
    with pytest.warns(UserWarning, match="skipped 2 malformed rows of 4"):
        records = read_preference_pairs(scored, on_bad_sample="skip")
    assert [(r.chosen.name, r.rejected.name, r.rewards) for r in records] == [("1.png", "4.png", (0.9, 0.2))]
    every = _jsonl(tmp_path / "every.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    with pytest.raises(ValueError, match=r"every row of the preference pairs is malformed; the first: .*:1"):
        read_preference_pairs(every, on_bad_sample="skip")


def test_text_rows_error_or_skip_and_the_loop_counts_them(tmp_path: Path) -> None:
    from diffalign.text.tiny import build_tiny_causal_lm, synthetic_preferences

    good = [
        json.loads(line)
        for line in synthetic_preferences(tmp_path / "good.jsonl", rows=8).read_text().splitlines()
    ]
    bad = [{"prompt": "p", "chosen": " ", "rejected": "no"}, {"prompt": "p", "chosen": "yes"}]
    path = _jsonl(tmp_path / "text.jsonl", [*good[:4], *bad, *good[4:]])
    with pytest.raises(ValueError, match=r"text\.jsonl:5: 'chosen' is empty"):
        read_text_preferences(path)
    with pytest.warns(UserWarning, match="skipped 2 malformed rows of 10"):
        records = read_text_preferences(path, on_bad_sample="skip")
    assert [r.prompt for r in records] == [r["prompt"] for r in good] and records.skipped == 2
    lm = build_tiny_causal_lm(tmp_path / "lm")
    cfg = load_config(TrainConfig, None, [
        "method=text_preference", f"model.pretrained={lm}", f"data.path={path}", "data.on_bad_sample=skip",
        f"output_dir={tmp_path / 'out'}", "max_steps=1", "batch_size=2", "report_to=[]",
    ])  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = run_training(get_method(cfg.method)(cfg))
    assert result.metrics["dropped_samples"] == 2


def test_diffusion_dpo_counts_skipped_pair_rows(tiny_pipelines, tmp_path: Path) -> None:
    from script_loader import load_script

    pairs = load_script("make_tiny_assets").make_pairs(tmp_path / "pairs", n_pairs=4)
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    _jsonl(pairs, [*rows, {"prompt": "x", "chosen": rows[0]["chosen"], "rejected": None}])
    base = [
        "method=diffusion_dpo", f"model.pretrained={tiny_pipelines['sd']}", f"data.path={pairs}",
        "data.resolution=32", "max_steps=1", "batch_size=2", "report_to=[]",
    ]  # fmt: skip
    with pytest.raises(ValueError, match=r"pairs\.jsonl:5: 'rejected' must be an image path"):
        get_method("diffusion_dpo")(load_config(TrainConfig, None, [*base, f"output_dir={tmp_path / 'a'}"]))
    cfg = load_config(TrainConfig, None, [*base, "data.on_bad_sample=skip", f"output_dir={tmp_path / 'b'}"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = run_training(get_method(cfg.method)(cfg))
    assert result.metrics["dropped_samples"] == 1
