"""RSO's data step (Liu et al. 2023, §3 and Algorithm 1): preference pairs from the policy's own samples.

For each prompt: sample ``num_candidates`` completions from the (SFT) policy, score them with a
reward, accept ``num_accepted`` of them by statistical rejection sampling towards the optimal
policy ``pi_sft(y) exp(r(y) / beta)`` (``rso_rejection_sample``), and pair the accepted ones in
order of acceptance ("tournament": 1 vs 2, 3 vs 4, ...), the higher reward as chosen (ties dropped). The rows
are TRL-style (prompt, chosen, rejected, chosen_reward, rejected_reward), ready for
``configs/text/rso.yaml``. The paper's defaults: 64 candidates, 8 accepted, beta 0.5.
"""

from __future__ import annotations

from typing import Any

from diffalign.text.logps import Tokenization
from diffalign.text.sampling import TextReward, pair_rows, sample_completions

__all__ = ["rso_pairs"]


def rso_pairs(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    reward: TextReward,
    num_candidates: int = 64,
    num_accepted: int = 8,
    beta: float = 0.5,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    seed: int = 0,
    tokenization: Tokenization | None = None,
) -> list[dict]:
    """TRL-style rows of each prompt's accepted samples, paired in order of acceptance (a prompt
    with fewer than ``num_accepted`` non-empty samples makes none).

    Raises:
        ValueError: ``num_accepted`` odd, below 2 or above ``num_candidates``.
    """
    if num_accepted < 2 or num_accepted % 2 or num_accepted > num_candidates:
        raise ValueError(
            f"num_accepted must be even, >= 2 and <= num_candidates ({num_candidates}), got {num_accepted}"
        )
    completions = sample_completions(
        model, tokenizer, prompts, num_candidates, max_new_tokens, temperature, seed, tokenization
    )
    # an empty sample is dropped (it cannot be scored as a completion); too few left: no pairs
    completions = [texts if len(texts) >= num_accepted else [] for texts in completions]
    return pair_rows(prompts, completions, reward, "rso", seed=seed, num_accepted=num_accepted, beta=beta)
