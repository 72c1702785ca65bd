"""Tokenized text preference records, and their collation into one padded batch of candidates."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from diffalign.text.data import TextRecord
from diffalign.text.logps import Sequence, Tokenization, encode_candidates, pad_sequences

__all__ = ["TextPreferenceDataset"]


class TextPreferenceDataset(Dataset):
    """Every record tokenized up front, so that a bad row stops the run before training starts.

    An item: the record's K candidate sequences, its rewards (K,) or None, its label (P(first
    candidate preferred)), its reference log-probabilities (K,) when precomputed, and its index.
    """

    def __init__(self, records: list[TextRecord], tokenizer: Any, cfg: Tokenization) -> None:
        if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token to pad with")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.padding_side = cfg.padding_side
        self.records = records
        self.sequences = [
            encode_candidates(tokenizer, r.prompt, r.completions, cfg, r.where) for r in records
        ]
        self.reference_logps: Tensor | None = None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        rewards = self.records[i].rewards
        return {
            "sequences": self.sequences[i],
            "rewards": None if rewards is None else torch.tensor(rewards),
            "label": self.records[i].label,
            "reference_logps": None if self.reference_logps is None else self.reference_logps[i],
            "index": i,
        }

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Candidates row-major: row b's K candidates are entries b*K .. b*K + K - 1."""
        sequences: list[Sequence] = [s for item in items for s in item["sequences"]]
        batch: dict[str, Any] = pad_sequences(sequences, self.pad_id, self.padding_side)
        batch["num_candidates"] = len(items[0]["sequences"])
        for key in ("rewards", "reference_logps"):
            values = [item[key] for item in items]
            batch[key] = None if values[0] is None else torch.stack(values)
        batch["labels"] = torch.tensor([item["label"] for item in items], dtype=torch.float32)
        batch["index"] = torch.tensor([item["index"] for item in items])
        return batch
