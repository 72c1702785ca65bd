"""Intuitive Fine-Tuning (Hua et al. 2024, arXiv 2405.11870): SFT data, one policy, no reference,
no pairs. The loss pieces are in :mod:`diffalign.objectives.ift`; this recipe runs the two
forwards of the official ``ift`` branch of ``get_batch_metrics`` (src/trainers.py,
TsinghuaC3I/Intuitive-Fine-Tuning 03adb93). Per batch of (prompt, answer) rows:

1. pass A, no grad: teacher-forced logits on the ground truth, fed as embeddings from ``E``, a
   frozen copy of the input-embedding table taken when the recipe is built (trainers.py:257-263);
2. ``yhat_t = argmax logits_{t-1}`` (greedy, shifted by one), replacing the ground truth on
   answer positions only (prompt and padding keep their tokens);
3. pass B, with grad, on ``(1 - lambda) E[y*] + lambda E[yhat]``: log-probs of the ground-truth
   answer tokens;
4. the relation-propagation weights (``gamma``) and the loss ``mean (1/T) sum -l_t w_t``.

lambda = gamma = 0 is SFT (per-token mean NLL of the answer). Limits, as the official code: the
model's own input-embedding table is never used, so it never trains (with tied input and output
embeddings, only through the output head); both passes run in train mode (dropout, if enabled,
differs between them); lambda is static (the code's linear schedule and noise are not
implemented); the predicted token is the argmax (the paper's "pi_theta(s*_{i-1})" may mean an
expected embedding under the predicted distribution: UNVERIFIED, not offered). Cost: one extra
no-grad forward per step.

Metrics: ``loss/sft`` (the teacher-forced per-token NLL of pass A), ``loss/further`` (pass B's
unweighted NLL), ``ift/weights_max`` (the largest propagation weight).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from diffalign.config import UNIT, ConfigError, Range, check_ranges
from diffalign.methods.text_preference import CausalLMMethod, disable_dropout
from diffalign.objectives.ift import ift_loss, ift_mix_embeddings, ift_relation_weights
from diffalign.text.dataset import TextPreferenceDataset
from diffalign.text.loading import load_causal_lm
from diffalign.text.logps import Tokenization, next_token_logps
from diffalign.text.sft_data import read_sft_rows
from diffalign.training.config import TrainConfig

__all__ = ["IFT", "IFTOptions"]


@dataclass
class IFTOptions:
    lam: float = field(default=0.2, metadata={"help": "temporal-residual weight lambda (official 0.2)"})
    gamma: float = field(default=0.95, metadata={"help": "relation-propagation discount (official 0.95)"})
    propagation_norm: Literal["L1", "L2", "softmax", "log"] = field(
        default="L1", metadata={"help": "sharpening of the weights before renormalising (official L1)"}
    )
    tokenization: Tokenization = field(default_factory=Tokenization)
    disable_dropout: bool = True  # the two passes then see the same network

    ranges: ClassVar[dict[str, Range]] = {"lam": UNIT, "gamma": UNIT}

    def __post_init__(self) -> None:
        check_ranges(self)


class IFT(CausalLMMethod):
    # official: lr 5e-7 with RMSprop, cosine, warmup ratio 0.15 (commands/run_*_ift.sh); diffalign has
    # no RMSprop, so AdamW; the author says 5e-7 was forced by compute (issue #2)
    defaults: ClassVar[dict[str, Any]] = {
        "optim": {"lr": 5e-7, "scale_lr": False, "weight_decay": 0.0, "warmup_steps": 0},
        "model": {"lora": {"target_modules": ["all-linear"]}},
    }
    options_class = IFTOptions

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        cfg = self.cfg
        if cfg.objective is not None:
            raise ConfigError(
                "objective: ift has no objective setting; its lambda and gamma are method_options.lam "
                "and method_options.gamma"
            )
        if cfg.model.reference != "auto":
            raise ConfigError("model.reference: ift uses no reference model; leave it unset")
        records = read_sft_rows(cfg.data.path, cfg.data.split, cfg.data.on_bad_sample)
        self.skipped_rows = records.skipped
        model, self.tokenizer = load_causal_lm(
            cfg.model.pretrained, cfg.model.adapter, cfg.model.trust_remote_code
        )
        if self.options.disable_dropout:
            disable_dropout(model)
        # E of the paper's mixing, frozen before any update (official trainers.py:257-263); a resumed
        # run rebuilds it from the same starting weights, so checkpoints need not keep it
        self.embeddings = copy.deepcopy(model.get_input_embeddings()).requires_grad_(False)
        self.set_policy(model)
        self.data = TextPreferenceDataset(records, self.tokenizer, self.options.tokenization)

    def setup(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        self.model.to(device)
        self.embeddings.to(device)

    def step(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        device = next(self.model.parameters()).device
        ids, attention, answer = (
            batch[k].to(device) for k in ("input_ids", "attention_mask", "completion_mask")
        )
        position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
        truth = self.embeddings(ids)
        with torch.no_grad():
            logits = self._forward(truth, attention, position_ids)
            teacher_forced = next_token_logps(logits, ids)
        # the prediction for position t comes from position t - 1; the first token has none
        predicted = torch.cat([ids[:, :1], logits[:, :-1].argmax(-1)], dim=1)
        mixed = torch.where(
            answer[..., None], ift_mix_embeddings(truth, self.embeddings(predicted), self.options.lam), truth
        )
        if self.cfg.model.gradient_checkpointing:
            # reentrant checkpointing passes gradients only to blocks whose inputs need one, and the
            # frozen table's output does not (the model's own input hook never sees it)
            mixed.requires_grad_(True)
        token_logps = next_token_logps(self._forward(mixed, attention, position_ids), ids)
        mask = answer[:, 1:]
        weights = ift_relation_weights(token_logps, mask, self.options.gamma, self.options.propagation_norm)
        loss = ift_loss(token_logps, mask, weights).mean()
        count = mask.sum(-1)
        metrics = torch.stack([
            (-(teacher_forced * mask).sum(-1) / count).mean(),
            (-(token_logps.detach() * mask).sum(-1) / count).mean(),
            weights.detach().max(),
        ]).tolist()  # fmt: skip
        return loss, dict(zip(("loss/sft", "loss/further", "ift/weights_max"), metrics, strict=True))

    def _forward(
        self, embeds: torch.Tensor, attention: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        return self.train_model(
            inputs_embeds=embeds, attention_mask=attention, position_ids=position_ids
        ).logits
