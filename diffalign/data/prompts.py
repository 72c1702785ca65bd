"""Prompts to sample from: what online methods (DDPO) train on, what ``diffalign label`` samples
and what ``diffalign eval`` evaluates on.

:func:`read_prompt_set` reads the prompt sets the papers evaluate on, in their common local
formats, each prompt with its category:

- ``.txt``: one prompt per line (blank lines skipped; a prompt repeated is drawn more often);
  no category;
- ``.tsv``: PartiPrompts (``PartiPrompts.tsv``: columns ``Prompt``, ``Category``, ...);
- ``.csv``: DrawBench (columns ``Prompts``, ``Category``); any CSV with a ``prompt`` (or
  ``prompts``, ``caption``) column, ``category`` optional (column names in any case);
- ``.json``: HPDv2's benchmark prompts (a list of strings per style file, ``anime.json``: the
  file's stem is the category), an object ``{category: [prompts]}``, or a list of objects with
  ``prompt`` (or ``caption``) and optional ``category``; a folder of such ``.json`` files (the
  benchmark's four styles) reads them all, in name order;
- anything :func:`~diffalign.data.rows.read_rows` reads (JSONL, parquet, a datasets folder or hub
  id): the ``prompt`` field of each row, or ``caption`` (Pick-a-Pic's), and ``category`` if any.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, NamedTuple

from torch.utils.data import Dataset

from diffalign.data.rows import read_rows

__all__ = ["PromptDataset", "PromptItem", "collate_prompts", "read_prompt_set", "read_prompts"]

_PROMPT_KEYS = ("prompt", "prompts", "caption")


class PromptItem(NamedTuple):
    prompt: str
    category: str  # "" where the set has none


def read_prompts(path: str | Path, split: str = "train") -> list[str]:
    """The prompts of ``path`` (any format of :func:`read_prompt_set`), in file order."""
    return [item.prompt for item in read_prompt_set(path, split)]


def read_prompt_set(path: str | Path, split: str = "train") -> list[PromptItem]:
    """The prompts of ``path`` with their categories, in file order (formats: the module's).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: naming the file (and row): a format it does not read, a row without a
            non-empty string prompt, or no prompt at all.
    """
    path = Path(path)
    if path.suffix in (".txt", ".tsv", ".csv", ".json") and not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    if path.suffix == ".txt":
        items = [PromptItem(line.strip(), "") for line in path.read_text().splitlines() if line.strip()]
    elif path.suffix in (".tsv", ".csv"):
        items = _delimited(path)
    elif path.suffix == ".json" or (path.is_dir() and any(path.glob("*.json")) and not _is_dataset(path)):
        files = sorted(path.glob("*.json")) if path.is_dir() else [path]
        items = [item for file in files for item in _json_prompts(file)]
    elif path.suffix in ("", ".jsonl", ".parquet") or path.is_dir():
        items = [_row_item(row, where) for where, row in read_rows(path, split, what="prompts")]
    else:
        raise ValueError(
            f"{path}: unknown prompt file format '{path.suffix}' (read: .txt, .tsv (PartiPrompts), "
            ".csv (DrawBench), .json (HPDv2), .jsonl, .parquet, a dataset folder)"
        )
    if not items:
        raise ValueError(f"{path}: no prompts")
    return items


def _is_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "dataset_info.json").is_file()


def _row_item(row: Any, where: str) -> PromptItem:
    fields = {str(k).lower(): v for k, v in row.items()} if isinstance(row, dict) else {}
    key = next((k for k in _PROMPT_KEYS if k in fields), None)
    if key is None or not isinstance(fields[key], str) or not fields[key].strip():
        raise ValueError(f"{where}: a row needs a non-empty 'prompt' (or 'caption'), got {row!r:.200}")
    category = fields.get("category")
    return PromptItem(fields[key], "" if category is None else str(category))


def _delimited(path: Path) -> list[PromptItem]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ",")
        columns = [c.lower() for c in reader.fieldnames or []]
        if not any(k in columns for k in _PROMPT_KEYS):
            raise ValueError(f"{path}: no 'Prompt' (or 'Prompts', 'caption') column; columns: {columns}")
        return [_row_item(row, f"{path}:{i + 2}") for i, row in enumerate(reader)]


def _json_prompts(path: Path) -> list[PromptItem]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not JSON ({err}); JSON Lines files end in .jsonl") from err
    if isinstance(data, dict):
        if not all(isinstance(v, list) for v in data.values()):
            raise ValueError(f"{path}: a JSON object must map categories to lists of prompts")
        return [_entry(v, f"{path}:{c}[{i}]", str(c)) for c, vs in data.items() for i, v in enumerate(vs)]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of prompts, got {type(data).__name__}")
    return [_entry(v, f"{path}[{i}]", path.stem) for i, v in enumerate(data)]


def _entry(value: Any, where: str, category: str) -> PromptItem:
    if isinstance(value, str):
        return PromptItem(value, category)
    item = _row_item(value, where)
    return item if item.category else PromptItem(item.prompt, category)


class PromptDataset(Dataset):
    """Prompts as dataset items ``{"prompt": str}``."""

    def __init__(self, prompts: list[str]) -> None:
        self.prompts = prompts

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> dict[str, str]:
        return {"prompt": self.prompts[index]}


def collate_prompts(items: list[dict[str, str]]) -> dict[str, list[str]]:
    return {"prompts": [item["prompt"] for item in items]}
