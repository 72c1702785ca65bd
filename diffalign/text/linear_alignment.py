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
import math
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
    is the official greedy token. Raises ``ValueError`` for mismatched shapes, ``ratio`` not a
    finite number >= 0, ``temperature`` not a finite number > 0, or ``top_p`` outside (0, 1].
    """
    if principled.shape != plain.shape:
        raise ValueError(f"logits differ in shape: {tuple(principled.shape)} and {tuple(plain.shape)}")
    _check_settings(ratio, temperature, top_p)
    aligned = ((1 + ratio) * principled.float() - ratio * plain.float()) / temperature
    return aligned.masked_fill(~nucleus_mask(principled.float() / temperature, top_p), float("-inf"))


def _check_settings(ratio: float, temperature: float, top_p: float) -> None:
    # `not x >= 0` rather than `x < 0`: NaN fails every comparison and would pass the latter
    if not (math.isfinite(ratio) and ratio >= 0):
        raise ValueError(f"ratio must be a finite number >= 0, got {ratio}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def _model_pad_ids(model: Any) -> set[int]:
    configs = (getattr(model, "config", None), getattr(model, "generation_config", None))
    return {pad for c in configs if isinstance(pad := getattr(c, "pad_token_id", None), int)}


class LinearAlignment(LogitsProcessor):
    """A ``LogitsProcessor`` for ``model.generate(principled_ids, logits_processor=[...])``.

    Args:
        model: the causal LM that generates (the same one scores the principle-free context).
        plain_input_ids: (B, L0) the principle-free prompts, left-padded (``padding_side="left"``)
            like the principled ones ``generate`` receives, row for row.
        plain_attention_mask: (B, L0), 1 on tokens. Default all ones, allowed only when no
            position of ``plain_input_ids`` holds the model's pad id (``config`` or
            ``generation_config.pad_token_id``): padded prompts need their mask. Where the pad id
            is also a real token of the prompt (pad = eos), pass the mask.
        ratio: the step size r >= 0, finite (0: the principled model, top-p masked).
        temperature, top_p: as the official code; see :func:`linear_alignment_logits`.

    Raises ``ValueError`` naming the argument for bad settings or plain prompts; and at a step of
    ``generate`` when it runs a batch of another size (beam search, several return sequences) or
    when the processor is reused: each call's ``input_ids`` must extend the previous call's by the
    tokens generated since, so a second ``generate`` call is refused. Build one processor per call.
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
        _check_settings(ratio, temperature, top_p)
        if plain_input_ids.dim() != 2:
            raise ValueError(f"plain_input_ids must be (B, L), got shape {tuple(plain_input_ids.shape)}")
        if plain_attention_mask is None:
            pads = [p for p in _model_pad_ids(model) if bool((plain_input_ids == p).any())]
            if pads:
                raise ValueError(
                    f"plain_input_ids hold the model's pad id {pads[0]} but plain_attention_mask is "
                    "not given: pass the tokenizer's attention_mask (padding would be read as tokens)"
                )
        mask = torch.ones_like(plain_input_ids) if plain_attention_mask is None else plain_attention_mask
        if mask.shape != plain_input_ids.shape:
            raise ValueError("plain_attention_mask must have the shape of plain_input_ids")
        if bool((mask[:, -1] == 0).any()):
            raise ValueError("plain prompts must be left-padded (the last position of a row is padding)")
        self.model, self.ratio, self.temperature, self.top_p = model, ratio, temperature, top_p
        self.pending, self.mask = plain_input_ids, mask
        self.cache: Any = None
        self.last: Tensor | None = None  # the principled input_ids of the last step

    @torch.no_grad()
    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if input_ids.shape[0] != self.mask.shape[0]:
            raise ValueError(
                f"linear alignment: generate runs {input_ids.shape[0]} sequences for {self.mask.shape[0]} "
                "plain prompts (beam search or num_return_sequences > 1 are not supported)"
            )
        if self.last is not None:
            seen = self.last.shape[1]
            # lengths alone would let a longer prompt of a second call through, decoded against
            # the first call's cache; a prompt that continues this call's ids keeps the cache right
            if input_ids.shape[1] <= seen or not torch.equal(input_ids[:, :seen], self.last):
                raise ValueError(
                    "linear alignment: input_ids do not extend the previous step's; a processor serves "
                    "one generate call (it holds that call's cache): build one processor per call"
                )
            self.pending = input_ids[:, seen:]  # the tokens generated since the last step
        self.last = input_ids.clone()
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
