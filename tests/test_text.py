"""The text side: completion log-probs of a causal LM, TRL-style data, and every objective training
through scripts/train.py (a tiny Llama and a word-level tokenizer built locally)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from diffalign.text.data import read_text_preferences
from diffalign.text.logps import Tokenization, completion_logps, encode_candidates, pad_sequences
from diffalign.text.tiny import build_tiny_causal_lm, synthetic_preferences


@pytest.fixture(scope="module")
def lm_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_causal_lm(tmp_path_factory.mktemp("lm") / "lm")


@pytest.fixture(scope="module")
def chat_lm_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_causal_lm(tmp_path_factory.mktemp("chat") / "lm", chat_template=True)


def _load(path: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _direct_logp(model: torch.nn.Module, ids: list[int], n_prompt: int) -> float:
    """Sum over completion tokens of log p(token | everything before), one unpadded sequence."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    return sum(float(logp[i - 1, ids[i]]) for i in range(max(n_prompt, 1), len(ids)))


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("chat", [False, True])
def test_logps_equal_a_direct_per_token_computation(
    side: str, chat: bool, lm_path: Path, chat_lm_path: Path
) -> None:
    model, tok = _load(chat_lm_path if chat else lm_path)
    cfg = Tokenization(padding_side=side)
    rows = [("t1 t2 t3", ["yes sure", "no"]), ("t4", ["gladly indeed yes yes", "never never nope"])]
    sequences = [s for prompt, comps in rows for s in encode_candidates(tok, prompt, comps, cfg)]
    assert len({len(ids) for ids, _ in sequences}) > 1  # padding really happens
    with torch.no_grad():
        out = completion_logps(model, **pad_sequences(sequences, tok.pad_token_id, side))
    for (ids, n_prompt), got, length in zip(sequences, out.summed, out.lengths, strict=True):
        assert float(got) == pytest.approx(_direct_logp(model, ids, n_prompt), abs=1e-5)
        assert int(length) == len(ids) - n_prompt
    if chat:  # the template rendered the prompt as a user turn and the reply as the assistant's
        text = tok.decode(sequences[0][0])
        assert text.startswith("<user> t1 t2 t3 </s> <assistant>") and text.endswith("yes sure </s>")
    else:
        assert sequences[0][0][-1] == tok.eos_token_id


def test_truncation_follows_trl(lm_path: Path) -> None:
    _, tok = _load(lm_path)
    prompt = " ".join(f"t{i}" for i in range(10))
    ids = tok(prompt, add_special_tokens=False).input_ids
    ((seq, n),) = encode_candidates(tok, prompt, ["yes sure gladly"], Tokenization(max_prompt_length=4))
    assert seq[:n] == ids[-4:] and n == 4  # the prompt keeps its end
    ((seq, n),) = encode_candidates(tok, prompt, ["yes sure gladly"], Tokenization(max_completion_length=2))
    assert seq[n:] == tok("yes sure", add_special_tokens=False).input_ids  # the completion its start
    ((seq, n),) = encode_candidates(tok, prompt, ["yes sure"], Tokenization(max_length=6))
    assert len(seq) == 6 and n == 3  # keep_end: the last 6 tokens, prompt cut from the left
    ((seq, n),) = encode_candidates(
        tok, prompt, ["yes sure"], Tokenization(max_length=12, truncation_mode="keep_start")
    )
    assert len(seq) == 12 and n == 10
    with pytest.raises(ValueError, match="row 7: candidate 0 has no completion token left"):
        encode_candidates(
            tok, prompt, ["yes"], Tokenization(max_length=10, truncation_mode="keep_start"), "row 7"
        )


def test_bad_rows_are_named(tmp_path: Path) -> None:
    def write(rows: list[dict]) -> Path:
        path = tmp_path / "rows.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows))
        return path

    with pytest.raises(ValueError, match=r"rows\.jsonl:2: missing 'chosen'"):
        read_text_preferences(
            write([{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "rejected": "c"}])
        )
    with pytest.raises(ValueError, match=r"rows\.jsonl:1: 'rejected' is empty"):
        read_text_preferences(write([{"prompt": "a", "chosen": "b", "rejected": "  "}]))
    with pytest.raises(ValueError, match=r"rows\.jsonl:1: 2 rewards for 3 completions"):
        read_text_preferences(write([{"prompt": "a", "completions": ["x", "y", "z"], "rewards": [1, 2]}]))
    with pytest.raises(ValueError, match=r"rows\.jsonl:1: reward score 'chosen_reward' must be finite"):
        read_text_preferences(
            write(
                [
                    {
                        "prompt": "a",
                        "chosen": "b",
                        "rejected": "c",
                        "chosen_reward": float("nan"),
                        "rejected_reward": 0,
                    }
                ]
            )
        )
    with pytest.raises(ValueError, match="different numbers of candidates"):
        read_text_preferences(
            write(
                [
                    {"prompt": "a", "chosen": "b", "rejected": "c", "chosen_reward": 1, "rejected_reward": 0},
                    {"prompt": "a", "completions": ["x", "y", "z"], "rewards": [1, 2, 3]},
                ]
            )
        )
    rows = read_text_preferences(
        write([{"prompt": "a", "chosen": "b", "rejected": "c", "score_chosen": 8, "score_rejected": 3}])
    )
    assert rows[0].rewards == [8.0, 3.0]  # UltraFeedback's column names


def test_hf_dataset_and_parquet_rows_read_like_jsonl(tmp_path: Path) -> None:
    import datasets

    jsonl = synthetic_preferences(tmp_path / "p.jsonl", rows=5, rewards=True)
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "p.parquet"))
    expected = [(r.prompt, r.completions, r.rewards) for r in read_text_preferences(jsonl)]
    for source in (tmp_path / "saved", tmp_path / "p.parquet"):
        assert [(r.prompt, r.completions, r.rewards) for r in read_text_preferences(source)] == expected


OBJECTIVES = {  # objective -> (data file, overrides for the tiny task)
    "dpo": ("pairs", []), "ipo": ("pairs", []), "simpo": ("pairs", []), "cpo": ("pairs", []),
    "orpo": ("pairs", []), "mappo": ("pairs", []), "madpo": ("pairs", []), "fdpo": ("pairs", []),
    "kldo": ("pairs", []), "rso": ("pairs", []), "nca": ("candidates", []), "infonca": ("candidates", []),
}  # fmt: skip


def _heldout_accuracy(model_path: Path, data: Path) -> float:
    """How often the model gives the chosen (best) completion a higher mean token log-prob."""
    model, tok = _load(model_path)
    records = read_text_preferences(data)
    cfg = Tokenization()
    right = 0
    for r in records:
        seqs = encode_candidates(tok, r.prompt, r.completions, cfg)
        with torch.no_grad():
            out = completion_logps(model, **pad_sequences(seqs, tok.pad_token_id))
        best = 0 if r.rewards is None else max(range(len(r.rewards)), key=r.rewards.__getitem__)
        worst = 1 if r.rewards is None else min(range(len(r.rewards)), key=r.rewards.__getitem__)
        right += int(out.mean[best] > out.mean[worst])
    return right / len(records)


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_every_objective_trains_through_the_train_script(
    objective: str, lm_path: Path, tmp_path: Path
) -> None:
    from diffalign.cli import main  # what scripts/train.py runs

    kind, extra = OBJECTIVES[objective]
    data = synthetic_preferences(
        tmp_path / "train.jsonl", rows=48, candidates=2 if kind == "pairs" else 4, rewards=True
    )
    heldout = synthetic_preferences(
        tmp_path / "heldout.jsonl", rows=32, seed=1, candidates=2 if kind == "pairs" else 4, rewards=True
    )
    config = Path(__file__).resolve().parents[1] / "configs" / "text" / f"{objective}.yaml"
    out = tmp_path / "run"
    before = _heldout_accuracy(lm_path, heldout)
    code = main([
        "train", "--config", str(config), f"model.pretrained={lm_path}", f"data.path={data}",
        f"output_dir={out}", "max_steps=40", "optim.lr=2e-3", "log_every=1", "checkpoint_every=40",
        "report_to=[]", *extra,
    ])  # fmt: skip
    assert code == 0
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"step"' in line]
    log = [m for m in log if "loss" in m]
    assert len(log) == 40 and all(torch.isfinite(torch.tensor(m["loss"])) for m in log)
    first, last = log[:5], log[-5:]
    assert sum(m["loss"] for m in last) < sum(m["loss"] for m in first)
    for key in ("rewards/accuracies", "rewards/margins"):
        if key in log[0]:
            assert sum(m[key] for m in last) > sum(m[key] for m in first), key
    after = _heldout_accuracy(out / "checkpoints" / "checkpoint-40" / "export", heldout)
    assert after >= 0.9 and after > before, (before, after)


def _method(lm_path: Path, data: Path, out: Path, *overrides: str):  # type: ignore[no-untyped-def]
    from diffalign.config import load_config
    from diffalign.methods.text_preference import TextPreference
    from diffalign.training.config import TrainConfig

    config = Path(__file__).resolve().parents[1] / "configs" / "text" / "dpo.yaml"
    cfg = load_config(
        TrainConfig,
        config,
        [f"model.pretrained={lm_path}", f"data.path={data}", f"output_dir={out}", *overrides],
    )
    method = TextPreference(cfg)
    method.setup(torch.device("cpu"), torch.float32)
    return method


@pytest.mark.parametrize("lora", [False, True])
def test_precomputed_reference_gives_the_live_reference_loss(
    lora: bool, lm_path: Path, tmp_path: Path
) -> None:
    data = synthetic_preferences(tmp_path / "d.jsonl", rows=12)
    lora_args = ["model.lora={rank: 4, target_modules: [q_proj, v_proj]}"] if lora else []
    live = _method(lm_path, data, tmp_path / "live", "model.reference=auto", *lora_args)
    pre = _method(lm_path, data, tmp_path / "pre", "model.reference=precomputed", *lora_args)
    assert pre.reference is None and (live.reference is None) == lora  # LoRA: adapters disabled, no copy
    cached = list((tmp_path / "pre").glob("reference_logps-*.safetensors"))
    assert len(cached) == 1
    with torch.no_grad():  # move the policy away from the reference so that the reference term matters
        for p in live.model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
        for a, b in zip(pre.model.parameters(), live.model.parameters(), strict=True):
            a.copy_(b)
    dataset, collate = pre.dataset()
    batch = collate([dataset[i] for i in range(6)])
    assert batch["reference_logps"] is not None
    loss_pre, metrics = pre.step(batch)
    loss_live, _ = live.step({**batch, "reference_logps": None})
    assert float(loss_pre.detach()) == pytest.approx(float(loss_live.detach()), abs=1e-6)
    assert abs(metrics["rewards/margins"]) > 1e-4  # the policy really differs from the reference
    again = _method(lm_path, data, tmp_path / "pre", "model.reference=precomputed", *lora_args)
    assert torch.equal(again.data.reference_logps, pre.data.reference_logps)  # read from the cache


def test_lora_training_exports_an_adapter(
    lm_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffalign.cli import main

    data = synthetic_preferences(tmp_path / "d.jsonl", rows=16)
    config = Path(__file__).resolve().parents[1] / "configs" / "text" / "dpo.yaml"
    out = tmp_path / "run"
    monkeypatch.chdir(lm_path.parent)  # the model given by a relative path, as users do
    code = main([
        "train", "--config", str(config), f"model.pretrained={lm_path.name}", f"data.path={data}",
        f"output_dir={out}", "model.lora={rank: 4, target_modules: [all-linear]}", "max_steps=3",
        "checkpoint_every=3", "optim.lr=1e-2", "report_to=[]",
    ])  # fmt: skip
    assert code == 0
    export = out / "checkpoints" / "checkpoint-3" / "export"
    assert (export / "adapter_config.json").is_file() and (export / "tokenizer.json").is_file()
    from peft import AutoPeftModelForCausalLM

    monkeypatch.chdir(tmp_path)  # the export loads from anywhere: its base is recorded absolute
    trained = AutoPeftModelForCausalLM.from_pretrained(export)
    base, _ = _load(lm_path)
    x = torch.tensor([[1, 7, 8, 9]])
    with torch.no_grad():
        assert not torch.allclose(trained(x).logits, base(x).logits)  # the adapter changed the model


def test_rso_data_step_pairs_the_accepted_samples(lm_path: Path, tmp_path: Path) -> None:
    from script_loader import load_script

    from diffalign.text.tiny import yes_fraction

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"t{i} t{i + 1}"}) for i in range(6)))
    out = load_script("rso_data").main([
        "--model", str(lm_path), "--prompts", str(prompts), "--reward", "diffalign.text.tiny:yes_fraction",
        "--out", str(tmp_path / "rso.jsonl"), "--num-candidates", "12", "--num-accepted", "4",
        "--max-new-tokens", "6", "--beta", "0.05",
    ])  # fmt: skip
    records = read_text_preferences(out)
    assert 1 <= len(records) <= 6 * 2
    for r in records:
        chosen, rejected = r.completions
        assert r.rewards == yes_fraction([], [chosen, rejected])  # rewards are the reward's scores
        assert r.rewards[0] > r.rewards[1]
    with pytest.raises(ValueError, match="num_accepted must be even"):
        load_script("rso_data").main([
            "--model", str(lm_path), "--prompts", str(prompts), "--reward",
            "diffalign.text.tiny:yes_fraction", "--out", str(tmp_path / "x.jsonl"), "--num-accepted", "3",
        ])  # fmt: skip


def test_objectives_that_need_rewards_refuse_rows_without_them(lm_path: Path, tmp_path: Path) -> None:
    data = synthetic_preferences(tmp_path / "d.jsonl", rows=4)  # pairs, no reward columns
    with pytest.raises(
        ValueError, match=r"objective 'mappo' requires `chosen_rewards` .* rows of .*d\.jsonl have no rewards"
    ):
        _method(lm_path, data, tmp_path / "out", "objective={name: mappo}")
    _method(lm_path, data, tmp_path / "out", "objective={name: infonca}")  # K = 2: the hard label suffices


def test_lora_runs_are_fixed_by_the_seed(lm_path: Path, tmp_path: Path) -> None:
    """Two `diffalign.train` calls in one process, whatever ran before: the same adapters, losses
    and weights (the adapters used to be drawn before the seed was applied)."""
    from safetensors.torch import load_file

    from diffalign.api import train

    data = synthetic_preferences(tmp_path / "d.jsonl", rows=16)
    config = Path(__file__).resolve().parents[1] / "configs" / "text" / "dpo.yaml"
    runs = []
    for i in range(2):
        torch.manual_seed(100 + i)  # unrelated random draws before the run
        out = tmp_path / f"run{i}"
        train(config, [
            f"model.pretrained={lm_path}", f"data.path={data}", f"output_dir={out}", "max_steps=3",
            "model.lora={rank: 4}", "optim.lr=1e-2", "report_to=[]",  # default targets: all-linear
            "log_every=1", "checkpoint_every=3", "seed=0",
        ])  # fmt: skip
        losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs.append((losses, load_file(out / "checkpoints/checkpoint-3/export/adapter_model.safetensors")))
    (losses_a, weights_a), (losses_b, weights_b) = runs
    assert losses_a == losses_b and losses_a[0] != losses_a[-1]
    assert weights_a.keys() == weights_b.keys() and all(
        torch.equal(weights_a[k], weights_b[k]) for k in weights_a
    )


@pytest.fixture(scope="module")
def sft_adapter(lm_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SFT LoRA adapter folder for the tiny LM with non-zero B (as training leaves it), no tokenizer."""
    from peft import LoraConfig, get_peft_model

    model, _ = _load(lm_path)
    torch.manual_seed(3)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    folder = tmp_path_factory.mktemp("sft") / "adapter"
    peft_model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "extra",
    [[], ["model.lora={rank: 4, target_modules: [q_proj]}"],
     ["model.lora={rank: 4, target_modules: [q_proj]}", "model.reference=copy"]],
    ids=["full", "lora-adapters-reference", "lora-copy-reference"],
)  # fmt: skip
def test_an_sft_adapter_folder_is_the_starting_point(
    lm_path: Path, sft_adapter: Path, tmp_path: Path, extra: list[str]
) -> None:
    """`model.pretrained` = a peft adapter folder: policy and reference both equal base + adapter at
    step 0 (they used to equal the base), the loss is log 2, and a LoRA export reloads as the policy."""
    from peft import AutoPeftModelForCausalLM

    data = synthetic_preferences(tmp_path / "d.jsonl", rows=8)
    sft = AutoPeftModelForCausalLM.from_pretrained(sft_adapter).merge_and_unload().eval()
    base, _ = _load(lm_path)
    method = _method(sft_adapter, data, tmp_path / "out", *extra)
    x = torch.tensor([[1, 7, 8, 9, 10]])
    with torch.no_grad():
        policy = method.model(x).logits
        if method.reference is not None:
            reference = method.reference(x).logits
        else:
            with method.model.disable_adapter():
                reference = method.model(x).logits
        assert (sft(x).logits - base(x).logits).abs().max() > 0.1  # the adapter matters
        torch.testing.assert_close(policy, sft(x).logits)
        torch.testing.assert_close(reference, sft(x).logits)
    assert sum(p.numel() for p in method.model.parameters() if p.requires_grad) > 0
    dataset, collate = method.dataset()
    loss, metrics = method.step(collate([dataset[i] for i in range(4)]))
    assert float(loss.detach()) == pytest.approx(math.log(2)) and metrics["rewards/margins"] == 0.0
    if extra:
        method.export(tmp_path / "export")
        reloaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "export")
        with torch.no_grad():
            torch.testing.assert_close(reloaded(x).logits, policy)  # its base is the merged start


def test_adapter_folders_that_cannot_be_used_are_named(
    lm_path: Path, sft_adapter: Path, tmp_path: Path
) -> None:
    import shutil

    data = synthetic_preferences(tmp_path / "d.jsonl", rows=4)
    offline = tmp_path / "offline_adapter"
    shutil.copytree(sft_adapter, offline)
    config = json.loads((offline / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "no-such-base")
    (offline / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(
        FileNotFoundError, match=rf"the adapter {offline} needs its base model .*no-such-base"
    ):
        _method(offline, data, tmp_path / "out")
    # its base given explicitly (a local copy of a hub model, say): works
    method = _method(lm_path, data, tmp_path / "out", f"model.adapter={offline}")
    assert method.model.config.diffalign_merged_adapter == str(offline)
    for not_adapter, why in (
        (tmp_path / "missing", "does not exist"),
        (lm_path, "has no adapter_config.json"),
    ):
        with pytest.raises(FileNotFoundError, match=rf"model.adapter: {not_adapter} {why}"):
            _method(lm_path, data, tmp_path / "out", f"model.adapter={not_adapter}")
    with pytest.raises(ValueError, match=r"is itself an adapter folder and model\.adapter"):
        _method(sft_adapter, data, tmp_path / "out", f"model.adapter={offline}")


def test_precomputed_reference_cache_follows_the_model_not_its_path(tmp_path: Path) -> None:
    """A model retrained and saved over the old one at the same path, same output_dir: the cached
    reference of the old model is not reused (it was, with loss 0.68 and margins 0.027 at step 0)."""
    data = synthetic_preferences(tmp_path / "d.jsonl", rows=8)
    path = tmp_path / "lm"

    def retheta() -> None:  # the same weights, another RoPE base: other outputs
        config = json.loads((path / "config.json").read_text())
        rope = config.get("rope_parameters") or config
        rope["rope_theta"] = 2 * rope.get("rope_theta", 10000.0)
        (path / "config.json").write_text(json.dumps(config))

    for change in (
        lambda: build_tiny_causal_lm(path, seed=0),
        lambda: build_tiny_causal_lm(path, seed=5),
        retheta,
    ):
        change()  # each replaces the model at the same path
        method = _method(path, data, tmp_path / "out", "model.reference=precomputed")
        dataset, collate = method.dataset()
        loss, metrics = method.step(collate([dataset[i] for i in range(8)]))
        assert float(loss.detach()) == pytest.approx(math.log(2)) and metrics["rewards/margins"] == 0.0
    assert len(list((tmp_path / "out").glob("reference_logps-*.safetensors"))) == 3


def test_text_ties_train_towards_one_half(lm_path: Path, tmp_path: Path) -> None:
    """Pairs with `label: 0.5` are dropped by default and, with `data.ties=half`, passed on as soft
    labels: DPO's loss then differs from the win's by exactly half the margin (L(h) - L(-h) = -beta h)."""
    rows = [
        json.loads(line)
        for line in synthetic_preferences(tmp_path / "d.jsonl", rows=8).read_text().splitlines()
    ]
    data = tmp_path / "ties.jsonl"
    data.write_text("\n".join(json.dumps({**r, "label": 0.5 if i % 2 else 1}) for i, r in enumerate(rows)))
    assert len(_method(lm_path, data, tmp_path / "drop").data) == 4
    method = _method(lm_path, data, tmp_path / "half", "data.ties=half")
    with torch.no_grad():  # move the policy off its frozen copy
        for p in method.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    dataset, collate = method.dataset()
    batch = collate([dataset[i] for i in range(1, 8, 2)])  # the four ties
    assert batch["labels"].tolist() == [0.5] * 4
    tie, metrics = method.step(batch)
    win, _ = method.step({**batch, "labels": torch.ones(4)})
    assert abs(metrics["rewards/margins"]) > 1e-3
    assert float((win - tie).detach()) == pytest.approx(-0.5 * metrics["rewards/margins"], abs=1e-9)
    with pytest.raises(ValueError, match=r"data\.ties=half .* objective 'kldo' cannot use"):
        _method(lm_path, data, tmp_path / "kldo", "data.ties=half", "objective={name: kldo}")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**rows[0], "label": None}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: label must be 1 or 0.5 \(a tie\), got None"):
        _method(lm_path, bad, tmp_path / "bad")


def test_objectives_that_take_targets_from_scores_keep_them(lm_path: Path, tmp_path: Path) -> None:
    """Scored pairs: SmPO's soft label comes from the scores although every pair has the hard label
    1, and keeping ties as labels 1/2 beside the scores is refused when the method is built."""
    data = synthetic_preferences(tmp_path / "d.jsonl", rows=4, rewards=True)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    method = _method(
        lm_path,
        data,
        tmp_path / "s",
        "objective={name: smoothed_dpo, beta: 0.1, reward_min: 0, reward_max: 1}",
    )
    dataset, collate = method.dataset()
    _, metrics = method.step(collate([dataset[i] for i in range(4)]))
    gaps = torch.tensor([r["chosen_reward"] - r["rejected_reward"] for r in rows], dtype=torch.float64)
    assert metrics["smpo/soft_label"] == pytest.approx(float(torch.sigmoid(gaps).mean()))
    for name in ("nca", "infonca", "smoothed_dpo"):
        with pytest.raises(ValueError, match=rf"objective '{name}' takes its targets from the reward scores"):
            _method(lm_path, data, tmp_path / name, "data.ties=half", f"objective={{name: {name}}}")


def test_listwise_objectives_train_on_unscored_pairs(lm_path: Path, tmp_path: Path) -> None:
    """K = 2 without rewards: InfoNCA's target is the label, as for DPO (it used to fail at step 1)."""
    data = synthetic_preferences(tmp_path / "d.jsonl", rows=4)
    method = _method(lm_path, data, tmp_path / "out", "objective={name: infonca, beta: 0.1}")
    dataset, collate = method.dataset()
    loss, metrics = method.step(collate([dataset[i] for i in range(4)]))
    assert float(loss.detach()) == pytest.approx(math.log(2)) and metrics["rewards/margins"] == 0.0
