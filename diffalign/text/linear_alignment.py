"""Linear Alignment (Gao et al. 2024, arXiv 2401.11458, ICML 2024): decoding-time alignment to a
principle, no training. At each step the same model scores the next token twice, with the principle
in its context (``phi_p``) and without it (``phi_0``), and decodes from

    phi* = (1 + r) phi_p - r phi_0          (official model.py:93, demo.py:113)

divided by the temperature (after the combination, as the code), restricted to the top-p nucleus
of the *principled* distribution ``softmax(phi_p / temperature)`` (utils.py ``top_p_logits``: a
token is kept when the mass strictly before it, in decreasing order, is below top_p; the first
is always kept). Adapted from Wizardcoast/Linear_Alignment a593ce6 (``model.py``,
``ConstractiveDecodingModel.contra_generate``); that code runs its own loop, this is a
transformers ``LogitsProcessor`` for ``model.generate`` on the principled prompt, the principle-free
context kept in the processor's own KV cache and extended with each generated token.

Official defaults: model.py ratio 0 (which disables the method), temperature 0.5, top-p 0.8,
greedy; demo.py ratio 2, temperature 0.7; infer_hh.sh ratio 3, temperature 0.5 (its ``--top_p`` is
silently ignored: top-p is always 0.8). Here ``ratio`` has no default, temperature 0.5, top-p 0.8.

Pitfalls: two forwards per token (twice the compute and KV memory); both prompts must use the same
chat template, the principle being the only difference; large ratios degrade text quickly; do not
also pass ``temperature`` / ``top_p`` to ``generate`` (they would apply twice when sampling); one
processor serves one ``generate`` call (it holds that call's cache); beam search, and any other
decoding that reorders or expands the batch, is refused.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor
from transformers import LogitsProcessor

__all__ = ["LinearAlignment", "linear_alignment_logits", "nucleus_mask"]


def nucleus_mask(logits: Tensor, top_p: float) -> Tensor:
    """(B, V) bool, True on the top-p nucleus of ``softmax(logits)``: a token is kept when the
    probability mass of the tokens ranked before it is below ``top_p`` (official utils.py
    ``top_p_logits``, min_topk 1); top_p >= 1 keeps every token."""
    probs, order = torch.softmax(logits.float(), dim=-1).sort(dim=-1, descending=True)
    drop = (probs.cumsum(-1) - probs) >= top_p
    drop[..., 0] = False
    return ~torch.zeros_like(drop).scatter(-1, order, drop)


def linear_alignment_logits(
    principled: Tensor, plain: Tensor, ratio: float, temperature: float = 0.5, top_p: float = 0.8
) -> Tensor:
    """``((1 + ratio) principled - ratio plain) / temperature`` where the token lies in the top-p
    nucleus of ``softmax(principled / temperature)``, ``-inf`` elsewhere; shape (B, V) as the inputs.

    ``softmax`` of the result is the official distribution renormalised on the nucleus; its argmax
    is the official greedy token. Raises ``ValueError`` for mismatched shapes, ``ratio < 0``,
    ``temperature <= 0`` or ``top_p`` outside (0, 1].
    """
    if principled.shape != plain.shape:
        raise ValueError(f"logits differ in shape: {tuple(principled.shape)} and {tuple(plain.shape)}")
    if ratio < 0 or temperature <= 0 or not 0 < top_p <= 1:
        raise ValueError(
            f"need ratio >= 0, temperature > 0 and top_p in (0, 1]; got {ratio}, {temperature}, {top_p}"
        )
    aligned = ((1 + ratio) * principled.float() - ratio * plain.float()) / temperature
    return aligned.masked_fill(~nucleus_mask(principled.float() / temperature, top_p), float("-inf"))


class LinearAlignment(LogitsProcessor):
    """A ``LogitsProcessor`` for ``model.generate(principled_ids, logits_processor=[...])``.

    Args:
        model: the causal LM that generates (the same one scores the principle-free context).
        plain_input_ids: (B, L0) the principle-free prompts, left-padded (``padding_side="left"``)
            like the principled ones ``generate`` receives, row for row.
        plain_attention_mask: (B, L0), 1 on tokens (default: all ones).
        ratio: the step size r >= 0 (0: the principled model, top-p masked).
        temperature, top_p: as the official code; see :func:`linear_alignment_logits`.

    Raises ``ValueError`` (at the first step, naming the reason) when ``generate`` runs a batch of
    another size (beam search, several return sequences) or a processor is reused for a second call.
    """

    def __init__(
        self,
        model: Any,
        plain_input_ids: Tensor,
        plain_attention_mask: Tensor | None = None,
        *,
        ratio: float,
        temperature: float = 0.5,
        top_p: float = 0.8,
    ) -> None:
        linear_alignment_logits(torch.zeros(1, 1), torch.zeros(1, 1), ratio, temperature, top_p)  # checks
        if plain_input_ids.dim() != 2:
            raise ValueError(f"plain_input_ids must be (B, L), got shape {tuple(plain_input_ids.shape)}")
        mask = torch.ones_like(plain_input_ids) if plain_attention_mask is None else plain_attention_mask
        if mask.shape != plain_input_ids.shape:
            raise ValueError("plain_attention_mask must have the shape of plain_input_ids")
        if bool((mask[:, -1] == 0).any()):
            raise ValueError("plain prompts must be left-padded (the last position of a row is padding)")
        self.model, self.ratio, self.temperature, self.top_p = model, ratio, temperature, top_p
        self.pending, self.mask = plain_input_ids, mask
        self.cache: Any = None
        self.seen: int | None = None  # length of the principled input_ids at the last call

    @torch.no_grad()
    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if input_ids.shape[0] != self.mask.shape[0]:
            raise ValueError(
                f"linear alignment: generate runs {input_ids.shape[0]} sequences for {self.mask.shape[0]} "
                "plain prompts (beam search or num_return_sequences > 1 are not supported)"
            )
        if self.seen is not None:
            if input_ids.shape[1] <= self.seen:
                raise ValueError("linear alignment: a processor serves one generate call; build a new one")
            self.pending = input_ids[:, self.seen :]  # the tokens generated since the last step
        self.seen = input_ids.shape[1]
        plain = self._plain_logits()
        return linear_alignment_logits(
            scores, plain.to(scores.device), self.ratio, self.temperature, self.top_p
        )

    def _plain_logits(self) -> Tensor:
        """Feed the pending tokens to the principle-free context; its next-token logits (B, V)."""
        device = next(self.model.parameters()).device
        tokens = self.pending.to(device)
        if self.cache is None:
            mask = self.mask.to(device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
        else:
            start = self.mask.sum(-1, keepdim=True).to(device)
            positions = start + torch.arange(tokens.shape[1], device=device)
            mask = torch.cat([self.mask.to(device), torch.ones_like(tokens)], dim=1)
        # transformers 5.x renamed `past_key_values` to `cache` (the old name warns, then goes)
        new_api = "cache" in inspect.signature(self.model.forward).parameters
        key = "cache" if new_api else "past_key_values"
        out = self.model(
            input_ids=tokens, attention_mask=mask, position_ids=positions, use_cache=True, **{key: self.cache}
        )
        self.cache, self.mask = getattr(out, key), mask
        return out.logits[:, -1].float()
