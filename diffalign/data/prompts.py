"""Prompts to sample from: what online methods (DDPO) train on.

A ``.txt`` file holds one prompt per line (blank lines skipped; a prompt repeated is drawn more
often); any other source that :func:`~diffalign.data.rows.read_rows` reads (JSONL, parquet, a
datasets folder or hub id) gives the ``prompt`` field of each row, or ``caption`` (Pick-a-Pic's).
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from diffalign.data.rows import read_rows

__all__ = ["PromptDataset", "collate_prompts", "read_prompts"]


def read_prompts(path: str | Path, split: str = "train") -> list[str]:
    """The prompts of ``path``, in file order.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: naming the file and row: a row without a string ``prompt`` or ``caption``, or
            no prompt at all.
    """
    path = Path(path)
    if path.suffix == ".txt":
        if not path.is_file():
            raise FileNotFoundError(f"prompt file not found: {path}")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        prompts = []
        for where, row in read_rows(path, split, what="prompts"):
            key = "prompt" if "prompt" in row else "caption"
            if not isinstance(row.get(key), str):
                raise ValueError(
                    f"{where}: a row needs a string 'prompt' (or 'caption'), got {row.get(key)!r}"
                )
            prompts.append(row[key])
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


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
