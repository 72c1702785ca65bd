"""Diffusion-DPO (Wallace et al. 2023): DPO on the denoising-error likelihood proxy.

Algorithm (the paper's Eq. 14; the official code's reductions), per batch of pairs (c, x_w, x_l):

1. encode x_w and x_l to latents; encode c, replaced by "" with probability ``caption_dropout``;
2. draw one timestep t and one noise eps per pair, shared by x_w and x_l and by policy and
   reference (``denoising_logp``), and run the policy UNet once over [x_w; x_l];
3. ``logp = -0.5 * MSE`` for the policy and, under no-grad, for the reference (a frozen copy
   for full fine-tuning, the same UNet with adapters disabled for LoRA);
4. ``loss = objective(logp_w, logp_l, ref_w, ref_l)``: ``dpo`` at beta 5000 is exactly
   ``-log sigma(-0.5 beta ((mse_w - mse_l) - (ref_w - ref_l)))``; any registered pairwise
   objective (``ipo``, ``simpo``, ``kldo``, ...) works unchanged, and the listwise ``nca`` /
   ``infonca`` take the pair as K = 2 candidates (their targets: the scores, else the label).

Reward scores of the pairs (``method_options.score_prefix``: the columns ``scripts/score_dataset.py``
wrote; or JSONL ``chosen_reward`` / ``rejected_reward``) reach the objectives that use them:
``mappo`` and ``madpo`` (which need them), ``smoothed_dpo`` (SmPO's soft labels; it needs them:
the hard labels of pairs are no soft labels), ``nca`` / ``infonca`` (their targets).

The objective is checked against the data when the method is built, before any model loads: an
objective that is not pairwise or listwise, one that needs scores the data does not have, or
``ipo`` with ``length_normalized`` (diffusion has no lengths: ``denoising_logp`` is already a
per-element mean, so plain ``ipo`` is the per-unit form) is a ``ValueError`` naming what it needs.

``sft: true`` trains the plain denoising loss on the chosen images instead (the paper's SFT
baseline). Ties kept with ``data.ties=half`` carry the soft label 1/2 into the objective (see
``diffalign.objectives.pairwise``), and into the SFT loss as equal weights on both images.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch.utils.data import Dataset

from diffalign.config import AT_LEAST_ONE, Range, check_ranges
from diffalign.data.pairs import PreferencePairDataset, collate_pairs
from diffalign.data.preference import PairRecord, read_preference_pairs
from diffalign.diffusion.likelihood import DenoisingLogp, denoising_logp
from diffalign.diffusion.policy import UNET_ATTENTION_PROJECTIONS, Conditioning
from diffalign.methods.unet_method import UNetMethod
from diffalign.objectives import (
    check_objective_inputs,
    check_ties,
    soft_preference_probs,
)
from diffalign.rng import Generators
from diffalign.training.config import TrainConfig
from diffalign.training.loop import Stateful, row_generators


@dataclass
class DiffusionDPOOptions:
    sft: bool = field(
        default=False, metadata={"help": "train the denoising loss on the chosen images (SFT baseline)"}
    )
    timestep_weighting: Literal["constant", "min_snr"] = field(
        default="constant", metadata={"help": "weight of each timestep's error (constant: the paper's)"}
    )
    validation_guidance: float = field(default=5.0, metadata={"help": "guidance scale of validation grids"})
    score_prefix: str | None = field(
        default=None,
        metadata={
            "help": "read reward scores from the columns scripts/score_dataset.py wrote with this "
            "column_prefix (<prefix>_0/<prefix>_1 beside jpg_0/jpg_1, <prefix>_chosen/<prefix>_rejected "
            "in pair rows); unset: JSONL pairs' optional chosen_reward/rejected_reward"
        },
    )

    ranges: ClassVar[dict[str, Range]] = {"validation_guidance": AT_LEAST_ONE}

    def __post_init__(self) -> None:
        check_ranges(self)


_SCORES_HINT = (
    "the pairs have no reward scores: score them with scripts/score_dataset.py and set "
    "method_options.score_prefix to its column_prefix, or give chosen_reward and rejected_reward "
    "on every JSONL row"
)
# what to give or change, by the objective input an error names (see `check_objective_inputs`)
_INPUT_HINTS = {
    "chosen_rewards": _SCORES_HINT,
    "rejected_rewards": _SCORES_HINT,
    "chosen_lengths": "diffusion_dpo has no candidate lengths: denoising_logp is already a per-element "
    "mean, so the objective without length_normalized is the per-unit form",
}


class DiffusionDPO(UNetMethod):
    # the official SD1.5 script's (train.py; launchers/sd15.sh): beta 5000, lr 1e-8 per sample
    # scaled by the batch, 500 warmup steps, 20% empty prompts, center crop with flips at 512
    defaults: ClassVar[dict[str, Any]] = {
        "objective": {"name": "dpo", "beta": 5000.0},
        "optim": {"lr": 1e-8, "scale_lr": True, "weight_decay": 1e-2, "warmup_steps": 500},
        "data": {"resolution": 512, "random_crop": False, "hflip": True, "caption_dropout": 0.2},
        "model": {"lora": {"target_modules": list(UNET_ATTENTION_PROJECTIONS)}},
    }

    options_class: ClassVar[type] = DiffusionDPOOptions

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        # the data first: an objective the pairs cannot feed is refused before any model loads
        self.records = self.preference_pairs()
        if not self.options.sft:  # the SFT baseline weighs ties itself and never calls the objective
            self._check_objective()
        self.policy = self.load_policy(reference=self.objective.uses_reference and not self.options.sft)
        self._dataset: PreferencePairDataset | None = None

    def preference_pairs(self) -> list[PairRecord]:
        """The pairs to train on, with their scores when the data has them.

        Raises:
            ValueError: no pairs (naming ``data.path``), or a bad row (naming it; with
                ``data.on_bad_sample=skip`` such rows are dropped and counted in ``dropped_samples``).
        """
        d = self.cfg.data
        records = read_preference_pairs(
            d.path, ties=d.ties, split=d.split, score_prefix=self.options.score_prefix,
            on_bad_sample=d.on_bad_sample,
        )  # fmt: skip
        self.skipped_rows = records.skipped
        if not records:
            raise ValueError(f"{d.path}: no preference pairs to train on (data.ties={d.ties})")
        return records

    def _check_objective(self) -> None:
        """Raise ``ValueError`` naming what the objective needs when these pairs cannot feed it: a
        kind other than pairwise or listwise, soft labels it cannot use, or an input (reward
        scores, lengths) the steps would not have; the steps' own input code decides the last."""
        objective, scored = self.objective, self.records[0].rewards is not None
        if objective.kind not in ("pairwise", "listwise"):
            raise ValueError(
                f"{self.cfg.method} trains on preference pairs; objective '{objective.name}' is a "
                f"{objective.kind} objective and needs {', '.join(objective.required_inputs())}"
            )
        check_ties(objective, self.cfg.data.ties, scored_data=scored)
        # all-hard labels, the worst case: a batch of wins passes no soft labels at all
        scores = torch.zeros(2) if scored else None
        batch = {"labels": torch.ones(2), "chosen_rewards": scores, "rejected_rewards": scores}
        logps = torch.zeros(2, 2)
        inputs = self._objective_inputs(logps, logps if objective.uses_reference else None, batch)
        check_objective_inputs(objective, inputs, self.cfg.method, _INPUT_HINTS)

    def dataset(self) -> tuple[Dataset, Any]:
        d = self.cfg.data
        self._dataset = PreferencePairDataset(
            self.records, d.resolution, d.random_crop, d.hflip, d.on_bad_sample, seed=self.cfg.seed
        )
        return self._dataset, collate_pairs

    def dropped_samples(self) -> int:
        return self.skipped_rows + (self._dataset.skipped if self._dataset is not None else 0)

    def state(self) -> dict[str, Stateful]:
        """A stateful objective's state (KLDO's running denominator), kept by checkpoints."""
        return {"objective": self.objective} if hasattr(self.objective, "state_dict") else {}

    def step(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        policy = self.policy
        streams = row_generators(batch, len(batch["prompts"]))
        images = torch.cat([batch["chosen"], batch["rejected"]])
        with torch.no_grad():
            latents = torch.stack(
                policy.encode_images(images, streams and streams + streams).chunk(2), dim=1
            )  # (B, 2, C, h, w): chosen first
        size = tuple(images.shape[-2:])
        cond = policy.encode_prompts(
            batch["prompts"], dropout=self.cfg.data.caption_dropout, generator=streams, image_size=size
        )
        if self.options.sft:
            return self._sft_step(latents, cond, batch["labels"].to(latents.device), streams)
        out = self.denoising_logps(latents, cond, batch, streams)
        result = self.objective(**self._objective_inputs(out.policy, out.reference, batch))
        metrics = dict(result.metrics)
        mse = out.policy_mse.detach()
        metrics.update(
            {"mse/policy_chosen": float(mse[:, 0].mean()), "mse/policy_rejected": float(mse[:, 1].mean())}
        )
        if out.reference_mse is not None:
            metrics["mse/reference_chosen"] = float(out.reference_mse[:, 0].mean())
            metrics["mse/reference_rejected"] = float(out.reference_mse[:, 1].mean())
        return result.loss, metrics

    def denoising_logps(
        self, latents: torch.Tensor, cond: Conditioning, batch: dict, streams: Generators = None
    ) -> DenoisingLogp:
        """Policy and reference log-likelihood proxies of the pairs' latents (B, 2, C, h, w) (``batch``:
        the images they encode): one forward-noised timestep and noise per pair (the paper's Eq. 14),
        drawn from ``streams`` (the pairs' own generators, or None: torch's global one)."""
        return denoising_logp(
            self.policy,
            latents,
            cond,
            with_reference=self.objective.uses_reference,
            generator=streams,
            weighting=self.options.timestep_weighting,
        )

    def _objective_inputs(
        self, policy: torch.Tensor, reference: torch.Tensor | None, batch: dict
    ) -> dict[str, torch.Tensor | None]:
        """The objective's inputs from log-likelihoods (B, 2) (chosen first) and a batch's labels and
        scores: the scores only for an objective that uses them, the labels only when not all 1."""
        device = policy.device
        scored = self.objective.uses_rewards and batch["chosen_rewards"] is not None
        return {
            "policy_chosen_logps": policy[:, 0],
            "policy_rejected_logps": policy[:, 1],
            "reference_chosen_logps": None if reference is None else reference[:, 0],
            "reference_rejected_logps": None if reference is None else reference[:, 1],
            "chosen_rewards": batch["chosen_rewards"].to(device) if scored else None,
            "rejected_rewards": batch["rejected_rewards"].to(device) if scored else None,
            "preference_probs": soft_preference_probs(batch["labels"], device),
        }

    def _sft_step(
        self, latents: torch.Tensor, cond: Conditioning, labels: torch.Tensor, streams: Generators
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The denoising loss on the preferred image; with ties kept, on both images weighted by
        the label (p, 1 - p), so that a tie teaches both halves equally."""
        keep = 2 if self.cfg.data.ties == "half" else 1
        out = denoising_logp(
            self.policy, latents[:, :keep], cond, with_reference=False, generator=streams,
            weighting=self.options.timestep_weighting,
        )  # fmt: skip
        weights = torch.stack([labels, 1 - labels], dim=1)[:, :keep]
        loss = (weights * out.policy_mse).sum(1).mean()
        return loss, {"mse/policy_chosen": float(out.policy_mse[:, 0].detach().mean())}
