"""``diffalign label``: prompts -> samples -> reward scores -> Pick-a-Pic parquet pairs that the
training methods read as they are; a killed and restarted run writes the same files."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from diffalign.config import ConfigError, load_config
from diffalign.labeling import LabelConfig, label_prompts, score_column
from diffalign.objectives import pairs_from_scores

PROMPTS = ["a red cat", "a blue dog", "a green bird", "a cat and a dog", "a tree"]


def config(pipeline: str, prompts: Path, out: Path, **kw: object) -> LabelConfig:
    settings: dict = {
        "rewards": {"rl_rewards:Brightness": 1.0, "jpeg_compressibility": 0.01},
        "samples_per_prompt": 3, "prompts_per_shard": 2, "steps": 2, "guidance_scale": 2.0,
        "batch_size": 4, "seed": 3, **kw,
    }  # fmt: skip
    return LabelConfig(pipeline=pipeline, prompts=prompts, output_dir=out, **settings)


@pytest.fixture()
def prompt_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def shard_tables(out: Path) -> list:
    return [pq.read_table(p) for p in sorted(out.glob("pairs-*.parquet"))]


def decode(data: bytes) -> torch.Tensor:
    from diffalign.images import from_pil

    return from_pil(Image.open(io.BytesIO(data)))


def test_pairs_from_scores_rules() -> None:
    scores = torch.tensor([0.2, 0.9, 0.5, 0.9001])
    assert pairs_from_scores(scores, "best_worst") == [(3, 0)]
    assert pairs_from_scores(scores, "margin", margin=0.35) == [(1, 0), (3, 0), (1, 2), (3, 2)]
    assert pairs_from_scores(torch.tensor([1.0, 1.0]), "best_worst") == []  # a tie is no preference
    # RSO with a tiny beta accepts best-first: the pairs are (1st, 2nd), (3rd, 4th) best
    assert pairs_from_scores(scores, "rso", num_accepted=4, beta=1e-6) == [(3, 1), (2, 0)]
    with pytest.raises(ValueError, match="num_accepted must be even"):
        pairs_from_scores(scores, "rso", num_accepted=3)
    with pytest.raises(ValueError, match="NaN"):
        pairs_from_scores(torch.tensor([0.0, math.nan]), "margin")
    with pytest.raises(ValueError, match="unknown pairing rule"):
        pairs_from_scores(scores, "best")  # type: ignore[arg-type]


def test_label_writes_pairs_whose_scores_are_the_rewards_of_the_stored_images(
    tiny_pipelines, prompt_file: Path, tmp_path: Path
) -> None:
    from diffalign.rewards import load_reward

    out = tmp_path / "pairs"
    report = label_prompts(config(tiny_pipelines["sd"], prompt_file, out))
    assert (report.prompts, report.shards_written, report.shards_found) == (5, 3, 0)
    rows = [r for t in shard_tables(out) for r in t.to_pylist()]
    assert report.pairs == len(rows) > 0
    assert {r["caption"] for r in rows} <= set(PROMPTS)
    assert all(r["label_0"] + r["label_1"] == 1 for r in rows)
    brightness, jpeg = load_reward("rl_rewards:Brightness"), load_reward("jpeg_compressibility")
    for r in rows:
        images = torch.stack([decode(r["jpg_0"]), decode(r["jpg_1"])])
        b, j = brightness(images).double(), jpeg(images).double()
        torch.testing.assert_close(
            b, torch.tensor([r["rl_rewards_Brightness_0"], r["rl_rewards_Brightness_1"]], dtype=torch.float64)
        )
        torch.testing.assert_close(
            j, torch.tensor([r["jpeg_compressibility_0"], r["jpeg_compressibility_1"]], dtype=torch.float64)
        )
        total = b + 0.01 * j
        torch.testing.assert_close(total, torch.tensor([r["score_0"], r["score_1"]], dtype=torch.float64))
        chosen = 0 if r["label_0"] == 1 else 1
        assert total[chosen] > total[1 - chosen]  # best against worst: the higher score is chosen
    assert score_column("pkg.mod:Class") == "pkg_mod_Class"


def test_max_pairs_per_prompt_keeps_a_seeded_subset_of_each_prompts_pairs(
    tiny_pipelines, prompt_file: Path, tmp_path: Path
) -> None:
    def pairs(out: Path, **kw: object) -> list[tuple[str, frozenset]]:
        label_prompts(config(tiny_pipelines["sd"], prompt_file, out, samples_per_prompt=4, pairing="margin",
                             max_prompts=2, **kw))  # fmt: skip
        rows = [r for t in shard_tables(out) for r in t.to_pylist()]
        return [(r["caption"], frozenset((r["score_0"], r["score_1"]))) for r in rows]

    every = pairs(tmp_path / "all")
    capped = pairs(tmp_path / "capped", max_pairs_per_prompt=2)
    assert len(every) > 4  # up to 6 pairs of 4 samples per prompt: the cap has work to do
    assert [c for c, _ in capped] == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    assert set(capped) <= set(every)  # the same samples and scores, a subset of their pairs
    assert pairs(tmp_path / "again", max_pairs_per_prompt=2) == capped  # seeded


def test_pairs_train_diffusion_dpo_and_smpo_without_conversion(
    tiny_pipelines, prompt_file: Path, tmp_path: Path
) -> None:
    from diffalign.api import train
    from diffalign.training.config import TrainConfig

    out = tmp_path / "pairs"
    label_prompts(config(tiny_pipelines["sd"], prompt_file, out, pairing="margin"))
    for method, extra in (
        ("diffusion_dpo", []),
        (
            "smpo",
            [
                "method_options.score_prefix=score",
                "method_options.reward=null",
                "method_options.inversion_steps=2",
            ],
        ),
    ):
        cfg = load_config(
            TrainConfig, Path("configs") / method / "tiny.yaml",
            [f"model.pretrained={tiny_pipelines['sd']}", f"data.path={out}",
             f"output_dir={tmp_path / method}", "max_steps=2", "batch_size=2", "report_to=[]",
             "checkpoint_every=2", *extra],
        )  # fmt: skip
        result = train(cfg)
        assert result.global_step == 2 and math.isfinite(result.metrics["loss"])


def test_a_killed_run_restarted_writes_what_an_uninterrupted_run_writes(
    tiny_pipelines, prompt_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import diffalign.labeling as labeling

    label_prompts(
        config(tiny_pipelines["sd"], prompt_file, tmp_path / "whole", pairing="rso", rso_accepted=2)
    )
    real_write, written = labeling._write_shard, []

    def write_then_die(rows, path, rewards, inpainting):  # type: ignore[no-untyped-def]
        if len(written) == 2:  # killed while labelling the third shard, its file half-written
            path.with_name(f".{path.name}.999.tmp").write_bytes(b"half a shard")
            raise KeyboardInterrupt
        real_write(rows, path, rewards, inpainting)
        written.append(path)

    cut = tmp_path / "cut"
    monkeypatch.setattr(labeling, "_write_shard", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        label_prompts(config(tiny_pipelines["sd"], prompt_file, cut, pairing="rso", rso_accepted=2))
    monkeypatch.setattr(labeling, "_write_shard", real_write)
    report = label_prompts(config(tiny_pipelines["sd"], prompt_file, cut, pairing="rso", rso_accepted=2))
    assert (report.shards_found, report.shards_written) == (2, 1)
    assert sorted(p.name for p in cut.iterdir()) == sorted(p.name for p in (tmp_path / "whole").iterdir())
    for a, b in zip(shard_tables(tmp_path / "whole"), shard_tables(cut), strict=True):
        assert a.equals(b)


def test_a_restart_with_other_settings_is_refused(tiny_pipelines, prompt_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "pairs"
    label_prompts(config(tiny_pipelines["sd"], prompt_file, out, max_prompts=2))
    before = (out / "pairs-00000.parquet").read_bytes()
    with pytest.raises(ConfigError, match=r"seed differ: seed=3"):
        label_prompts(config(tiny_pipelines["sd"], prompt_file, out, max_prompts=2, seed=4))
    assert (out / "pairs-00000.parquet").read_bytes() == before  # nothing already written is lost
    assert json.loads((out / "label.json").read_text())["seed"] == 3


@pytest.mark.parametrize(
    ("case", "error", "message"),
    [
        ("empty", ValueError, "no prompts"),
        ("format", ValueError, "unknown prompt file format '.yaml'"),
        ("masks", ValueError, "reward 'rl_rewards:HoleFeatures' scores inpaintings"),
        ("inpainting", ValueError, "an inpainting pipeline samples from examples"),
    ],
)
def test_bad_input_is_named(
    tiny_pipelines, prompt_file: Path, tmp_path: Path, case: str, error: type, message: str
) -> None:
    pipeline, prompts, kw = tiny_pipelines["sd"], prompt_file, {}
    if case == "empty":
        prompts = tmp_path / "empty.txt"
        prompts.write_text("\n")
    elif case == "format":
        prompts = tmp_path / "prompts.yaml"
        prompts.write_text("- a cat\n")
    elif case == "masks":
        kw = {"rewards": {"rl_rewards:HoleFeatures": 1.0}}
    else:
        pipeline = tiny_pipelines["inpaint"]
    with pytest.raises(error, match=message):
        label_prompts(config(pipeline, prompts, tmp_path / "out", **kw))
    assert not list((tmp_path / "out").glob("pairs-*.parquet"))


def test_config_errors(prompt_file: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="at least one reward"):
        config("p", prompt_file, tmp_path, rewards={})
    with pytest.raises(ConfigError, match="rso_accepted must be even"):
        config("p", prompt_file, tmp_path, pairing="rso", rso_accepted=4)
    with pytest.raises(ConfigError, match="not among the rewards"):
        config("p", prompt_file, tmp_path, reward_kwargs={"pickscore": {}})
    with pytest.raises(ConfigError, match="not both or neither"):
        config("p", prompt_file, tmp_path, examples=prompt_file)


def test_the_label_command(tiny_pipelines, prompt_file: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from diffalign.cli import main

    out = tmp_path / "cli"
    code = main([
        "label", f"pipeline={tiny_pipelines['sd']}", f"prompts={prompt_file}", f"output_dir={out}",
        "rewards={rl_rewards:Brightness: 1.0}", "steps=2", "samples_per_prompt=2", "max_prompts=2",
    ])  # fmt: skip
    assert code == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["pairs"] == sum(t.num_rows for t in shard_tables(out)) and printed["prompts"] == 2
    assert (
        main(["label", f"pipeline={tiny_pipelines['sd']}", f"prompts={prompt_file}", f"output_dir={out}"])
        == 2
    )


def test_inpainting_pairs_carry_their_mask_and_the_inpainting_reward_scores_them(
    tiny_pipelines, tmp_path: Path
) -> None:
    from diffalign.data.inpainting import write_inpainting_examples
    from diffalign.data.preference import load_image, read_preference_pairs
    from diffalign.images import masked_for_reward
    from diffalign.rewards import load_reward

    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 32, 32, generator=g)
    masks = torch.zeros(3, 1, 32, 32)
    masks[:, :, 8:24, 4:20] = 1
    examples = write_inpainting_examples(tmp_path / "ex", images, masks, ["a cat", "a dog", "a tree"])
    out = tmp_path / "pairs"
    cfg = LabelConfig(
        pipeline=tiny_pipelines["inpaint"], examples=examples, output_dir=out,
        rewards={"rl_rewards:HoleFeatures": 1.0}, samples_per_prompt=3, steps=2, guidance_scale=2.0,
    )  # fmt: skip
    report = label_prompts(cfg)
    assert report.prompts == 3 and report.pairs > 0
    records = read_preference_pairs(out)
    assert len(records) == report.pairs and all(r.mask is not None for r in records)
    reward = load_reward("rl_rewards:HoleFeatures")
    for row in (r for t in shard_tables(out) for r in t.to_pylist()):
        mask = load_image(row["mask"], "mask", grey=True)
        assert torch.equal(mask, masks[row["prompt_index"]])  # the example's mask, as stored
        both = torch.stack([decode(row["jpg_0"]), decode(row["jpg_1"])])
        m = mask.expand(2, 1, -1, -1)
        source = images[row["prompt_index"]].expand(2, -1, -1, -1)
        outside = (m < 0.5).expand_as(both)  # the input pasted back there, as 8-bit PNGs hold it
        torch.testing.assert_close(both[outside], source[outside], atol=0.5 / 255 + 1e-6, rtol=0)
        scores = reward(both, masks=m, masked_images=masked_for_reward(source, m)).double()
        torch.testing.assert_close(
            scores, torch.tensor([row["score_0"], row["score_1"]], dtype=torch.float64)
        )
