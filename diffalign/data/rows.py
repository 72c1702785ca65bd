"""Reading rows of a dataset, whatever it is stored as: one place for every data reader.

``read_rows(path)`` returns ``(where, row)`` pairs, ``where`` being ``"file:line"`` or
``"name:index"`` for error messages, from

- a ``.jsonl`` file (one JSON object per line; blank lines skipped),
- a ``.parquet`` file, or a folder of ``.parquet`` shards,
- a folder written by datasets' ``save_to_disk``, or, where a network exists, a hub dataset id
  (``split`` chooses the split).

``columns`` (optional) names the columns to read; a missing one is an error naming the source.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["pair_label", "read_rows"]


def pair_label(row: dict, where: str) -> float:
    """A pair's optional ``label``, P(chosen preferred): 1 (the default) or 0.5 (a tie). Anything
    else (null, text, 0, 0.7) is a ``ValueError`` naming the row: a label of 0 means the columns
    are the wrong way round, and a reader should not guess."""
    label = row.get("label", 1.0)
    if isinstance(label, bool) or not isinstance(label, (int, float)) or label not in (0.5, 1.0):
        raise ValueError(f"{where}: label must be 1 or 0.5 (a tie), got {label!r}")
    return float(label)


def read_rows(
    path: str | Path, split: str = "train", columns: tuple[str, ...] | None = None, what: str = "data"
) -> list[tuple[str, dict]]:
    path = Path(path)
    if path.is_dir() and not (path / "dataset_dict.json").is_file() and any(path.glob("*.parquet")):
        return [r for shard in sorted(path.glob("*.parquet")) for r in read_rows(shard, split, columns, what)]
    if path.is_dir():
        return _read_hf_dataset(str(path), split, columns, what, local=True)
    if not path.exists():
        if path.suffix or str(path).count("/") != 1:
            raise FileNotFoundError(f"{what} not found: {path}")
        return _read_hf_dataset(str(path), split, columns, what, local=False)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        _check_columns(table.column_names, columns, str(path))
        rows = (table.select(list(columns)) if columns else table).to_pylist()
        return [(f"{path}:{i}", row) for i, row in enumerate(rows)]
    if path.suffix in (".jsonl", ".json"):
        return _read_jsonl(path)
    raise ValueError(f"{path}: unsupported {what} format (use .parquet, .jsonl or a dataset folder)")


def _check_columns(names: list[str], columns: tuple[str, ...] | None, source: str) -> None:
    missing = [c for c in columns or () if c not in names]
    if missing:
        raise ValueError(f"{source}: missing column '{missing[0]}' (needs {', '.join(columns or ())})")


def _read_hf_dataset(
    name: str, split: str, columns: tuple[str, ...] | None, what: str, local: bool
) -> list[tuple[str, dict]]:
    import datasets

    try:
        data = datasets.load_from_disk(name) if local else datasets.load_dataset(name, split=split)
    except Exception as err:
        where = "is not a datasets folder" if local else "could not be loaded from the hub"
        raise FileNotFoundError(
            f"{what} '{name}' {where} ({type(err).__name__}: {err}); pass a .parquet or .jsonl "
            "file, or a folder written by datasets' save_to_disk"
        ) from err
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise ValueError(f"{name}: no split '{split}' (has {', '.join(data)})")
        data = data[split]
    _check_columns(data.column_names, columns, name)
    rows = (data.select_columns(list(columns)) if columns else data).to_list()
    return [(f"{name}:{i}", row) for i, row in enumerate(rows)]


def _read_jsonl(path: Path) -> list[tuple[str, dict]]:
    out = []
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{i}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err.msg})") from err
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        out.append((where, row))
    return out
