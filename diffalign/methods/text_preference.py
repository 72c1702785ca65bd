"""Preference optimisation of a causal LM with any objective of the library (TRL's DPOTrainer shape).

Per batch of rows (x, y_1 .. y_K), K = 2 for (chosen, rejected) pairs:

1. score all B*K candidates in one forward: summed completion-token log-probs and lengths
   (``completion_logps``; prompt and padding masked);
2. reference log-probs: precomputed once before training (``model.reference: precomputed``; the
   reference model is then never loaded again), or live under no-grad from a frozen copy
   (``copy``) or the same model with its LoRA adapters disabled (``adapters``);
3. the objective on those tensors: pairwise objectives (``dpo`` (Rafailov et al. 2023, Eq. 7),
   ``ipo``, ``simpo``, ``cpo``, ``orpo``, ``mappo``, ``madpo``, ``fdpo``, ``kldo``, ``rso``, ...)
   get candidate 0 as chosen and candidate 1 as rejected, or, for K > 2 rows with rewards, the
   best and the worst; listwise objectives (``nca``, ``infonca``) get all K with their rewards
   (K = 2: the pair, with its rewards or its label). A pair's ``label`` (1, or 0.5 for a tie kept
   with ``data.ties=half``) is passed as ``preference_probs``: a tie trains towards 1/2. Rewards
   reach only the objectives that use them (``mappo``, ``madpo``, ``smoothed_dpo``, ``nca``,
   ``infonca``).

The objective is checked against the rows when the method is built, before the model loads: an
objective that is not pairwise or listwise, K > 2 candidates without rewards, or an objective
that needs rewards the rows do not have (``mappo``, ``madpo``, ``smoothed_dpo``, whose soft
labels come from rewards, never from hard labels) is a ``ValueError`` naming what it needs.

Metrics as TRL names them: ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
``rewards/accuracies``, ``logps/chosen``, ``logps/rejected``.
"""

from __future__ import annotations

import copy
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch.utils.data import Dataset

from diffalign.config import AT_LEAST_ONE, ConfigError, Range, check_ranges
from diffalign.fingerprint import fingerprint, module_fingerprint, rows_fingerprint
from diffalign.objectives import (
    check_objective_inputs,
    check_ties,
    get_objective,
    soft_preference_probs,
)
from diffalign.text.data import TextRecord, read_text_preferences
from diffalign.text.dataset import TextPreferenceDataset
from diffalign.text.loading import load_causal_lm
from diffalign.text.logps import Tokenization, completion_logps
from diffalign.training.config import TrainConfig
from diffalign.training.loop import Method, Stateful

__all__ = ["TextPreference", "TextPreferenceOptions"]


@dataclass
class TextPreferenceOptions:
    tokenization: Tokenization = field(default_factory=Tokenization)
    disable_dropout: bool = True  # as TRL: dropout would make policy and reference disagree at step 0
    reference_batch_size: int = 16

    ranges: ClassVar[dict[str, Range]] = {"reference_batch_size": AT_LEAST_ONE}

    def __post_init__(self) -> None:
        check_ranges(self)


class TextPreference(Method):
    # TRL's DPOConfig (beta 0.1, lr 1e-6, no warmup, no weight decay, lr unscaled); LoRA on every
    # linear layer, peft's and TRL's usual choice for causal LMs
    defaults: ClassVar[dict[str, Any]] = {
        "objective": {"name": "dpo", "beta": 0.1},
        "optim": {"lr": 1e-6, "scale_lr": False, "weight_decay": 0.0, "warmup_steps": 0},
        "model": {"lora": {"target_modules": ["all-linear"]}},
    }
    options_class = TextPreferenceOptions

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        cfg = self.cfg  # with the defaults above filled in
        self.objective = get_objective(**cfg.objective)
        # the data first: an objective the rows cannot feed is refused before any model loads
        self.reference_mode = cfg.model.reference
        if self.reference_mode == "auto":
            self.reference_mode = "adapters" if cfg.model.lora else "copy"
        if self.reference_mode == "adapters" and cfg.model.lora is None:
            raise ConfigError(
                "model.reference: 'adapters' needs model.lora (the reference is the model without them)"
            )
        records = read_text_preferences(cfg.data.path, cfg.data.split, cfg.data.ties, cfg.data.on_bad_sample)
        self.skipped_rows = records.skipped
        self._check_objective(records)
        model, self.tokenizer = load_causal_lm(
            cfg.model.pretrained, cfg.model.adapter, cfg.model.trust_remote_code
        )
        if self.options.disable_dropout:
            for module in model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
        self.reference = None
        if self.objective.uses_reference and self.reference_mode == "copy":
            self.reference = copy.deepcopy(model).requires_grad_(False).eval()
        if cfg.model.lora is not None:
            model = self._add_lora(model)
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.model = self.train_model = model
        self.data = TextPreferenceDataset(records, self.tokenizer, self.options.tokenization)

    def _check_objective(self, records: list[TextRecord]) -> None:
        """Raise ``ValueError`` naming what the objective needs when these rows cannot feed it: a
        kind other than pairwise or listwise, K > 2 candidates without rewards to rank them, soft
        labels it cannot use, or an input (rewards) the steps would not have; the steps' own input
        code decides the last."""
        objective, scored, k = self.objective, records[0].rewards is not None, len(records[0].completions)
        if objective.kind not in ("pairwise", "listwise"):
            raise ValueError(
                f"text_preference trains on preference pairs or K candidates; objective '{objective.name}' "
                f"is a {objective.kind} objective and needs {', '.join(objective.required_inputs())}"
            )
        if k > 2 and not scored:
            raise ValueError(
                f"{records[0].where}: K > 2 candidates need rewards to rank them, and the rows have none"
            )
        check_ties(objective, self.cfg.data.ties, scored_data=scored)
        # all-hard labels, the worst case: a batch of wins passes no soft labels at all
        logps = torch.zeros(2, k)
        inputs = self._objective_inputs(
            logps, logps if objective.uses_reference else None, torch.ones(2, k),
            logps if scored else None, torch.ones(2),
        )  # fmt: skip
        hint = (
            f"the rows of {self.cfg.data.path} have no rewards: give chosen_reward and rejected_reward "
            "(or score_chosen and score_rejected) on every row"
        )
        hints = {"chosen_rewards": hint, "rejected_rewards": hint, "rewards": hint}
        check_objective_inputs(objective, inputs, "text_preference", hints)

    def _add_lora(self, model: torch.nn.Module) -> torch.nn.Module:
        from peft import LoraConfig, get_peft_model

        if getattr(model.config, "diffalign_merged_adapter", None):
            # the new adapter trains on base + merged adapter: exports must name that as their base
            model.name_or_path = str(save_starting_point(model, self.tokenizer, self.cfg.output_dir))
        lora = self.cfg.model.lora
        targets = lora.target_modules
        return get_peft_model(model, LoraConfig(
            r=lora.rank, lora_alpha=lora.alpha or lora.rank, task_type="CAUSAL_LM",
            target_modules="all-linear" if targets == ["all-linear"] else targets,
        ))  # fmt: skip

    def trainable_module(self) -> torch.nn.Module:
        return self.model

    def use_prepared(self, module: torch.nn.Module) -> None:
        self.train_model = module

    def setup(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        self.model.to(device)
        if self.reference is not None:
            self.reference.to(device, dtype=weight_dtype)
        if self.objective.uses_reference and self.reference_mode == "precomputed":
            self.data.reference_logps = self._precomputed_reference(device)

    def dataset(self) -> tuple[Dataset, Any]:
        return self.data, self.data.collate

    def step(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        device = next(self.model.parameters()).device
        tokens = _tokens(batch, device)
        k = batch["num_candidates"]
        policy = completion_logps(self.train_model, **tokens)
        reference = None
        if self.objective.uses_reference:
            reference = batch["reference_logps"]
            reference = (
                reference.to(device) if reference is not None else self._reference_logps(tokens).view(-1, k)
            )
        logps, lengths = policy.summed.view(-1, k), policy.lengths.view(-1, k)
        rewards = None if batch["rewards"] is None else batch["rewards"].to(device)
        result = self.objective(**self._objective_inputs(logps, reference, lengths, rewards, batch["labels"]))
        return result.loss, dict(result.metrics)

    def _objective_inputs(
        self,
        logps: torch.Tensor,
        reference: torch.Tensor | None,
        lengths: torch.Tensor,
        rewards: torch.Tensor | None,
        labels: torch.Tensor,
    ) -> dict[str, torch.Tensor | None]:
        """The objective's inputs from per-candidate log-probs, reference log-probs, lengths and
        rewards (B, K) and the rows' labels (B,): all K for a listwise objective with K > 2;
        otherwise a pair (candidate 0 and 1, or the best and worst of K by reward), with its label
        as a soft label when not all 1. Rewards go only to an objective that uses them."""
        used = rewards if self.objective.uses_rewards else None
        k = logps.shape[1]
        if self.objective.kind == "listwise" and k > 2:
            return {"policy_logps": logps, "reference_logps": reference, "rewards": used}
        pick = _chosen_rejected(k, rewards, len(logps), logps.device)
        two = lambda x: None if x is None else x.gather(1, pick)  # noqa: E731
        lp, ref, rw, ln = two(logps), two(reference), two(used), two(lengths)
        return {
            "policy_chosen_logps": lp[:, 0],
            "policy_rejected_logps": lp[:, 1],
            "reference_chosen_logps": None if ref is None else ref[:, 0],
            "reference_rejected_logps": None if ref is None else ref[:, 1],
            "chosen_rewards": None if rw is None else rw[:, 0],
            "rejected_rewards": None if rw is None else rw[:, 1],
            "chosen_lengths": ln[:, 0],
            "rejected_lengths": ln[:, 1],
            "preference_probs": soft_preference_probs(labels, logps.device),
        }

    def _reference_logps(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            if self.reference is not None:
                return completion_logps(self.reference, **tokens).summed
            if self.cfg.model.lora is not None:
                with self.model.disable_adapter():
                    return completion_logps(self.model, **tokens).summed
            # precomputing, before any update: the model is its own reference
            return completion_logps(self.model, **tokens).summed

    def _precomputed_reference(self, device: torch.device) -> torch.Tensor:
        """Reference log-probs of every candidate, computed once (the model before any update, its
        adapters disabled) and cached in the output folder, keyed on the reference's weights and
        the tokens: a model replaced at the same path, or other data, is a new cache entry."""
        from safetensors.torch import load_file, save_file

        # the tokens carry data, template and truncation; the weights (adapters excluded: they are
        # disabled for the reference) carry the model, whatever path it was loaded from
        key = fingerprint(
            module_fingerprint(self.model, skip=("lora_",)),
            rows_fingerprint(self.data.sequences),
            repr(self.options.tokenization),
        )
        path = Path(self.cfg.output_dir) / f"reference_logps-{key}.safetensors"
        if path.is_file():
            return load_file(str(path))["logps"]
        values = []
        self.model.eval()
        for start in range(0, len(self.data), self.options.reference_batch_size):
            stop = min(start + self.options.reference_batch_size, len(self.data))
            batch = self.data.collate([self.data[i] for i in range(start, stop)])
            values.append(self._reference_logps(_tokens(batch, device)).view(stop - start, -1).cpu())
        self.model.train()
        logps = torch.cat(values)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        save_file({"logps": logps}, str(tmp))
        tmp.replace(path)
        return logps

    def dropped_samples(self) -> int:
        return self.skipped_rows

    def state(self) -> dict[str, Stateful]:
        """A stateful objective's state (KLDO's running denominator, each rank's own average)."""
        return {"objective": self.objective} if hasattr(self.objective, "state_dict") else {}

    def export(self, path: Path) -> None:
        """The model (or its LoRA adapter) and the tokenizer, for ``from_pretrained``."""
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)


def save_starting_point(model: torch.nn.Module, tokenizer: Any, output_dir: Path) -> Path:
    """Save the merged starting model once under ``output_dir/starting_point-<weights' fingerprint>``
    (each rank writes its own temporary folder; the first rename wins) and return that folder."""
    folder = Path(output_dir) / f"starting_point-{module_fingerprint(model)}"
    if (folder / "config.json").is_file():
        return folder.resolve()
    tmp = folder.with_name(f"{folder.name}.{os.getpid()}.tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.replace(folder)
    except OSError:  # another rank got there first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder.resolve()


def _tokens(batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
    return {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "completion_mask")}


def _chosen_rejected(k: int, rewards: torch.Tensor | None, rows: int, device: torch.device) -> torch.Tensor:
    """Indices (B, 2) of the candidates a pairwise objective compares."""
    if k == 2:
        return torch.tensor([[0, 1]], device=device).expand(rows, 2)
    return torch.stack([rewards.argmax(1), rewards.argmin(1)], dim=1)
