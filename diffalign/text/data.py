"""Text preference data: TRL-style rows, in one record type.

Accepted rows (JSONL, parquet, a ``save_to_disk`` folder or a hub id; see ``diffalign.data.rows``):

- pairs: ``prompt``, ``chosen``, ``rejected`` (strings, or TRL's conversational form: a list of
  ``{"role", "content"}`` messages), optional rewards ``chosen_reward`` / ``rejected_reward``
  (UltraFeedback's ``score_chosen`` / ``score_rejected`` are read as well; the image pairs of
  ``diffalign.data.preference`` take the same fields), for ``mappo``, ``madpo`` and
  ``smoothed_dpo``, and an optional ``label`` (1, or 0.5 for a tie: dropped with ``ties="drop"``, kept as
  a soft label with ``ties="half"``, as the image readers do);
- K candidates: ``prompt``, ``completions`` (a list), ``rewards`` (a list of scalars of the same
  length), for ``nca`` / ``infonca`` (or any pairwise objective, on the best and worst).

A record keeps its candidates in a fixed order (pairs: chosen first). A bad row raises an error
naming the source and row, or with ``on_bad_sample="skip"`` is dropped and counted: a missing
column, an empty completion (whose log-probability would be a sum over nothing), rewards of the
wrong count, on one side of a pair only, or not finite. A row without rewards among rows with
them is an error either way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from diffalign.data.rows import (
    Parsed,
    check_rewards_all_or_none,
    pair_label,
    pair_rewards,
    parse_rows,
    read_rows,
)

__all__ = ["TextRecord", "read_text_preferences"]

Message = dict[str, str]
Text = str | list[Message]


@dataclass
class TextRecord:
    prompt: Text
    completions: list[Text]  # pairs: [chosen, rejected]
    rewards: list[float] | None
    where: str
    label: float = 1.0  # P(first candidate preferred): 1, or 0.5 for a tie kept


def read_text_preferences(
    path: str | Path,
    split: str = "train",
    ties: Literal["drop", "half"] = "drop",
    on_bad_sample: Literal["error", "skip"] = "error",
) -> Parsed[TextRecord]:
    """The rows of ``path`` as records. A malformed row raises naming it (``on_bad_sample="error"``)
    or is dropped and counted in the result's ``skipped`` and a warning (``"skip"``).

    Raises:
        ValueError: a malformed row (``"error"``), no rows (or only ties, with ``ties="drop"``),
            every row malformed, rows with and without rewards, or pairs mixed with K candidates.
    """

    def record(entry: tuple[str, dict]) -> TextRecord | None:
        r = _record(entry[1], entry[0])
        return r if r.label == 1.0 or ties == "half" else None

    rows = read_rows(path, split, what="text preference data")
    records = parse_rows(rows, record, on_bad_sample, path, "text preference data")
    if not records:
        raise ValueError(f"{path}: no rows" + (" (every row is a tie, and ties='drop')" if rows else ""))
    check_rewards_all_or_none(records)
    kinds = {len(r.completions) for r in records}
    if len(kinds) > 1:
        raise ValueError(f"{path}: rows have different numbers of candidates ({sorted(kinds)}); use one form")
    return records


def _record(row: dict, where: str) -> TextRecord:
    if "prompt" not in row:
        raise ValueError(f"{where}: missing 'prompt'")
    if "completions" in row:
        completions, rewards = list(row["completions"]), row.get("rewards")
        if len(completions) < 2:
            raise ValueError(f"{where}: 'completions' needs at least 2 candidates, got {len(completions)}")
        if rewards is not None and len(rewards) != len(completions):
            raise ValueError(f"{where}: {len(rewards)} rewards for {len(completions)} completions")
        if "label" in row:
            raise ValueError(f"{where}: 'label' belongs to pairs; K candidates are ranked by 'rewards'")
        names = [f"completions[{i}]" for i in range(len(completions))]
    else:
        for key in ("chosen", "rejected"):
            if key not in row:
                raise ValueError(
                    f"{where}: missing '{key}' (a row needs prompt, chosen, rejected; or prompt, completions)"
                )
        completions, names = [row["chosen"], row["rejected"]], ["chosen", "rejected"]
        scores = pair_rewards(row, where)
        rewards = None if scores is None else list(scores)
    for name, completion in zip(names, completions, strict=True):
        if not _content(completion).strip():
            raise ValueError(f"{where}: '{name}' is empty (an empty completion has no tokens to score)")
    if rewards is not None:
        try:
            rewards = [float(r) for r in rewards]
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: rewards must be numbers, got {rewards!r}") from err
        if not all(math.isfinite(r) for r in rewards):
            raise ValueError(f"{where}: rewards must be finite, got {rewards}")
    label = pair_label(row, where) if len(completions) == 2 else 1.0
    return TextRecord(row["prompt"], completions, rewards, where, label)


def _content(text: Text) -> str:
    if isinstance(text, str):
        return text
    return "".join(str(m.get("content", "")) for m in text)
