"""Online (iterative) preference optimisation of a causal LM: sample, score, pair, train, repeat.

Each round ``i`` (``run_online``):

1. sample: ``samples_per_prompt`` completions per prompt from the current policy ``pi^(i-1)``
   (transformers ``generate``, seeded by ``seed + i``): :func:`sample_completions`;
2. score them with a text reward ``(prompts, completions) -> scores``
   (:data:`~diffalign.text.sampling.TextReward`, given as ``module:function``);
3. pair them with :func:`~diffalign.objectives.pairs_from_scores` (best against worst, every pair
   apart by ``margin``, or RSO's rule): :func:`pair_rows`, TRL-style rows (prompt, chosen,
   rejected, chosen_reward, rejected_reward);
4. optionally filter them by uncertainty (UPO's self-evolution, :func:`diffalign.text.upo.upo_filter`);
5. train one round of ``text_preference`` (``train``: any objective of the library) from
   ``pi^(i-1)`` with ``pi^(i-1)`` as the reference; the next round starts from its export.

This is the loop of online VPO (Cen et al. 2024, Algorithm 1, with ``objective: {name: vpo, mode:
online, calibration: both}``: the pair's two samples are reference samples) and of UPO's
self-evolution (Wang et al. 2024). Limits: one process (the sampling is not distributed); each
round trains on that round's pairs only (VPO's Algorithm 1 accumulates the data of all rounds;
UPO's code mixes in labeled data): concatenate earlier rounds' ``pairs.jsonl`` yourself for that.

Restarts: a run killed and started again with the same config skips the rounds it finished
(``round-N/round.json``) and resumes an unfinished round's training from its last checkpoint
(sampling is seeded, so the round's pairs come out the same).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from diffalign.config import (
    AT_LEAST_ONE,
    NON_NEGATIVE,
    POSITIVE,
    ConfigError,
    Range,
    build,
    check_ranges,
    claim_settings,
)
from diffalign.objectives import PairRule
from diffalign.text.loading import check_model_source
from diffalign.text.logps import Tokenization, candidate_logps
from diffalign.text.sampling import TextReward, load_text_reward, pair_rows, sample_completions, score_texts
from diffalign.text.upo import UPOSettings, upo_filter
from diffalign.training.config import TrainConfig

SETTINGS_FILE = "online.json"  # the settings a restart must repeat
ROUND_FILE = "round.json"  # a finished round's summary; its presence marks the round done

__all__ = [
    "OnlineTextConfig",
    "check_round_config",
    "implicit_reward_accuracy",
    "read_prompts",
    "run_online",
    "train_round",
    "write_rows",
]


@dataclass
class OnlineTextConfig:
    """What ``scripts/online_text.py`` runs (every key in its ``--help``)."""

    train: dict[str, Any] = field(
        metadata={"help": "a text_preference training config (as configs/text/dpo.yaml) for each round; "
                  "model.pretrained is the starting policy, data.path and output_dir are set per round"}
    )  # fmt: skip
    prompts: Path = field(metadata={"help": "JSONL / parquet / dataset with a 'prompt' column"})
    reward: str = field(metadata={"help": "module:function scoring (prompts, completions) -> scores"})
    output_dir: Path = field(default=Path("outputs/online"), metadata={"help": "round-N folders"})
    rounds: int = field(default=2, metadata={"help": "online rounds"})
    samples_per_prompt: int = field(default=4, metadata={"help": "completions sampled per prompt"})
    max_new_tokens: int = field(default=64, metadata={"help": "completion length limit"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    pair_rule: PairRule = field(default="best_worst", metadata={"help": "best_worst, margin or rso"})
    margin: float = field(default=0.0, metadata={"help": "smallest reward gap of a pair"})
    seed: int = field(default=0, metadata={"help": "round i samples with seed + i"})
    upo: UPOSettings | None = field(default=None, metadata={"help": "UPO's uncertainty filter (none: off)"})

    ranges: ClassVar[dict[str, Range]] = {
        "rounds": AT_LEAST_ONE, "samples_per_prompt": Range(2), "max_new_tokens": AT_LEAST_ONE,
        "temperature": POSITIVE, "margin": NON_NEGATIVE,
    }  # fmt: skip

    def __post_init__(self) -> None:
        check_ranges(self)
        if not isinstance(self.train.get("model"), dict) or not self.train["model"].get("pretrained"):
            raise ConfigError("missing required key 'train.model.pretrained' (the starting policy)")
        check_round_config(round_config(self.train, "<start>", Path("<rows>"), Path("<out>")))


def check_round_config(cfg: TrainConfig) -> None:
    """Build what a round's method builds from its config, its objective and method options, so
    that a bad ``train`` section fails before any sampling.

    Raises:
        ConfigError: naming the ``train.`` key (an unknown method, objective or option, a value out
            of range).
    """
    from diffalign.methods import get_method
    from diffalign.training.config import with_method_defaults

    try:
        method = get_method(cfg.method)
        filled = with_method_defaults(cfg, cfg.method, method.defaults)
        if method.options_class is not None:
            build(method.options_class, filled.method_options, source="method_options")
    except (KeyError, TypeError, ValueError) as err:  # ConfigError is a ValueError
        raise ConfigError(f"train: {err.args[0] if err.args else err}") from err


def round_config(train: dict[str, Any], model: str, rows: Path, output_dir: Path) -> TrainConfig:
    """The ``train`` mapping as one round's TrainConfig: that round's model, rows and folder."""
    data = {**train, "model": {**train.get("model", {}), "pretrained": model}}
    data |= {"data": {**train.get("data", {}), "path": rows}, "output_dir": output_dir}
    return build(TrainConfig, data, source="online config", prefix="train.")


def implicit_reward_accuracy(
    policy: Any, reference: Any, tokenizer: Any, rows: list[dict], tokenization: Tokenization | None = None
) -> float:
    """Held-out preference accuracy of the implicit reward ``log pi/pi_ref``: the fraction of
    ``rows`` (prompt, chosen, rejected) where it is higher for the chosen completion (0 to 1).

    Raises:
        ValueError: no rows.
    """
    if not rows:
        raise ValueError("implicit_reward_accuracy: no rows")
    right = 0
    with torch.no_grad():
        for r in rows:
            pair = [r["chosen"], r["rejected"]]
            rho = candidate_logps(policy, tokenizer, r["prompt"], pair, tokenization) - candidate_logps(
                reference, tokenizer, r["prompt"], pair, tokenization
            )
            right += int(rho[0] > rho[1])
    return right / len(rows)


def read_prompts(path: str | Path) -> list[str]:
    """The ``prompt`` column of rows (JSONL, parquet, dataset folder; other columns ignored).

    Raises:
        ValueError: a row without a prompt or with an empty one, or no rows.
    """
    from diffalign.data.rows import read_rows

    prompts = []
    for where, row in read_rows(path, columns=("prompt",), what="prompts"):
        if not str(row.get("prompt", "")).strip():
            raise ValueError(f"{where}: missing or empty 'prompt'")
        prompts.append(str(row["prompt"]))
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def train_round(cfg: TrainConfig) -> Path:
    """Train ``cfg`` (a ``text_preference`` config) and return its final export folder."""
    from diffalign.api import train
    from diffalign.training.loop import checkpoints

    result = train(cfg)
    return checkpoints(result.output_dir)[-1] / "export"


def write_rows(rows: list[dict], path: Path, as_json: bool = False) -> Path:
    """Write ``rows`` as JSONL (or, ``as_json``, the one row as a JSON object) by rename: a killed
    run leaves the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(rows[0], indent=2) if as_json else "".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
    return path


def _claim_output(cfg: OnlineTextConfig) -> None:
    """Write ``online.json`` (the settings) in ``cfg.output_dir``, or check a restart against it:
    finished rounds are reused only under the settings that made them (ConfigError otherwise)."""
    from diffalign.config import to_dict

    claim_settings(Path(cfg.output_dir), SETTINGS_FILE, to_dict(cfg), "rounds")


def run_online(cfg: OnlineTextConfig, reward: TextReward | None = None) -> list[dict[str, Any]]:
    """Run ``cfg.rounds`` rounds (module docstring); return one summary per round: the mean
    reward of the samples (of the policy that starts the round), the pairs made and kept, the
    export. ``reward`` overrides ``cfg.reward`` (a callable instead of its ``module:function``).

    Raises:
        ValueError: a round makes no pairs (every prompt's samples tied or were empty).
    """
    from diffalign.text.loading import load_causal_lm

    reward = reward or load_text_reward(cfg.reward)
    prompts = read_prompts(cfg.prompts)
    _claim_output(cfg)
    # missing model folders fail now, not after a round's sampling
    check_model_source(cfg.train["model"]["pretrained"], "train.model.pretrained")
    if cfg.upo is not None:
        check_model_source(cfg.upo.estimator, "upo.estimator")
        check_model_source(cfg.upo.estimator_reference, "upo.estimator_reference")
    model_path, summaries = str(cfg.train["model"]["pretrained"]), []
    for i in range(1, cfg.rounds + 1):
        folder = Path(cfg.output_dir) / f"round-{i}"
        if (folder / ROUND_FILE).is_file():  # finished before a restart: not sampled or trained again
            summaries.append(json.loads((folder / ROUND_FILE).read_text()))
            model_path = summaries[-1]["export"]
            continue
        model, tokenizer = load_causal_lm(model_path)
        model.eval()
        completions = sample_completions(
            model,
            tokenizer,
            prompts,
            cfg.samples_per_prompt,
            cfg.max_new_tokens,
            cfg.temperature,
            cfg.seed + i,
        )
        flat = [(p, t) for p, texts in zip(prompts, completions, strict=True) for t in texts]
        mean_reward = sum(score_texts(reward, [p for p, _ in flat], [t for _, t in flat])) / max(len(flat), 1)
        rows = pair_rows(prompts, completions, reward, cfg.pair_rule, cfg.margin, cfg.seed + i)
        made = len(rows)
        if cfg.upo is not None and rows:
            rows = upo_filter(rows, cfg.upo, seed=cfg.seed + i)
        if not rows:
            raise ValueError(
                f"round {i}: no pairs (every prompt's samples tied, were empty or were filtered)"
            )
        data = write_rows(rows, folder / "pairs.jsonl")
        # resume_from latest: a round killed while training goes on from its last checkpoint
        round_cfg = dataclasses.replace(
            round_config(cfg.train, model_path, data, folder / "train"), resume_from="latest"
        )
        model_path = str(train_round(round_cfg))
        summaries.append({"round": i, "sample_reward": mean_reward, "pairs": made, "kept": len(rows),
                          "export": model_path})  # fmt: skip
        write_rows([summaries[-1]], folder / ROUND_FILE, as_json=True)
        tqdm.write(json.dumps(summaries[-1]))
    return summaries
