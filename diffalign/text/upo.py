"""UPO's uncertainty filter (Wang et al. 2024, arXiv 2409.11212, AAAI 2025; code
wjn1996/Uncertainty-Preference-Optimization 29a1c21): which self-generated pairs to trust.

For each pair (prompt, chosen, rejected), ordered by the reward:

1. the estimator's P(chosen preferred) from ``mc_passes`` forward passes with dropout on
   (the paper's T = 10, main.py:332): :func:`mc_dropout_preference_probs`;
2. BALD of those passes, :func:`diffalign.acquisition.binary_bald` (the paper's ``B_j``);
3. pairs whose majority vote disagrees with the reward's order are dropped (main.py:337-345);
4. of the rest, ``keep_fraction`` are drawn without replacement with probability
   ``(1 - B_j)^mu`` normalised (:func:`upo_sampling_weights`; the paper's ``P_j``, ``mu`` read as an
   exponent, UNVERIFIED) for ``"easy"`` pairs, or ``B_j`` for ``"hard"`` ones (main.py:233, sampler.py).

The estimator (our choice, documented because the paper's is not ours): the paper's is a
classifier head on the policy's backbone trained on the labeled pairs; here it is the implicit
reward of a causal LM trained with DPO on the labeled pairs, ``P = sigma(beta (rho(y_w) -
rho(y_l)))``, ``rho = log pi_est - log pi_est_ref`` (Rafailov et al. 2023 §5: a DPO model is a
Bradley-Terry classifier), symmetric in the order of the pair, so UPO's position bias does not
arise. Its stochasticity: attention dropout at ``dropout`` in the estimator's passes (the official
code uses LoRA dropout 0.1; the tiny Llama's attention dropout is configurable, its layers have no
other dropout); the reference is scored once, without dropout. The estimator must not be the
round's own starting policy against itself: that implicit reward is 0 plus dropout noise, and
its BALD measures only the noise.

:func:`bald_label_smoothing` turns BALD into ``cdpo``'s per-pair flip rate ``a_j = a_max B_j /
max B`` (SUGGESTION of SEED-METHODS §4.4; the paper's printed ``1/(P_j + 1)`` is about 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from diffalign.acquisition import binary_bald
from diffalign.config import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, Range, check_ranges
from diffalign.text.logps import Tokenization, candidate_logps

__all__ = [
    "UPOSettings",
    "bald_label_smoothing",
    "mc_dropout_preference_probs",
    "select_pairs",
    "set_attention_dropout",
    "upo_filter",
    "upo_sampling_weights",
]


@dataclass
class UPOSettings:
    estimator: str = field(metadata={"help": "causal LM trained with DPO on labeled pairs (the estimator)"})
    estimator_reference: str = field(metadata={"help": "the estimator's DPO reference (its starting model)"})
    beta: float = field(default=0.1, metadata={"help": "the estimator's DPO beta"})
    mc_passes: int = field(default=10, metadata={"help": "MC-dropout passes T (paper: 10)"})
    dropout: float = field(default=0.1, metadata={"help": "attention dropout in the passes (code: 0.1)"})
    drop_disagreeing: bool = field(default=True, metadata={"help": "drop pairs the majority vote reverses"})
    keep_fraction: float = field(default=0.5, metadata={"help": "fraction drawn of the rest (code: 0.5)"})
    hardness: Literal["easy", "hard"] = field(default="easy", metadata={"help": "draw by 1 - BALD or BALD"})
    mu: float = field(default=1.0, metadata={"help": "exponent of (1 - BALD) in the easy weights"})

    ranges: ClassVar[dict[str, Range]] = {
        "beta": POSITIVE, "mc_passes": AT_LEAST_ONE, "dropout": Range(0, 1, low_open=True, high_open=True),
        "keep_fraction": Range(0, 1, low_open=True), "mu": NON_NEGATIVE,
    }  # fmt: skip

    def __post_init__(self) -> None:
        check_ranges(self)


def set_attention_dropout(model: torch.nn.Module, p: float) -> int:
    """Set the attention dropout of every attention module that has one (transformers' Llama,
    Mistral, Qwen2 ... read ``attention_dropout`` at each forward); return how many.

    Raises:
        ValueError: the model has no ``attention_dropout`` anywhere (MC dropout would be deterministic).
    """
    modules = [m for m in model.modules() if isinstance(getattr(m, "attention_dropout", None), float)]
    if not modules:
        raise ValueError(f"{type(model).__name__} has no attention_dropout to turn on for MC dropout")
    for m in modules:
        m.attention_dropout = p
    return len(modules)


def mc_dropout_preference_probs(
    estimator: Any,
    reference: Any,
    tokenizer: Any,
    rows: list[dict],
    passes: int,
    beta: float,
    dropout: float,
    seed: int = 0,
    tokenization: Tokenization | None = None,
) -> Tensor:
    """(passes, N) P(chosen preferred) of N ``rows`` (prompt, chosen, rejected):
    ``sigma(beta (rho_t(chosen) - rho_t(rejected)))``, ``rho_t = log pi_est - log pi_ref`` with the
    estimator's attention dropout at ``dropout`` in pass t (module docstring). The estimator's
    dropout and mode are restored afterwards."""
    reference.eval()
    with torch.no_grad():
        ref = torch.stack([
            candidate_logps(reference, tokenizer, r["prompt"], [r["chosen"], r["rejected"]], tokenization)
            for r in rows
        ])  # fmt: skip
    saved = {m: m.attention_dropout for m in estimator.modules() if hasattr(m, "attention_dropout")}
    set_attention_dropout(estimator, dropout)
    estimator.train()
    torch.manual_seed(seed)
    try:
        with torch.no_grad():
            logps = torch.stack([
                torch.stack([candidate_logps(estimator, tokenizer, r["prompt"], [r["chosen"], r["rejected"]],
                                             tokenization) for r in rows])
                for _ in range(passes)
            ])  # fmt: skip
    finally:
        for m, p in saved.items():
            m.attention_dropout = p
        estimator.eval()
    rho = logps - ref  # (T, N, 2)
    return torch.sigmoid(beta * (rho[..., 0] - rho[..., 1]))


def upo_sampling_weights(bald: Tensor, mu: float = 1.0) -> Tensor:
    """UPO's ``P_j = (1 - B_j)^mu / sum_k (1 - B_k)^mu`` (N,) for BALD ``bald`` (N,) in nats.

    Raises:
        ValueError: ``bald`` not 1-D and non-empty, outside [0, log 2], or every weight 0.
    """
    if bald.dim() != 1 or bald.numel() == 0:
        raise ValueError(f"bald must be a non-empty (N,) tensor, got shape {tuple(bald.shape)}")
    if not bool(((bald >= 0) & (bald <= torch.log(torch.tensor(2.0)) + 1e-9)).all()):
        raise ValueError("bald must lie in [0, log 2] (binary BALD in nats)")
    w = (1 - bald.double()) ** mu
    if not bool(w.sum() > 0):
        raise ValueError("every (1 - bald)^mu is 0: nothing to weigh")
    return w / w.sum()


def select_pairs(
    bald: Tensor,
    fraction: float,
    hardness: Literal["easy", "hard"] = "easy",
    mu: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Indices of ``ceil(fraction N)`` pairs drawn without replacement, with probability
    :func:`upo_sampling_weights` (``"easy"``) or proportional to BALD (``"hard"``; uniform when
    every BALD is 0), as the official sampler.py."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    weights = upo_sampling_weights(bald, mu) if hardness == "easy" else bald.double().clamp_min(0)
    if not bool(weights.sum() > 0):
        weights = torch.ones_like(weights)
    n = max(1, int(torch.ceil(torch.tensor(fraction * len(bald)))))
    return torch.multinomial(weights, n, replacement=False, generator=generator)


def bald_label_smoothing(bald: Tensor, a_max: float = 0.4) -> Tensor:
    """Per-pair flip rates ``a_max B_j / max B`` (N,), for ``cdpo``'s ``label_smoothing_per_pair``:
    0 for the most reliable pair, ``a_max`` (< 0.5) for the least; all 0 when every BALD is 0."""
    if not 0 <= a_max < 0.5:
        raise ValueError(f"a_max must be in [0, 0.5), got {a_max}")
    top = bald.max()
    return torch.zeros_like(bald) if not bool(top > 0) else a_max * bald / top


def upo_filter(
    rows: list[dict], settings: UPOSettings, seed: int = 0, tokenization: Tokenization | None = None
) -> list[dict]:
    """The pairs of ``rows`` UPO keeps (module docstring, steps 1-4), each with its ``bald``."""
    from diffalign.text.loading import load_causal_lm

    estimator, tokenizer = load_causal_lm(settings.estimator)
    reference, _ = load_causal_lm(settings.estimator_reference)
    probs = mc_dropout_preference_probs(
        estimator, reference, tokenizer, rows, settings.mc_passes, settings.beta, settings.dropout, seed,
        tokenization,
    )  # fmt: skip
    bald = binary_bald(probs)
    agree = (probs > 0.5).double().mean(0) >= 0.5
    keep = torch.nonzero(agree if settings.drop_disagreeing else torch.ones_like(agree)).flatten()
    if len(keep) == 0:
        return []
    generator = torch.Generator().manual_seed(seed)
    picked = keep[select_pairs(bald[keep], settings.keep_fraction, settings.hardness, settings.mu, generator)]
    return [{**rows[j], "bald": float(bald[j])} for j in sorted(picked.tolist())]
