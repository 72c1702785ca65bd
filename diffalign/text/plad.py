"""PLaD's data step (Zhang et al. 2024, "PLaD: Preference-based Large Language Model Distillation
with Pseudo-Preference Pairs", arXiv 2406.02886, ACL Findings 2024): pseudo-preference pairs.

For each unlabeled prompt ``x``: ``y+`` sampled from the teacher, ``y-`` from the (SFT) student, and
the pair ``(x, y+ > y-)`` assumed without annotation. Teacher-better is not always true (SEED-METHODS
§3.4): with a ``score`` callable, a pair is kept only when ``score(y+) - score(y-) >= margin``,
and its scores are written as the rows' rewards. The rows are TRL-style (prompt, chosen, rejected
[, chosen_reward, rejected_reward]) and train the student with a calibration loss on
length-normalised sequence log-likelihoods: ``configs/text/plad.yaml`` uses ``simpo`` with
``gamma_beta_ratio: 0``, ``-log sigma(beta (lbar(y+) - lbar(y-)))``, the logistic variant; the
paper's formulas were not read (UNVERIFIED, §3.1). No official code exists.
"""

from __future__ import annotations

from typing import Any

from diffalign.text.sampling import TextReward, sample_completions, score_texts

__all__ = ["plad_pairs"]


def plad_pairs(
    teacher: tuple[Any, Any],
    student: tuple[Any, Any],
    prompts: list[str],
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    seed: int = 0,
    score: TextReward | None = None,
    margin: float = 0.0,
) -> list[dict]:
    """Rows (prompt, chosen = teacher's sample, rejected = student's sample) for ``prompts``, the
    ``teacher`` and ``student`` given as (model, tokenizer) each; both sampled once per prompt
    with the same seeds. A prompt where either sample is empty or both are the same text is
    skipped; with ``score``, so is a pair whose score gap is under ``margin`` (then the rows carry
    ``chosen_reward`` / ``rejected_reward``).

    Raises:
        ValueError: ``margin`` negative, or ``margin`` > 0 without ``score``.
    """
    if margin < 0 or (margin > 0 and score is None):
        raise ValueError(f"margin must be >= 0, and > 0 only with a score callable, got {margin}")
    ups = sample_completions(*teacher, prompts, 1, max_new_tokens, temperature, seed)
    downs = sample_completions(*student, prompts, 1, max_new_tokens, temperature, seed)
    rows = []
    for prompt, up, down in zip(prompts, ups, downs, strict=True):
        if not up or not down or up[0] == down[0]:
            continue
        row = {"prompt": prompt, "chosen": up[0], "rejected": down[0]}
        if score is not None:
            s_up, s_down = score_texts(score, [prompt, prompt], [up[0], down[0]])
            if s_up - s_down < margin:
                continue
            row |= {"chosen_reward": s_up, "rejected_reward": s_down}
        rows.append(row)
    return rows
