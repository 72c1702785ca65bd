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

Options a TRL ``DPOConfig`` user knows (``method_options``, names as TRL's; a TRL ``loss_type``
list is the ``combined`` objective):

- ``ld_alpha`` (LD-DPO): each pair's log-likelihoods, policy's and reference's, sum its first
  ``min(|y_w|, |y_l|)`` tokens plus ``ld_alpha`` times the rest (``desensitised_logps``);
- ``use_weighting`` (WPO): the loss is ``mean(w_w w_l L)`` with each candidate's weight the
  geometric mean of ``p(y_t) / sum_v p_v^2`` under the policy, without gradient (``wpo_weights``);
- ``sync_ref_model`` (TR-DPO): after every ``ref_model_sync_steps``-th optimiser step the
  reference becomes ``alpha * policy + (1 - alpha) * reference`` (``ref_model_mixup_alpha``; 1 is
  a hard copy), as TRL's ``SyncRefModelCallback``. It needs a live frozen copy, kept in the
  policy's dtype and saved with each checkpoint (a resumed run goes on with the same reference).

Limits, as TRL's: TR-DPO is refused with ``model.reference: precomputed`` (the cached log-probs
would be stale after the first sync) and with ``model.lora`` (the reference is the base model
without adapters: there are no reference weights to move towards base + adapters); WPO is refused
with ``aot`` / ``aot_unpaired`` (they sort the batch: per-pair weights would land on other pairs).
``ld_alpha`` and ``use_weighting`` pair the candidates, so a listwise objective on K > 2
candidates refuses them. Unlike TRL, ``sft`` inside ``combined`` sees the length-desensitised
chosen log-likelihood when ``ld_alpha`` is set (TRL's uses the raw tokens).

Metrics as TRL names them: ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
``rewards/accuracies``, ``logps/chosen``, ``logps/rejected`` (and ``wpo/weight``).
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
from diffalign.text.logps import (
    CompletionLogps,
    Tokenization,
    completion_logps,
    desensitised_logps,
    wpo_weights,
)
from diffalign.training.config import TrainConfig
from diffalign.training.loop import Method, Stateful

__all__ = ["CausalLMMethod", "TextPreference", "TextPreferenceOptions", "add_lora", "disable_dropout"]


@dataclass
class TextPreferenceOptions:
    tokenization: Tokenization = field(default_factory=Tokenization)
    disable_dropout: bool = True  # as TRL: dropout would make policy and reference disagree at step 0
    reference_batch_size: int = 16
    # TRL DPOConfig's options of the same names and defaults (trl/trainer/dpo_config.py)
    ld_alpha: float | None = field(
        default=None,
        metadata={"help": "LD-DPO: weight of the tokens beyond the shorter candidate's length (None: 1)"},
    )
    use_weighting: bool = field(
        default=False, metadata={"help": "WPO: weigh each pair by its candidates' policy probabilities"}
    )
    sync_ref_model: bool = field(
        default=False, metadata={"help": "TR-DPO: move the reference towards the policy during training"}
    )
    ref_model_mixup_alpha: float = field(
        default=0.6, metadata={"help": "TR-DPO: reference = alpha policy + (1 - alpha) reference; 1: copy"}
    )
    ref_model_sync_steps: int = field(
        default=512, metadata={"help": "TR-DPO: optimiser steps between reference syncs"}
    )

    ranges: ClassVar[dict[str, Range]] = {
        "reference_batch_size": AT_LEAST_ONE,
        "ld_alpha": Range(0, 1),
        "ref_model_mixup_alpha": Range(0, 1, low_open=True),
        "ref_model_sync_steps": AT_LEAST_ONE,
    }

    def __post_init__(self) -> None:
        check_ranges(self)


class CausalLMMethod(Method):
    """What the text recipes share once they have built ``model`` (the policy; ``train_model`` is
    it as the loop prepared it), ``tokenizer``, ``data`` (a dataset with ``collate``) and
    ``skipped_rows`` (rows dropped when read)."""

    model: torch.nn.Module
    train_model: torch.nn.Module
    tokenizer: Any
    data: Any
    skipped_rows: int

    def set_policy(self, model: torch.nn.Module) -> None:
        """``model``, with ``model.lora`` adapters and gradient checkpointing as configured, is
        the policy (``self.model``)."""
        if self.cfg.model.lora is not None:
            model = add_lora(model, self.tokenizer, self.cfg)
        if self.cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.model = self.train_model = model

    def trainable_module(self) -> torch.nn.Module:
        return self.model

    def use_prepared(self, module: torch.nn.Module) -> None:
        self.train_model = module

    def dataset(self) -> tuple[Dataset, Any]:
        return self.data, self.data.collate

    def dropped_samples(self) -> int:
        return self.skipped_rows

    def export(self, path: Path) -> None:
        """The model (or its LoRA adapter) and the tokenizer, for ``from_pretrained``."""
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)


class TextPreference(CausalLMMethod):
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
            disable_dropout(model)
        self.reference = None
        if self.objective.uses_reference and self.reference_mode == "copy":
            self.reference = copy.deepcopy(model).requires_grad_(False).eval()
        self.set_policy(model)
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
        self._check_options(k)
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

    def _check_options(self, k: int) -> None:
        """Raise ``ValueError`` naming the option when ``ld_alpha``, ``use_weighting`` or
        ``sync_ref_model`` cannot apply to this objective, data or reference."""
        options, objective = self.options, self.objective
        listwise = objective.kind == "listwise" and k > 2
        for name in ("ld_alpha", "use_weighting"):
            if getattr(options, name) not in (None, False) and listwise:
                raise ValueError(
                    f"text_preference: method_options.{name} acts on a chosen and a rejected candidate; "
                    f"listwise objective '{objective.name}' takes all {k} candidates of each row"
                )
        if options.use_weighting and getattr(objective, "sorts_batch", False):
            raise ValueError(
                f"text_preference: method_options.use_weighting (WPO) with objective '{objective.name}', "
                "which sorts the batch: per-pair weights would land on other pairs (TRL refuses it too)"
            )
        if not options.sync_ref_model:
            return
        if not objective.uses_reference:
            raise ValueError(
                f"text_preference: method_options.sync_ref_model, but objective '{objective.name}' uses no "
                "reference model"
            )
        if self.reference_mode != "copy":
            why = {
                "precomputed": "its log-probs are computed once, and would be stale after the first sync",
                "adapters": "it is the model with its LoRA adapters disabled: no reference weights of its "
                "own to move towards base + adapters (TRL refuses PEFT too); train without model.lora",
            }[self.reference_mode]
            raise ValueError(
                f"text_preference: method_options.sync_ref_model (TR-DPO) needs model.reference: copy, a "
                f"frozen copy it can update; with model.reference: {self.reference_mode} {why}"
            )
        if self.cfg.model.lora is not None:
            raise ValueError(
                "text_preference: method_options.sync_ref_model with model.lora: the reference copy is "
                "the base model, which has no adapters to take the policy's (TRL refuses PEFT too); "
                "train without model.lora"
            )

    def setup(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        self.model.to(device)
        if self.reference is not None:
            # a synced reference averages the policy's weights: kept in their dtype, not rounded
            self.reference.to(device, dtype=None if self.options.sync_ref_model else weight_dtype)
        if self.objective.uses_reference and self.reference_mode == "precomputed":
            self.data.reference_logps = self._precomputed_reference(device)

    def step(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        device = next(self.model.parameters()).device
        k = batch["num_candidates"]
        rewards = None if batch["rewards"] is None else batch["rewards"].to(device)
        policy = completion_logps(
            self.train_model, **_tokens(batch, device), sum_sq_probs=self.options.use_weighting
        )
        reference = None
        if self.objective.uses_reference:
            reference = batch["reference_logps"]
            reference = (
                reference.to(device) if reference is not None else self._reference_logps(batch, device)
            )
        logps, lengths = self._sequence_logps(policy, rewards, k), policy.lengths.view(-1, k)
        result = self.objective(**self._objective_inputs(logps, reference, lengths, rewards, batch["labels"]))
        if not self.options.use_weighting:
            return result.loss, dict(result.metrics)
        # WPO as TRL: mean(w_w w_l L), not normalised by the weights' sum
        pick = _chosen_rejected(k, rewards, len(logps), device)
        weights = wpo_weights(policy).view(-1, k).gather(1, pick).prod(1)
        return (result.losses * weights).mean(), {**result.metrics, "wpo/weight": float(weights.mean())}

    def _sequence_logps(self, scored: CompletionLogps, rewards: torch.Tensor | None, k: int) -> torch.Tensor:
        """Each candidate's log-likelihood (B, K): the summed token log-probs, or with ``ld_alpha``
        LD-DPO's, each candidate of the compared pair cut at the shorter one's length."""
        if self.options.ld_alpha is None:
            return scored.summed.view(-1, k)
        lengths = scored.lengths.view(-1, k)
        pick = _chosen_rejected(k, rewards, len(lengths), lengths.device)
        shorter = lengths.gather(1, pick).amin(1, keepdim=True).expand(-1, 2)
        shared = lengths.scatter(1, pick, shorter)  # candidates outside the pair keep all tokens
        return desensitised_logps(scored, shared.reshape(-1), self.options.ld_alpha).view(-1, k)

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
            return {"policy_logps": logps, "reference_logps": reference, "rewards": used, "lengths": lengths}
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

    def _reference_logps(self, batch: dict, device: torch.device) -> torch.Tensor:
        """The reference's log-likelihoods (B, K) of a batch's candidates, as the policy's are taken."""
        tokens, k = _tokens(batch, device), batch["num_candidates"]
        rewards = None if batch["rewards"] is None else batch["rewards"].to(device)
        with torch.no_grad():
            if self.reference is not None:
                scored = completion_logps(self.reference, **tokens)
            elif self.cfg.model.lora is not None:
                with self.model.disable_adapter():
                    scored = completion_logps(self.model, **tokens)
            else:  # precomputing, before any update: the model is its own reference
                scored = completion_logps(self.model, **tokens)
        return self._sequence_logps(scored, rewards, k)

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
            *(() if self.options.ld_alpha is None else (f"ld_alpha={self.options.ld_alpha}",)),
        )
        path = Path(self.cfg.output_dir) / f"reference_logps-{key}.safetensors"
        if path.is_file():
            return load_file(str(path))["logps"]
        values = []
        self.model.eval()
        for start in range(0, len(self.data), self.options.reference_batch_size):
            stop = min(start + self.options.reference_batch_size, len(self.data))
            batch = self.data.collate([self.data[i] for i in range(start, stop)])
            values.append(self._reference_logps(batch, device).cpu())
        self.model.train()
        logps = torch.cat(values)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        save_file({"logps": logps}, str(tmp))
        tmp.replace(path)
        return logps

    def state(self) -> dict[str, Stateful]:
        """A stateful objective's state (KLDO's running denominator, each rank's own average) and,
        with TR-DPO, the synced reference's weights."""
        states: dict[str, Stateful] = {}
        if hasattr(self.objective, "state_dict"):
            states["objective"] = self.objective
        if self.options.sync_ref_model:
            states["reference"] = self.reference
        return states

    def on_optimizer_step(self, step: int) -> None:
        """TR-DPO: sync the reference after every ``ref_model_sync_steps``-th optimiser step."""
        if self.options.sync_ref_model and step % self.options.ref_model_sync_steps == 0:
            sync_reference(self.model, self.reference, self.options.ref_model_mixup_alpha)


def sync_reference(policy: torch.nn.Module, reference: torch.nn.Module, alpha: float) -> None:
    """``reference <- alpha * policy + (1 - alpha) * reference``, parameter by parameter, in place
    (TR-DPO, Gorbatovski et al. 2024, arXiv 2404.09656: soft update, or hard with alpha = 1; TRL 1.16
    ``trl/trainer/callbacks.py``, ``SyncRefModelCallback._sync_target_model``, whose arithmetic
    this is: alpha = 1 gives the policy's values exactly)."""
    with torch.no_grad():
        for target, source in zip(reference.parameters(), policy.parameters(), strict=True):
            target.mul_(1.0 - alpha).add_(source.to(target.dtype), alpha=alpha)


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability of ``model`` to 0 (as TRL's ``disable_dropout``)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def add_lora(model: torch.nn.Module, tokenizer: Any, cfg: TrainConfig) -> torch.nn.Module:
    """``model`` with ``cfg.model.lora`` adapters (peft, task CAUSAL_LM); a model with a merged SFT
    adapter is first saved as the starting point its exports name as their base. Shared by the
    text recipes."""
    from peft import LoraConfig, get_peft_model

    if getattr(model.config, "diffalign_merged_adapter", None):
        # the new adapter trains on base + merged adapter: exports must name that as their base
        model.name_or_path = str(save_starting_point(model, tokenizer, cfg.output_dir))
    lora = cfg.model.lora
    targets = lora.target_modules
    return get_peft_model(model, LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha or lora.rank, task_type="CAUSAL_LM",
        target_modules="all-linear" if targets == ["all-linear"] else targets,
    ))  # fmt: skip


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
