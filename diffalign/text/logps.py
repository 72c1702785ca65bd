"""Token log-probabilities of completions under a causal LM: the text side's estimator.

``encode_candidates`` turns a prompt and its K completions into token ids as TRL's DPOTrainer
does: the chat template (when the tokenizer has one and ``chat_template="auto"``) renders the
prompt as a user turn with the generation prompt and the completion as the assistant's reply;
without one the completion ends with EOS. Truncation, in TRL's order: the prompt keeps its last
``max_prompt_length`` tokens, a completion its first ``max_completion_length``, and the
concatenation its first (``keep_start``) or last (``keep_end``) ``max_length``. A candidate with no
completion token left is an error naming the row, never a log-probability of 0.

``completion_logps`` scores all candidates of a batch in one forward: sequences padded on either
side (position ids follow the attention mask, so left padding changes nothing), prompt and
padding tokens masked out, the per-token completion log-probabilities returned (their sum and
count as properties). From them: LD-DPO's length-desensitised sums (``desensitised_logps``) and
WPO's sequence weights (``wpo_weights``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from diffalign.config import AT_LEAST_ONE, Range, check_ranges
from diffalign.text.data import Text

__all__ = [
    "CompletionLogps",
    "Tokenization",
    "candidate_logps",
    "completion_logps",
    "desensitised_logps",
    "encode_candidates",
    "next_token_logps",
    "pad_sequences",
    "render_prompt",
    "wpo_weights",
]


@dataclass
class Tokenization:
    max_prompt_length: int | None = 512
    max_completion_length: int | None = None
    max_length: int | None = 1024
    truncation_mode: Literal["keep_end", "keep_start"] = "keep_end"
    chat_template: Literal["auto", "never"] = "auto"
    padding_side: Literal["right", "left"] = "right"

    ranges: ClassVar[dict[str, Range]] = dict.fromkeys(
        ("max_prompt_length", "max_completion_length", "max_length"),
        AT_LEAST_ONE,  # null: no limit
    )

    def __post_init__(self) -> None:
        check_ranges(self)


Sequence = tuple[list[int], int]  # token ids, number of prompt tokens among them


def _uses_template(tokenizer: Any, cfg: Tokenization) -> bool:
    return cfg.chat_template == "auto" and bool(getattr(tokenizer, "chat_template", None))


def _messages(prompt: Text, templated: bool, where: str) -> list[dict]:
    if not isinstance(prompt, str) and not templated:
        raise ValueError(f"{where}: the prompt is a list of messages but the tokenizer has no chat template")
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def render_prompt(tokenizer: Any, prompt: Text, cfg: Tokenization, where: str = "row") -> str:
    """The prompt as the model sees it: a user turn plus the generation prompt, or the text itself."""
    templated = _uses_template(tokenizer, cfg)
    messages = _messages(prompt, templated, where)
    if not templated:
        return str(prompt)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_candidates(
    tokenizer: Any, prompt: Text, completions: list[Text], cfg: Tokenization, where: str = "row"
) -> list[Sequence]:
    templated = _uses_template(tokenizer, cfg)
    if not templated and tokenizer.eos_token_id is None:
        raise ValueError(
            "the tokenizer has no EOS token to end completions with (set one, or a chat template)"
        )
    messages = _messages(prompt, templated, where)
    prompt_text = render_prompt(tokenizer, prompt, cfg, where)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False).input_ids
    if cfg.max_prompt_length is not None:
        prompt_ids = prompt_ids[-cfg.max_prompt_length :]
    out = []
    for k, completion in enumerate(completions):
        reply = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
        if templated:
            full = tokenizer.apply_chat_template(messages + reply, tokenize=False)
            if not full.startswith(prompt_text):
                raise ValueError(f"{where}: the chat template does not render the prompt as a prefix")
            ids = tokenizer(full[len(prompt_text) :], add_special_tokens=False).input_ids
        else:
            text = "".join(str(m["content"]) for m in reply)
            ids = [*tokenizer(text, add_special_tokens=False).input_ids, tokenizer.eos_token_id]
        if cfg.max_completion_length is not None:
            ids = ids[: cfg.max_completion_length]
        sequence, n_prompt = prompt_ids + ids, len(prompt_ids)
        if cfg.max_length is not None and len(sequence) > cfg.max_length:
            cut = len(sequence) - cfg.max_length
            if cfg.truncation_mode == "keep_start":
                sequence, n_prompt = sequence[: cfg.max_length], min(n_prompt, cfg.max_length)
            else:
                sequence, n_prompt = sequence[cut:], max(n_prompt - cut, 0)
        # the first token has no prediction: a completion starting the sequence loses it
        if len(sequence) - max(n_prompt, 1) < 1:
            raise ValueError(
                f"{where}: candidate {k} has no completion token left after truncation "
                f"(max_prompt_length {cfg.max_prompt_length}, max_length {cfg.max_length})"
            )
        out.append((sequence, n_prompt))
    return out


def pad_sequences(
    sequences: list[Sequence], pad_id: int, side: Literal["right", "left"] = "right"
) -> dict[str, Tensor]:
    """``input_ids``, ``attention_mask`` and ``completion_mask`` (N, L), padded to the longest."""
    width = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    completion = torch.zeros((len(sequences), width), dtype=torch.bool)
    for i, (ids, n_prompt) in enumerate(sequences):
        start = 0 if side == "right" else width - len(ids)
        input_ids[i, start : start + len(ids)] = torch.tensor(ids)
        attention[i, start : start + len(ids)] = 1
        completion[i, start + n_prompt : start + len(ids)] = True
    return {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion}


@dataclass
class CompletionLogps:
    """Completion-token log-probabilities of N sequences of width L (``completion_logps``)."""

    tokens: Tensor  # (N, L - 1) log-probability of each next token, 0 outside the completion
    mask: Tensor  # (N, L - 1) bool, the completion tokens among them
    log_sum_sq_probs: Tensor | None = None  # (N, L - 1) log sum_v p_v^2 per position, no gradient

    @property
    def summed(self) -> Tensor:
        """(N,) sum of completion-token log-probabilities."""
        return self.tokens.sum(-1)

    @property
    def lengths(self) -> Tensor:
        """(N,) completion tokens scored."""
        return self.mask.sum(-1).to(self.tokens.dtype)

    @property
    def mean(self) -> Tensor:
        return self.summed / self.lengths


def completion_logps(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    sum_sq_probs: bool = False,
) -> CompletionLogps:
    """Score every completion token of a padded batch (N, L) in one forward (float32 whatever the
    model's dtype). ``sum_sq_probs`` also returns ``log sum_v p_v^2`` of each next-token
    distribution, without gradient (WPO's normaliser: :func:`wpo_weights`)."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    mask = completion_mask[:, 1:]
    token_logps = next_token_logps(logits, input_ids).masked_fill(~mask, 0.0)
    log_sum_sq = None
    if sum_sq_probs:
        with torch.no_grad():  # sum_v p_v^2 = sum_v exp(2 logit_v) / Z^2
            logits = logits[:, :-1].float()
            log_sum_sq = torch.logsumexp(2 * logits, dim=-1) - 2 * torch.logsumexp(logits, dim=-1)
            log_sum_sq = log_sum_sq.masked_fill(~mask, 0.0)
    return CompletionLogps(token_logps, mask, log_sum_sq)


def next_token_logps(logits: Tensor, input_ids: Tensor) -> Tensor:
    """(N, L - 1) log-probabilities of each next token ``input_ids[:, 1:]`` under ``logits`` (N, L, V),
    in float32 whatever the model's dtype: log-softmax evaluated at the labels only."""
    logits = logits[:, :-1]
    picked = logits.gather(-1, input_ids[:, 1:, None]).squeeze(-1).float()
    return picked - torch.logsumexp(logits.float(), dim=-1)


def desensitised_logps(scored: CompletionLogps, shared_lengths: Tensor, alpha: float) -> Tensor:
    """LD-DPO's length-desensitised log-likelihoods (N,) (Liu et al. 2024, "Length Desensitization
    in Direct Preference Optimization", paper not checked here; TRL 1.16
    ``trl/trainer/dpo_trainer.py``, ``DPOTrainer._compute_loss`` with ``ld_alpha``): the sum over the
    first ``shared_lengths`` (N,) completion tokens plus ``alpha`` times the sum over the rest.

    For a pair both candidates get ``min(|y_w|, |y_l|)``; ``alpha = 1`` is the plain sum, ``0`` cuts
    the longer candidate to the shorter one's length.
    """
    position = scored.mask.cumsum(-1)
    shared = scored.mask & (position <= shared_lengths[:, None])
    tail = scored.mask & ~shared
    return (scored.tokens * shared).sum(-1) + alpha * (scored.tokens * tail).sum(-1)


def wpo_weights(scored: CompletionLogps) -> Tensor:
    """WPO's per-sequence weights (N,) (Zhou et al. 2024, arXiv 2406.11827, Eq. 2, as TRL 1.16
    ``trl/trainer/dpo_trainer.py``, ``DPOTrainer._compute_loss`` with ``use_weighting`` computes
    it): the geometric mean over completion tokens of ``p(y_t) / sum_v p_v^2`` (the token's
    probability normalised by the distribution's own expected probability), without gradient.

    Raises ``ValueError`` when ``scored`` was computed without ``sum_sq_probs=True``.
    """
    if scored.log_sum_sq_probs is None:
        raise ValueError("wpo_weights needs completion_logps(..., sum_sq_probs=True)")
    with torch.no_grad():
        aligned = (scored.tokens - scored.log_sum_sq_probs) * scored.mask
        return torch.exp(aligned.sum(-1) / scored.lengths.clamp(min=1))


def candidate_logps(
    model: Any, tokenizer: Any, prompt: str, completions: list[str], tokenization: Tokenization | None = None
) -> torch.Tensor:
    """(K,) summed completion-token log-probs of ``completions`` given ``prompt`` (as training
    scores them: :func:`completion_logps`), under the model's current mode."""
    seqs = encode_candidates(tokenizer, prompt, completions, tokenization or Tokenization())
    device = next(model.parameters()).device
    tokens = {k: v.to(device) for k, v in pad_sequences(seqs, tokenizer.pad_token_id).items()}
    return completion_logps(model, **tokens).summed.double().cpu()
