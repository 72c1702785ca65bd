"""RSO's data step (Liu et al. 2023, §3 and Algorithm 1): preference pairs from the policy's own samples.

For each prompt: sample ``num_candidates`` completions from the (SFT) policy, score them with a
reward, accept ``num_accepted`` of them by statistical rejection sampling towards the optimal
policy ``pi_sft(y) exp(r(y) / beta)`` (``rso_rejection_sample``), and pair the accepted ones in
order of acceptance ("tournament": 1 vs 2, 3 vs 4, ...), the higher reward as chosen (ties dropped). The rows
are TRL-style (prompt, chosen, rejected, chosen_reward, rejected_reward), ready for
``configs/text/rso.yaml``. The paper's defaults: 64 candidates, 8 accepted, beta 0.5.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from diffalign.objectives import pairs_from_scores
from diffalign.text.logps import Tokenization, render_prompt

__all__ = ["TextReward", "load_text_reward", "rso_pairs"]

TextReward = Callable[[list[str], list[str]], Sequence[float]]  # (prompts, completions) -> scores


def load_text_reward(spec: str) -> TextReward:
    """A reward function given as ``module:function``."""
    module, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"reward '{spec}': expected 'module:function'")
    return getattr(importlib.import_module(module), name)


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
    if num_accepted < 2 or num_accepted % 2 or num_accepted > num_candidates:
        raise ValueError(
            f"num_accepted must be even, >= 2 and <= num_candidates ({num_candidates}), got {num_accepted}"
        )
    cfg = tokenization or Tokenization()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for prompt in tqdm(prompts, desc="RSO: sampling, scoring, rejection sampling"):
        ids = tokenizer(render_prompt(tokenizer, prompt, cfg), add_special_tokens=False, return_tensors="pt")
        torch.manual_seed(int(torch.randint(2**31, (1,), generator=generator)))  # generate draws globally
        with torch.no_grad():
            out = model.generate(
                **ids.to(device), do_sample=True, temperature=temperature, max_new_tokens=max_new_tokens,
                num_return_sequences=num_candidates, pad_token_id=pad,
            )  # fmt: skip
        texts = tokenizer.batch_decode(out[:, ids.input_ids.shape[1] :], skip_special_tokens=True)
        texts = [t.strip() for t in texts if t.strip()]  # an empty sample cannot be scored as a completion
        if len(texts) < num_accepted:
            continue
        scores = torch.tensor([float(s) for s in reward([prompt] * len(texts), texts)], dtype=torch.float64)
        for w, lo in pairs_from_scores(
            scores, "rso", num_accepted=num_accepted, beta=beta, generator=generator
        ):
            rows.append({
                "prompt": prompt, "chosen": texts[w], "rejected": texts[lo],
                "chosen_reward": float(scores[w]), "rejected_reward": float(scores[lo]),
            })  # fmt: skip
    return rows
