"""Diffusion-DPO end to end on tiny pipelines: the loss, training runs, exports, resume, bad data."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from script_loader import load_script

from diffalign.cli import main
from diffalign.config import ConfigError, load_config
from diffalign.methods import get_method
from diffalign.training.config import TrainConfig

make_pairs = load_script("make_tiny_assets").make_pairs


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pairs(tmp_path_factory.mktemp("pairs"), n_pairs=16)


def overrides(pipeline: str, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "method=diffusion_dpo", f"model.pretrained={pipeline}", f"data.path={data}", "data.resolution=32",
        f"output_dir={out}", "max_steps=4", "batch_size=2", "checkpoint_every=2", "log_every=1",
        "optim.lr=1e-5", "optim.warmup_steps=1", "report_to=[]", *extra,
    ]  # fmt: skip


def config(*args: str) -> TrainConfig:
    return load_config(TrainConfig, None, list(args))


def moved_off_reference_with_spy(cfg: TrainConfig, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, dict]:
    """The method set up on the CPU with its policy moved off its frozen reference, and a dict whose
    "out" is the `DenoisingLogp` of the latest step."""
    import diffalign.methods.diffusion_dpo as recipe

    method = get_method("diffusion_dpo")(cfg)
    method.setup(torch.device("cpu"), torch.float32)
    with torch.no_grad():
        for p in method.policy.unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    seen: dict = {}
    real = recipe.denoising_logp

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen["out"] = real(*args, **kwargs)
        return seen["out"]

    monkeypatch.setattr(recipe, "denoising_logp", spy)
    return method, seen


@pytest.mark.parametrize("kind", ["sd", "sd_v"])
def test_loss_equals_the_official_formula(
    tiny_pipelines, pairs: Path, tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The method's loss is -logsigmoid(-0.5 * beta * ((mse_w - mse_l) - (ref_w - ref_l))) of its
    per-element-mean MSEs (to 1e-6), and those MSEs are the official procedure's: VAE posterior
    sample, one t and one noise per pair, [winners; losers] through the UNet (replayed here)."""
    cfg = config(
        *overrides(tiny_pipelines[kind], pairs, tmp_path, "data.caption_dropout=0.0", "data.hflip=false")
    )
    method, seen = moved_off_reference_with_spy(cfg, monkeypatch)
    dataset, collate = method.dataset()
    batch = collate([dataset[0], dataset[1]])
    torch.manual_seed(123)
    loss, metrics = method.step(batch)

    mse_w, mse_l = seen["out"].policy_mse.double().unbind(1)
    ref_w, ref_l = seen["out"].reference_mse.double().unbind(1)
    official = -F.logsigmoid(-0.5 * 5000 * ((mse_w - mse_l) - (ref_w - ref_l))).mean()
    torch.testing.assert_close(loss.detach().double(), official, atol=1e-6, rtol=0)

    policy = method.policy
    torch.manual_seed(123)  # replay the official procedure's random draws: VAE samples, t, noise
    x = torch.cat([batch["chosen"], batch["rejected"]]) * 2 - 1
    latents = policy.vae.encode(x).latent_dist.sample() * policy.vae.config.scaling_factor
    t = torch.randint(0, 1000, (2,))
    noise = torch.randn(latents[:2].shape)
    tt, nn = t.repeat(2), noise.repeat(2, 1, 1, 1)
    noisy = policy.scheduler.add_noise(latents, nn, tt)
    target = nn if kind == "sd" else policy.scheduler.get_velocity(latents, nn, tt)
    states = policy.encode_prompts(batch["prompts"]).encoder_hidden_states.repeat(2, 1, 1)
    with torch.no_grad():
        mse = (policy.unet(noisy, tt, states).sample - target).pow(2).mean(dim=[1, 2, 3])
        ref = (policy.reference_unet(noisy, tt, states).sample - target).pow(2).mean(dim=[1, 2, 3])
    # equal up to float32 kernel rounding (different but equal-valued tensor constructions)
    torch.testing.assert_close(torch.cat([mse_w, mse_l]).float(), mse, rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.cat([ref_w, ref_l]).float(), ref, rtol=1e-5, atol=0)
    assert torch.equal(seen["out"].timesteps, t) and torch.equal(seen["out"].noise, noise)
    assert metrics["rewards/accuracies"] == float(((mse_w - mse_l) - (ref_w - ref_l) < 0).double().mean())


@pytest.mark.parametrize(("kind", "lora"), [("sd", False), ("sd", True), ("sdxl", False), ("sdxl", True)])
def test_train_and_load_the_export(
    tiny_pipelines, pairs: Path, tmp_path: Path, kind: str, lora: bool
) -> None:
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    out = tmp_path / "run"
    extra = ["model.lora={rank: 4}"] if lora else []
    assert main(["train", "--config", _write_config(tmp_path, tiny_pipelines[kind], pairs, out, *extra)]) == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    assert {
        "loss",
        "rewards/accuracies",
        "rewards/margins",
        "mse/reference_chosen",
        "samples_per_second",
    } <= set(lines[-1])
    export = out / "checkpoints" / "checkpoint-4" / "export"
    base = DiffusionPipeline.from_pretrained(tiny_pipelines[kind])
    base.set_progress_bar_config(disable=True)
    kwargs = {"num_inference_steps": 2, "output_type": "pt", "height": 32, "width": 32}
    before = base("a red square", generator=torch.Generator().manual_seed(0), **kwargs).images
    if lora:
        base.load_lora_weights(str(export))
        pipe = base
    else:
        pipe = DiffusionPipeline.from_pretrained(
            tiny_pipelines[kind], unet=UNet2DConditionModel.from_pretrained(export / "unet")
        )
        pipe.set_progress_bar_config(disable=True)
    after = pipe("a red square", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert after.shape == before.shape and bool(after.isfinite().all())
    assert not torch.allclose(after, before)  # the trained weights are in use
    assert (out / "checkpoints" / "checkpoint-2").is_dir()


def _write_config(root: Path, pipeline: str, data: Path, out: Path, *extra: str) -> str:
    import yaml

    from diffalign.config import parse_overrides

    path = root / "config.yaml"
    nested: dict = {}
    for key, value in parse_overrides(overrides(pipeline, data, out, *extra)).items():
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = (
            yaml.safe_load(value.raw)
            if key not in ("model.pretrained", "data.path", "output_dir")
            else value.raw
        )
    path.write_text(yaml.safe_dump(nested))
    return str(path)


def test_resume_restores_optimizer_scheduler_and_step(tiny_pipelines, pairs: Path, tmp_path: Path) -> None:
    from diffalign.api import train

    full = train(
        config(
            *overrides(tiny_pipelines["sd"], pairs, tmp_path / "full", "max_steps=6", "checkpoint_every=3")
        )
    )
    # an interrupted run: only checkpoint-3 survived
    cut = tmp_path / "cut"
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "checkpoint-3", cut / "checkpoints" / "checkpoint-3")
    resumed = train(
        config(
            *overrides(
                tiny_pipelines["sd"], pairs, cut, "max_steps=6", "checkpoint_every=3", "resume_from=latest"
            )
        )
    )
    assert resumed.global_step == full.global_step == 6
    assert resumed.metrics["lr"] == full.metrics["lr"]
    # same data order, same draws, restored optimiser: the resumed steps are the uninterrupted ones
    full_log = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    cut_log = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in cut_log] == [4, 5, 6]
    assert [m["loss"] for m in cut_log] == [m["loss"] for m in full_log[3:]]
    a = torch.load(tmp_path / "full" / "checkpoints" / "checkpoint-6" / "optimizer.bin", weights_only=True)
    b = torch.load(cut / "checkpoints" / "checkpoint-6" / "optimizer.bin", weights_only=True)
    assert a["state"][0]["step"] == b["state"][0]["step"] == 6  # Adam continued, not restarted
    for k in a["state"]:
        torch.testing.assert_close(a["state"][k]["exp_avg"], b["state"][k]["exp_avg"])
        torch.testing.assert_close(a["state"][k]["exp_avg_sq"], b["state"][k]["exp_avg_sq"])


def test_a_resumed_kldo_run_continues_its_running_average(
    tiny_pipelines, pairs: Path, tmp_path: Path
) -> None:
    """KLDO's running denominator is method state: resuming from checkpoint-2 gives the losses of
    the uninterrupted run (a fresh average would change step 3's loss)."""
    from diffalign.api import train

    args = ["max_steps=4", "checkpoint_every=2", "objective={name: kldo, beta: 500}"]
    train(config(*overrides(tiny_pipelines["sd"], pairs, tmp_path / "full", *args)))
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "full" / "checkpoints" / "checkpoint-2", cut / "checkpoints" / "checkpoint-2")
    train(config(*overrides(tiny_pipelines["sd"], pairs, cut, *args, "resume_from=latest")))
    full = [
        json.loads(line)["loss"] for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    ]
    resumed = [json.loads(line)["loss"] for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert resumed == full[2:]


def test_bad_data_is_named_or_skipped(tiny_pipelines, pairs: Path, tmp_path: Path) -> None:
    from diffalign.api import train

    data = tmp_path / "data"
    shutil.copytree(pairs.parent, data)
    lines = (data / "pairs.jsonl").read_text().splitlines()
    (data / "images" / "corrupt.png").write_bytes(b"not a png")
    lines[0] = json.dumps({"prompt": "x", "chosen": "images/corrupt.png", "rejected": "images/0_1.png"})
    lines[1] = json.dumps({"prompt": "x", "chosen": "images/missing.png", "rejected": "images/0_1.png"})
    (data / "pairs.jsonl").write_text("\n".join(lines))
    base = overrides(
        tiny_pipelines["sd"], data / "pairs.jsonl", tmp_path / "out", "max_steps=8", "batch_size=4"
    )
    with pytest.raises((ValueError, FileNotFoundError), match=r"pairs\.jsonl:[12]: "):
        train(config(*base))
    result = train(config(*base, "data.on_bad_sample=skip", "output_dir=" + str(tmp_path / "out2")))
    assert result.global_step == 8 and result.metrics["dropped_samples"] >= 1
    table = pa.table({"caption": ["a"], "jpg_0": [b""], "jpg_1": [b""]})
    pq.write_table(table, tmp_path / "nolabel.parquet")
    with pytest.raises(ValueError, match=r"nolabel\.parquet: missing column 'label_0'"):
        get_method("diffusion_dpo")(
            config(*overrides(tiny_pipelines["sd"], tmp_path / "nolabel.parquet", tmp_path / "o"))
        )
    with pytest.raises(ConfigError, match=r"unknown key 'optim\.learning_rate'; known keys: name, lr"):
        config(*base, "optim.learning_rate=1")


def test_two_process_ddp_run_keeps_ranks_in_sync(tiny_pipelines, pairs: Path, tmp_path: Path) -> None:
    """A real two-rank run (gloo on CPU): both ranks train, and their weights end identical."""
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(Path(__file__).parent / "ddp_worker.py"), tiny_pipelines["sd"], str(pairs), str(out),
    ]  # fmt: skip
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    records = [json.loads((out / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in records] == [2, 2]
    assert records[0]["sha256"] == records[1]["sha256"]  # gradients were all-reduced
    assert all(r["moved"] > 0 and r["step"] == 3 for r in records)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # one log, from the main process


def test_parquet_data_and_validation_grids(tiny_pipelines, pairs: Path, tmp_path: Path) -> None:
    from PIL import Image

    from diffalign.api import train

    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    table = pa.table({
        "caption": [r["prompt"] for r in rows],
        "jpg_0": [(pairs.parent / r["chosen"]).read_bytes() for r in rows],
        "jpg_1": [(pairs.parent / r["rejected"]).read_bytes() for r in rows],
        "label_0": [1.0] * (len(rows) - 2) + [0.5, 0.0],
    })  # fmt: skip
    pq.write_table(table, tmp_path / "pairs.parquet")
    out = tmp_path / "run"
    result = train(config(*overrides(
        tiny_pipelines["sd"], tmp_path / "pairs.parquet", out, "validation_every=2",
        "validation_prompts=[a red square, a blue circle]", "validation_steps=2", "ema_decay=0.9",
    )))  # fmt: skip
    assert result.global_step == 4
    grids = sorted((out / "samples").iterdir())
    assert [g.name for g in grids] == ["step-000002.png", "step-000004.png"]
    assert Image.open(grids[0]).size == (64, 32)  # two 32x32 samples side by side
    assert json.loads((out / "config.json").read_text())["data"]["path"] == str(tmp_path / "pairs.parquet")


@pytest.mark.parametrize("name", ["tiny", "sd15", "sdxl"])
def test_shipped_configs_load(name: str) -> None:
    cfg = load_config(TrainConfig, Path(__file__).parents[1] / "configs" / "diffusion_dpo" / f"{name}.yaml")
    assert cfg.method == "diffusion_dpo" and cfg.objective == {"name": "dpo", "beta": 5000}
    if name != "tiny":  # the official hyper-parameters
        assert (cfg.optim.lr, cfg.optim.scale_lr, cfg.optim.warmup_steps, cfg.data.caption_dropout) == (
            1e-8,
            True,
            500,
            0.2,
        )
        assert cfg.optim.name == ("adafactor" if name == "sdxl" else "adamw")


def test_accelerate_configs_parse() -> None:
    import yaml

    for path in (Path(__file__).parents[1] / "configs" / "accelerate").glob("*.yaml"):
        config = yaml.safe_load(path.read_text())
        assert config["distributed_type"] in ("NO", "MULTI_GPU", "FSDP"), path


@pytest.mark.parametrize(
    "extra",
    [
        ["optim.name=adafactor"],
        ["mixed_precision=bf16", "optim.schedule=cosine", "gradient_accumulation_steps=2"],
        ["method_options={sft: true}"],
        ["objective={name: ipo, beta: 0.1}", "model.lora={rank: 2}", "model.gradient_checkpointing=true"],
    ],
    ids=["adafactor", "bf16-cosine-accumulation", "sft", "ipo-lora-checkpointing"],
)
def test_training_options_run(tiny_pipelines, pairs: Path, tmp_path: Path, extra: list[str]) -> None:
    from diffalign.api import train

    result = train(config(*overrides(tiny_pipelines["sd"], pairs, tmp_path / "run", "max_steps=2", *extra)))
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.metrics["loss"]))
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    if "sft" in extra[0]:
        assert "rewards/margins" not in result.metrics and "mse/policy_chosen" in result.metrics


def test_precomputed_reference_is_refused_with_the_reason(
    tiny_pipelines, pairs: Path, tmp_path: Path
) -> None:
    from diffalign.methods.diffusion_dpo import DiffusionDPO

    cfg = config(*overrides(tiny_pipelines["sd"], pairs, tmp_path / "out", "model.reference=precomputed"))
    with pytest.raises(
        ValueError, match="'precomputed' is for text methods; diffusion_dpo draws fresh noise"
    ):
        DiffusionDPO(cfg)


def test_ties_kept_train_towards_one_half(
    tiny_pipelines, pairs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pick-a-Pic `label_0 = [1, 0, 0.5, 0.5]` read with `data.ties=half`: labels [1, 1, 0.5, 0.5],
    and the step's loss is the Bradley-Terry cross-entropy of its errors, not four wins' loss."""
    rows = [json.loads(line) for line in pairs.read_text().splitlines()][:4]
    pq.write_table(pa.table({
        "caption": [r["prompt"] for r in rows],
        "jpg_0": [(pairs.parent / r["chosen"]).read_bytes() for r in rows],
        "jpg_1": [(pairs.parent / r["rejected"]).read_bytes() for r in rows],
        "label_0": [1.0, 0.0, 0.5, 0.5],
    }), tmp_path / "ties.parquet")  # fmt: skip
    args = overrides(tiny_pipelines["sd"], tmp_path / "ties.parquet", tmp_path, "data.ties=half",
                     "data.caption_dropout=0.0", "data.hflip=false")  # fmt: skip
    method, seen = moved_off_reference_with_spy(config(*args), monkeypatch)
    dataset, collate = method.dataset()
    batch = collate([dataset[i] for i in range(4)])
    assert batch["labels"].tolist() == [1.0, 1.0, 0.5, 0.5]
    torch.manual_seed(0)
    tied, _ = method.step(batch)
    mse_w, mse_l = seen["out"].policy_mse.double().unbind(1)
    ref_w, ref_l = seen["out"].reference_mse.double().unbind(1)
    z = -0.5 * 5000 * ((mse_w - mse_l) - (ref_w - ref_l))
    p = batch["labels"].double()
    expected = (-p * F.logsigmoid(z) - (1 - p) * F.logsigmoid(-z)).mean()
    torch.testing.assert_close(tied.detach().double(), expected, atol=1e-6, rtol=0)
    torch.manual_seed(0)
    as_wins, _ = method.step({**batch, "labels": torch.ones(4)})
    assert abs(float(as_wins.detach()) - float(tied.detach())) > 1e-3

    method.options.sft = True  # the SFT baseline weighs a tie's two images equally
    torch.manual_seed(0)
    sft, _ = method.step(batch)
    mse = seen["out"].policy_mse.double()
    torch.testing.assert_close(sft.detach().double(), (p * mse[:, 0] + (1 - p) * mse[:, 1]).mean())


@pytest.mark.parametrize("objective", ["dro_ranking", "kldo"])
def test_ties_are_refused_by_objectives_without_soft_labels(
    tiny_pipelines, pairs: Path, tmp_path: Path, objective: str
) -> None:
    cfg = config(
        *overrides(
            tiny_pipelines["sd"], pairs, tmp_path, "data.ties=half", f"objective={{name: {objective}}}"
        )
    )
    with pytest.raises(ValueError, match=rf"data.ties=half .* objective '{objective}' cannot use"):
        get_method("diffusion_dpo")(cfg)


def test_lora_runs_are_fixed_by_the_seed(tiny_pipelines, pairs: Path, tmp_path: Path) -> None:
    """Two `diffalign.train` calls in one process, whatever ran before: the same adapters, losses
    and weights (the adapters used to be drawn before the seed was applied)."""
    from safetensors.torch import load_file

    from diffalign.api import train

    runs = []
    for i in range(2):
        torch.manual_seed(100 + i)  # unrelated random draws before the run
        out = tmp_path / f"run{i}"
        train(config(*overrides(tiny_pipelines["sd"], pairs, out, "model.lora={rank: 4}", "optim.lr=1e-3")))
        losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        weights = load_file(out / "checkpoints/checkpoint-4/export/pytorch_lora_weights.safetensors")
        runs.append((losses, weights))
    (losses_a, weights_a), (losses_b, weights_b) = runs
    assert losses_a == losses_b and losses_a[0] != losses_a[-1]
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


@pytest.fixture(scope="module")
def sft_lora(tiny_pipelines, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SFT LoRA for the tiny SD pipeline, saved by `save_lora_weights`, with non-zero B."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    from diffalign.diffusion.policy import DiffusionPolicy

    policy = DiffusionPolicy.from_pretrained(tiny_pipelines["sd"])
    torch.manual_seed(3)
    policy.add_lora(rank=4)
    with torch.no_grad():
        for name, p in policy.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    folder = tmp_path_factory.mktemp("sft_lora")
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(policy.unet))
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=layers)
    return folder


@pytest.mark.parametrize("lora", [False, True])
def test_an_sft_lora_folder_is_the_starting_point(
    tiny_pipelines, pairs: Path, sft_lora: Path, tmp_path: Path, lora: bool
) -> None:
    """`model.adapter` = a `save_lora_weights` folder: policy and reference both equal base + LoRA at
    step 0, and the first loss is log 2."""
    from diffusers import StableDiffusionPipeline

    from diffalign.diffusion.policy import Conditioning

    extra = ["model.lora={rank: 4}"] if lora else []
    args = overrides(tiny_pipelines["sd"], pairs, tmp_path, f"model.adapter={sft_lora}", *extra)
    method = get_method("diffusion_dpo")(config(*args))
    method.setup(torch.device("cpu"), torch.float32)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipelines["sd"], safety_checker=None)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([10, 500])
    cond = Conditioning(torch.randn(2, 16, 32))
    with torch.no_grad():
        base = pipe.unet(x, t, cond.encoder_hidden_states).sample
        pipe.load_lora_weights(str(sft_lora))
        sft = pipe.unet(x, t, cond.encoder_hidden_states).sample
        assert (sft - base).abs().max() > 0.05  # the adapter matters
        torch.testing.assert_close(method.policy.unet_forward(x, t, cond), sft, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(
            method.policy.unet_forward(x, t, cond, reference=True), sft, atol=1e-5, rtol=1e-4
        )
    trainable = [n for n, p in method.policy.unet.named_parameters() if p.requires_grad]
    assert trainable and all(("lora_" in n) == lora for n in trainable)  # full fine-tuning trains all
    dataset, collate = method.dataset()
    loss, metrics = method.step(collate([dataset[0], dataset[1]]))
    assert float(loss.detach()) == pytest.approx(math.log(2)) and metrics["rewards/margins"] == 0.0
    if lora:
        method.export(tmp_path / "export")
        start = json.loads((tmp_path / "export" / "starting_point.json").read_text())
        assert start == {"pretrained": tiny_pipelines["sd"], "fused_adapter": str(sft_lora)}


def test_a_lora_folder_as_the_pipeline_is_named(
    tiny_pipelines, pairs: Path, sft_lora: Path, tmp_path: Path
) -> None:
    from safetensors.torch import save_file

    with pytest.raises(
        FileNotFoundError, match=rf"{sft_lora} is a LoRA folder, not a pipeline.*model.adapter="
    ):
        get_method("diffusion_dpo")(config(*overrides(str(sft_lora), pairs, tmp_path)))
    renamed = tmp_path / "renamed_lora"  # save_lora_weights(weight_name=...): any file name
    renamed.mkdir()
    shutil.copy(sft_lora / "pytorch_lora_weights.safetensors", renamed / "sft.safetensors")
    with pytest.raises(FileNotFoundError, match=rf"{renamed} is a LoRA folder, not a pipeline"):
        get_method("diffusion_dpo")(config(*overrides(str(renamed), pairs, tmp_path)))
    with pytest.raises(ValueError, match=r"is an inpainting pipeline .*diffusion_dpo trains text-to-image"):
        get_method("diffusion_dpo")(config(*overrides(tiny_pipelines["inpaint"], pairs, tmp_path)))
    # a LoRA for a transformer model: diffusers only warns that no key matched, the adapter would vanish
    other = tmp_path / "flux_lora"
    other.mkdir()
    lora = {"transformer.blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 32),
            "transformer.blocks.0.attn.to_q.lora_B.weight": torch.randn(32, 4)}  # fmt: skip
    save_file(lora, str(other / "pytorch_lora_weights.safetensors"))
    with pytest.raises(ValueError, match=rf"model.adapter: {other} has no LoRA weights for this pipeline"):
        get_method("diffusion_dpo")(
            config(*overrides(tiny_pipelines["sd"], pairs, tmp_path, f"model.adapter={other}"))
        )
