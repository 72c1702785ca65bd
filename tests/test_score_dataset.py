"""scripts/score_dataset.py: reward columns for every image, cached in parts, resumable."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from script_loader import SCRIPTS, load_script

script = load_script("score_dataset")
ScoreDatasetConfig, score_dataset = script.ScoreDatasetConfig, script.score_dataset


def png(seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    array = (torch.rand(24, 24, 3, generator=g) * 255 * (seed % 3) / 2).round().to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_kb(data: bytes) -> float:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(buffer, format="JPEG", quality=95)
    return buffer.tell() / 1000


def test_parquet_scores_resume_and_equal_direct_computation(tmp_path: Path) -> None:
    images = [png(i) for i in range(11)]
    data = tmp_path / "pairs.parquet"
    pq.write_table(
        pa.table(
            {
                "caption": [f"p{i}" for i in range(10)],
                "jpg_0": images[:10],
                "jpg_1": images[1:],
                "label_0": [1.0] * 10,
            }
        ),
        data,
    )
    out = tmp_path / "scored.parquet"
    cfg = ScoreDatasetConfig(
        data=data, output=out, reward="jpeg_incompressibility", chunk_size=4, batch_size=3
    )
    score_dataset(cfg)
    table = pq.read_table(out).to_pydict()
    assert table["caption"] == [f"p{i}" for i in range(10)]  # original columns kept, in order
    assert table["jpeg_incompressibility_0"] == pytest.approx([jpeg_kb(b) for b in images[:10]])
    assert table["jpeg_incompressibility_1"] == pytest.approx([jpeg_kb(b) for b in images[1:]])
    (keyed,) = (tmp_path / "scored.parquet.parts").iterdir()  # one folder per scoring setting
    parts = sorted(keyed.iterdir())
    assert len(parts) == 3
    # resume: a lost part is recomputed, finished parts are not touched
    parts[-1].unlink()
    stamp = parts[0].stat().st_mtime_ns
    out.unlink()
    score_dataset(cfg)
    assert pq.read_table(out).to_pydict() == table
    assert parts[0].stat().st_mtime_ns == stamp


def test_jsonl_and_bad_images(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(png(1))
    (tmp_path / "b.png").write_bytes(png(2))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    rows = [
        {"prompt": "x", "chosen": "a.png", "rejected": "b.png"},
        {"prompt": "y", "chosen": "bad.png", "rejected": "a.png"},
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = ScoreDatasetConfig(
        data=data, output=tmp_path / "s.parquet", reward="jpeg_compressibility", column_prefix="jpeg"
    )
    with pytest.raises(ValueError, match=r"pairs\.jsonl:2: cannot decode image"):
        score_dataset(cfg)
    cfg.on_bad_sample = "skip"
    cfg.output = tmp_path / "s2.parquet"
    table = pq.read_table(score_dataset(cfg)).to_pydict()
    assert table["jpeg_chosen"][0] == pytest.approx(-jpeg_kb(png(1)))
    assert math.isnan(table["jpeg_chosen"][1])
    assert table["jpeg_rejected"][1] == pytest.approx(-jpeg_kb(png(1)))


def test_help_documents_every_option() -> None:
    import dataclasses

    text = subprocess.run(
        [sys.executable, str(SCRIPTS / "score_dataset.py"), "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for f in dataclasses.fields(ScoreDatasetConfig):
        assert f"  {f.name} (" in text, f.name


def test_a_rerun_with_other_weights_at_the_same_path_rescores(tmp_path: Path, reward_assets) -> None:
    """The parts cache is keyed on the reward's weights and settings, not on the output path: a head
    retrained and saved over the old file, or another reward, does not reuse stale scores."""
    from safetensors.torch import save_file

    from diffalign.rewards import load_reward
    from diffalign_rewards.clip_rewards import AestheticMLP

    images = [png(i) for i in range(5)]
    data = tmp_path / "pairs.parquet"
    pq.write_table(
        pa.table({"caption": ["p"] * 4, "jpg_0": images[:4], "jpg_1": images[1:], "label_0": [1.0] * 4}), data
    )
    head = tmp_path / "head.safetensors"
    out = tmp_path / "scored.parquet"
    options = {"clip": str(reward_assets["clip"]), "head": str(head)}
    cfg = ScoreDatasetConfig(
        data=data, output=out, reward="aesthetic", reward_options=options, column_prefix="s"
    )
    scores = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        save_file(AestheticMLP(16).state_dict(), str(head))  # retrained, same path
        score_dataset(cfg)
        scores.append(pq.read_table(out).to_pydict()["s_0"])
        direct = load_reward("aesthetic", **options)
        batch = torch.stack([script.load_image(b, "x") for b in images[:4]])
        assert scores[-1] == pytest.approx(direct(batch).tolist(), abs=1e-5)
    assert scores[0] != pytest.approx(scores[1], abs=1e-3)
    cfg.reward, cfg.reward_options = "jpeg_incompressibility", {}
    score_dataset(cfg)  # another reward under the same column name
    assert pq.read_table(out).to_pydict()["s_0"] == pytest.approx([jpeg_kb(b) for b in images[:4]])
    assert len(list((tmp_path / "scored.parquet.parts").iterdir())) == 3  # earlier work kept
