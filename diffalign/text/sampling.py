"""Sampling a causal LM's completions and pairing them by a text reward: the data step the text
side's online methods share (RSO's rejection sampling, online VPO and UPO rounds, PLaD's pairs)."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from diffalign.objectives import PairRule, pairs_from_scores
from diffalign.text.logps import Tokenization, render_prompt

__all__ = ["TextReward", "load_text_reward", "pair_rows", "sample_completions", "score_texts"]

TextReward = Callable[[list[str], list[str]], Sequence[float]]  # (prompts, completions) -> scores


def load_text_reward(spec: str) -> TextReward:
    """A reward function given as ``module:function``.

    Raises:
        ValueError: ``spec`` is not ``module:function``, or the module or function cannot be found.
    """
    module, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"reward '{spec}': expected 'module:function'")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"reward '{spec}': cannot load it ({type(err).__name__}: {err})") from err


def score_texts(reward: TextReward, prompts: list[str], completions: list[str]) -> list[float]:
    """``reward(prompts, completions)`` as floats, one per completion.

    Raises:
        ValueError: naming the reward, when it returns other than one finite number per completion
            (a short list would pair scores with the wrong texts; NaN would order nothing).
    """
    name = getattr(reward, "__qualname__", repr(reward))
    try:
        scores = [float(s) for s in reward(prompts, completions)]
    except (TypeError, ValueError) as err:
        raise ValueError(f"reward {name}: expected one number per completion ({err})") from err
    if len(scores) != len(completions):
        raise ValueError(f"reward {name} returned {len(scores)} scores for {len(completions)} completions")
    if not all(math.isfinite(s) for s in scores):
        raise ValueError(f"reward {name} returned a non-finite score: {scores}")
    return scores


def sample_completions(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    num_samples: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int = 0,
    tokenization: Tokenization | None = None,
) -> list[list[str]]:
    """``num_samples`` sampled completions of each prompt (stripped; empty ones dropped, so a
    prompt may get fewer). Prompt ``j`` is sampled under the global torch seed ``(seed, j)``
    (``generate`` draws from the global generator), so a run is fixed by ``seed``."""
    cfg = tokenization or Tokenization()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    out = []
    for j, prompt in enumerate(tqdm(prompts, desc="sampling completions")):
        ids = tokenizer(render_prompt(tokenizer, prompt, cfg), add_special_tokens=False, return_tensors="pt")
        torch.manual_seed(seed * 1_000_003 + j)
        with torch.no_grad():
            tokens = model.generate(
                **ids.to(device), do_sample=True, temperature=temperature, max_new_tokens=max_new_tokens,
                num_return_sequences=num_samples, pad_token_id=pad,
            )  # fmt: skip
        texts = tokenizer.batch_decode(tokens[:, ids.input_ids.shape[1] :], skip_special_tokens=True)
        out.append([t.strip() for t in texts if t.strip()])
    return out


def pair_rows(
    prompts: list[str],
    completions: list[list[str]],
    reward: TextReward,
    rule: PairRule = "best_worst",
    margin: float = 0.0,
    seed: int = 0,
    num_accepted: int = 2,
    beta: float = 0.5,
) -> list[dict]:
    """TRL-style rows (prompt, chosen, rejected, chosen_reward, rejected_reward) from each prompt's
    completions scored by ``reward``, paired by :func:`~diffalign.objectives.pairs_from_scores`
    (ties and gaps under ``margin`` left out; a prompt with fewer than two completions skipped;
    ``num_accepted`` and ``beta``: the ``"rso"`` rule's)."""
    generator = torch.Generator().manual_seed(seed)  # the rso rule's draws
    rows = []
    for prompt, texts in zip(prompts, completions, strict=True):
        if len(texts) < 2:
            continue
        scores = torch.tensor(score_texts(reward, [prompt] * len(texts), texts), dtype=torch.float64)
        for w, lo in pairs_from_scores(scores, rule, margin, num_accepted, beta, generator):
            rows.append({
                "prompt": prompt, "chosen": texts[w], "rejected": texts[lo],
                "chosen_reward": float(scores[w]), "rejected_reward": float(scores[lo]),
            })  # fmt: skip
    return rows
