"""Supervised fine-tuning rows: a prompt and one answer (IFT's data; no pairs, no scores).

Accepted rows (any source ``diffalign.data.rows.read_rows`` reads):

- ``prompt`` with ``completion`` (TRL's prompt-completion form), ``answer``, or ``chosen`` (a
  preference row trains on its chosen answer, as the official IFT runs on UltraFeedback's chosen
  answers): strings, or TRL's conversational form (lists of ``{"role", "content"}`` messages);
- ``messages`` (TRL's conversational language-modeling form): the last message is the answer and
  must be the assistant's; the ones before it are the prompt.

Records are :class:`~diffalign.text.data.TextRecord` with one completion, so that the preference
recipes' tokenization and batching serve them unchanged. A malformed row (a missing or empty
answer, a missing prompt, a ``messages`` list without a final assistant turn) raises naming it, or
is skipped and counted with ``on_bad_sample="skip"``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from diffalign.data.rows import Parsed, parse_rows, read_rows
from diffalign.text.data import TextRecord

__all__ = ["read_sft_rows"]

ANSWER_FIELDS = ("completion", "answer", "chosen")  # the first present is the answer


def read_sft_rows(
    path: str | Path, split: str = "train", on_bad_sample: Literal["error", "skip"] = "error"
) -> Parsed[TextRecord]:
    """The rows of ``path`` as one-completion records.

    Raises:
        ValueError: a malformed row (``on_bad_sample="error"``, naming the row), no rows, or every
            row malformed.
    """
    rows = read_rows(path, split, what="SFT data")
    records = parse_rows(rows, lambda entry: _record(entry[1], entry[0]), on_bad_sample, path, "SFT data")
    if not records:
        raise ValueError(f"{path}: no rows")
    return records


def _record(row: dict, where: str) -> TextRecord:
    if "messages" in row:
        messages = row["messages"]
        if (
            not isinstance(messages, list)
            or len(messages) < 2
            or not all(isinstance(m, dict) for m in messages)
        ):
            raise ValueError(f"{where}: 'messages' must be a list of at least 2 {{role, content}} messages")
        if messages[-1].get("role") != "assistant":
            raise ValueError(f"{where}: the last of 'messages' must be the assistant's answer")
        prompt, answer = messages[:-1], [messages[-1]]
    else:
        if "prompt" not in row:
            raise ValueError(f"{where}: missing 'prompt' (a row needs prompt and completion, or messages)")
        field = next((f for f in ANSWER_FIELDS if f in row), None)
        if field is None:
            raise ValueError(f"{where}: missing 'completion' (or 'answer', or a pair's 'chosen')")
        prompt, answer = row["prompt"], row[field]
    for name, text in (("prompt", prompt), ("answer", answer)):
        if not isinstance(text, (str, list)):
            raise ValueError(
                f"{where}: the {name} must be text or a list of messages, got {type(text).__name__}"
            )
    if not _content(answer).strip():
        raise ValueError(f"{where}: the answer is empty (an empty answer has no tokens to train on)")
    return TextRecord(prompt, [answer], None, where)


def _content(text: str | list[dict]) -> str:
    if isinstance(text, str):
        return text
    return "".join(str(m.get("content", "")) if isinstance(m, dict) else "" for m in text)
