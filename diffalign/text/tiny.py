"""A tiny causal LM and a word-level tokenizer built locally, and a synthetic preference task.

For tests, benchmarks and examples: nothing is downloaded. The model is a 2-layer Llama (rotary
positions, so left padding is a real test) saved with its tokenizer in transformers format, so it
loads through ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained`` like any hub model.

The task (``synthetic_preferences``): a prompt is a few random topic words; the chosen completion
repeats them politely ("yes" words), the rejected one answers with "no" words. A policy that
learns the preference puts more mass on "yes" words.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

__all__ = ["build_tiny_causal_lm", "synthetic_preferences", "yes_fraction"]

TOPICS = [f"t{i}" for i in range(24)]
YES = ["yes", "sure", "gladly", "indeed"]
NO = ["no", "never", "nope", "refuse"]
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<user>", "<assistant>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<' + m['role'] + '> ' + m['content'] + ' </s> ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<assistant> ' }}{% endif %}"
)


def build_tiny_causal_lm(
    path: str | Path, chat_template: bool = False, seed: int = 0, hidden: int = 32, layers: int = 2,
    max_positions: int = 256,
) -> Path:  # fmt: skip
    """Save a tiny Llama (``layers`` layers of width ``hidden``, sequences up to ``max_positions``
    tokens) and its tokenizer under ``path``; return ``path``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = [*SPECIAL, *TOPICS, *YES, *NO, "user", "assistant"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(words), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=max_positions,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    path = Path(path)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def synthetic_preferences(
    path: str | Path, rows: int = 64, seed: int = 0, candidates: int = 2, rewards: bool = False
) -> Path:
    """A JSONL of ``rows`` rows: pairs (prompt, chosen, rejected), or K ``completions`` with
    ``rewards`` (the fraction of "yes" words) when ``candidates > 2``."""
    rng = random.Random(seed)
    lines = []
    for _ in range(rows):
        prompt = " ".join(rng.choices(TOPICS, k=rng.randint(2, 5)))

        def answer(p_yes: float) -> tuple[str, float]:
            n = rng.randint(2, 6)
            picks = [rng.choice(YES) if rng.random() < p_yes else rng.choice(NO) for _ in range(n)]
            return " ".join(picks), sum(w in YES for w in picks) / n

        if candidates == 2:
            (chosen, r_c), (rejected, r_r) = answer(0.9), answer(0.1)
            row = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
            if rewards:
                row.update(chosen_reward=r_c, rejected_reward=r_r)
        else:
            answers = [answer(rng.random()) for _ in range(candidates)]
            row = {
                "prompt": prompt,
                "completions": [a for a, _ in answers],
                "rewards": [r for _, r in answers],
            }
        lines.append(json.dumps(row))
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path


def yes_fraction(prompts: list[str], completions: list[str]) -> list[float]:
    """The synthetic task's reward: the fraction of "yes" words in a completion."""
    scores = []
    for completion in completions:
        words = completion.split()
        scores.append(sum(w in YES for w in words) / max(len(words), 1))
    return scores
