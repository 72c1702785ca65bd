"""Every registered objective in both recipes: `diffusion_dpo` on the tiny SD pipeline and
`text_preference` on the tiny causal LM. Each cell either trains one step (finite loss, a finite
and non-zero gradient) on each kind of data it takes, or is refused when the method is built, with
a message naming what it needs; no cell may fail at its first step. README's table of which
objective runs where is this matrix (the last test keeps the two equal)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from script_loader import load_script

from diffalign.methods import get_method
from diffalign.objectives import get_objective, list_objectives
from diffalign.text.tiny import build_tiny_causal_lm, synthetic_preferences
from diffalign.training.config import DataConfig, ModelConfig, TrainConfig

README = Path(__file__).resolve().parents[1] / "README.md"


@dataclass(frozen=True)
class Refused:
    """Refused when the method is built, whatever the data: ``match`` is a regex of the message,
    ``readme`` what README's table says."""

    match: str
    readme: str


PAIRS = "pairs"  # trains on unscored pairs (and, for an objective that uses them, on scored ones)
SCORES = "scores"  # refused on unscored pairs with a message naming the scores; trains on scored
NO_LENGTHS = Refused(
    r"diffusion_dpo: objective 'ipo' requires `chosen_lengths`; diffusion_dpo has no candidate lengths",
    "refused: no lengths (`denoising_logp` is a per-element mean already; use plain `ipo`)",
)
POLICY_GRADIENT = Refused(
    r"objective 'ppo_clip' is a policy_gradient objective and needs policy_logps, old_policy_logps, "
    "advantages",
    "refused: policy-gradient (sampled trajectories with old log-probs and advantages)",
)

# case -> (objective config, diffusion_dpo, text_preference)
TABLE: dict[str, tuple[dict[str, Any], str | Refused, str | Refused]] = {
    name: ({"name": name}, PAIRS, PAIRS)
    for name in (
        "dpo", "ipo", "apo", "apo_zero", "apo_down", "cdpo", "robust", "hinge", "rso", "simpo", "cpo",
        "orpo", "fdpo", "kldo", "dro_ranking", "nca", "infonca",
    )
} | {
    "ipo-length_normalized": ({"name": "ipo", "length_normalized": True}, NO_LENGTHS, PAIRS),
    "mappo": ({"name": "mappo"}, SCORES, SCORES),
    "madpo": ({"name": "madpo"}, SCORES, SCORES),
    "smoothed_dpo": ({"name": "smoothed_dpo"}, SCORES, SCORES),
    "pearson_calibration": ({"name": "pearson_calibration"}, Refused(
        r"diffusion_dpo: objective 'pearson_calibration' requires `chosen_lengths`; diffusion_dpo has no "
        "candidate lengths",
        "refused: no lengths (its NLL term is per token; `denoising_logp` has none)",
    ), SCORES),
    "ppo_clip": ({"name": "ppo_clip"}, POLICY_GRADIENT, POLICY_GRADIENT),
    "vpo": ({"name": "vpo"}, PAIRS, PAIRS),
    **{name: ({"name": name}, PAIRS, PAIRS) for name in (  # TRL's loss types (trl_losses.py)
        "exo_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "discopop", "sft", "combined",
    )},
    "dpo_norm": ({"name": "dpo_norm"}, Refused(
        r"diffusion_dpo: objective 'dpo_norm' requires `chosen_lengths`; diffusion_dpo has no "
        "candidate lengths",
        "refused: no lengths (`denoising_logp` is a per-element mean already; use `dpo`)",
    ), PAIRS),
}  # fmt: skip
METHODS = ("diffusion_dpo", "text_preference")
SCORES_NAMED = {
    "diffusion_dpo": r"the pairs have no reward scores: .* method_options\.score_prefix",
    "text_preference": r"have no rewards: give chosen_reward and rejected_reward",
}


@pytest.fixture(scope="module")
def data(tiny_pipelines, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Built once for the whole matrix: unscored image pairs (JSONL), the same pairs as a
    Pick-a-Pic parquet scored by scripts/score_dataset.py, and text pairs, scored pairs and
    K = 4 scored candidates."""
    root = tmp_path_factory.mktemp("table")
    pairs = load_script("make_tiny_assets").make_pairs(root / "images", n_pairs=4)
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    picks = root / "pairs.parquet"
    pq.write_table(pa.table({
        "caption": [r["prompt"] for r in rows],
        "jpg_0": [(pairs.parent / r["chosen"]).read_bytes() for r in rows],
        "jpg_1": [(pairs.parent / r["rejected"]).read_bytes() for r in rows],
        "label_0": [1.0, 0.0, 1.0, 0.0],
    }), picks)  # fmt: skip
    score = load_script("score_dataset")
    scored = score.score_dataset(score.ScoreDatasetConfig(
        data=picks, output=root / "scored.parquet", reward="jpeg_compressibility", column_prefix="jpeg"
    ))  # fmt: skip
    text = root / "text"
    text.mkdir()
    return {
        "pipeline": tiny_pipelines["sd"],
        "lm": build_tiny_causal_lm(text / "lm"),
        "diffusion_dpo": {"pairs": (pairs, {}), "scored": (scored, {"score_prefix": "jpeg"})},
        "text_preference": {
            "pairs": (synthetic_preferences(text / "pairs.jsonl", rows=4), {}),
            "scored": (synthetic_preferences(text / "scored.jsonl", rows=4, rewards=True), {}),
            "candidates": (synthetic_preferences(text / "k4.jsonl", rows=4, candidates=4), {}),
        },
        "out": root / "out",
    }


def build(method: str, objective: dict[str, Any], kind: str, data: dict[str, Any]) -> Any:
    path, options = data[method][kind]
    model = data["pipeline"] if method == "diffusion_dpo" else str(data["lm"])
    cfg = TrainConfig(
        method=method,
        model=ModelConfig(pretrained=model),
        data=DataConfig(path=path, resolution=32 if method == "diffusion_dpo" else None),
        objective=objective,
        method_options=options,
        output_dir=data["out"],
    )
    return get_method(method)(cfg)


def train_one_step(method: Any) -> float:
    """The loss of one step on the first two rows; asserts it and the gradient are finite, and
    that the gradient moves the model."""
    method.setup(torch.device("cpu"), torch.float32)
    dataset, collate = method.dataset()
    loss, _ = method.step(collate([dataset[0], dataset[1]]))
    loss.backward()
    grads = [p.grad for p in method.trainable_module().parameters() if p.grad is not None]
    assert torch.isfinite(loss.detach()), float(loss)
    assert grads and all(bool(g.isfinite().all()) for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    return float(loss.detach())


def cell_data(method: str, case: str) -> list[str]:
    """The kinds of data a training cell runs on: the scored kinds only where the objective uses
    scores (the others never receive them); K = 4 candidates on the text side."""
    objective, diffusion, text = TABLE[case]
    needs = diffusion if method == "diffusion_dpo" else text
    uses = get_objective(**objective).uses_rewards
    kinds = ["scored"] if needs == SCORES else ["pairs", "scored"] if uses else ["pairs"]
    return kinds + (["candidates"] if method == "text_preference" else [])


def test_the_table_has_every_objective() -> None:
    assert {objective["name"] for objective, _, _ in TABLE.values()} == set(list_objectives())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", sorted(TABLE))
def test_each_cell_trains_or_is_refused_when_built(case: str, method: str, data: dict[str, Any]) -> None:
    objective, diffusion, text = TABLE[case]
    expected = diffusion if method == "diffusion_dpo" else text
    if isinstance(expected, Refused):
        for kind in data[method]:
            with pytest.raises(ValueError, match=expected.match):
                build(method, objective, kind, data)
        return
    if expected == SCORES:
        with pytest.raises(
            ValueError, match=rf"objective '{objective['name']}' requires .*{SCORES_NAMED[method]}"
        ):
            build(method, objective, "pairs", data)
    for kind in cell_data(method, case):
        train_one_step(build(method, objective, kind, data))


def readme_cell(method: str, case: str) -> str:
    objective, diffusion, text = TABLE[case]
    expected = diffusion if method == "diffusion_dpo" else text
    if isinstance(expected, Refused):
        return expected.readme
    scores = "scores" if method == "diffusion_dpo" else "rewards"
    cell = f"pairs + {scores}" if expected == SCORES else "pairs"
    if expected == PAIRS and get_objective(**objective).uses_rewards:
        cell += f" (+ {scores}: its targets)"
    return cell + ("; K candidates + rewards" if method == "text_preference" else "")


def test_readme_table_is_this_matrix() -> None:
    text = README.read_text()
    for case, (objective, _, _) in TABLE.items():
        options = [f"`{k}`" for k in objective if k != "name"]
        name = f"`{objective['name']}`" + (f" ({', '.join(options)})" if options else "")
        row = f"| {name} | {readme_cell('diffusion_dpo', case)} | {readme_cell('text_preference', case)} |"
        assert row in text, row
