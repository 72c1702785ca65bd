"""Reading rows of a dataset, whatever it is stored as: one place for every data reader.

``read_rows(path)`` returns ``(where, row)`` pairs, ``where`` being ``"file:line"`` or
``"name:index"`` for error messages, from

- a ``.jsonl`` file (one JSON object per line; blank lines skipped),
- a ``.parquet`` file, or a folder of ``.parquet`` shards,
- a folder written by datasets' ``save_to_disk``, or, where a network exists, a hub dataset id
  (``split`` chooses the split).

``columns`` (optional) names the columns to read; a missing one is an error naming the source.

``parse_rows`` turns rows into records, one place for what a reader does with a malformed row
(``on_bad_sample``: raise naming it, or drop it and count it in one warning).

A pair's optional label and reward scores are read here too (``pair_label``, ``pair_rewards``),
so that image and text pairs take the same fields.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

__all__ = [
    "REWARD_FIELDS",
    "Parsed",
    "check_columns",
    "check_rewards_all_or_none",
    "pair_label",
    "pair_rewards",
    "parse_rows",
    "read_rows",
]

E = TypeVar("E")
R = TypeVar("R")

# (chosen, rejected) reward fields of a pair row, tried in turn: diffalign's and TRL's names, then
# UltraFeedback's (which is also what `scripts/score_dataset.py column_prefix=score` writes)
REWARD_FIELDS = (("chosen_reward", "rejected_reward"), ("score_chosen", "score_rejected"))


def pair_label(row: dict, where: str) -> float:
    """A pair's optional ``label``, P(chosen preferred): 1 (the default) or 0.5 (a tie). Anything
    else (null, text, 0, 0.7) is a ``ValueError`` naming the row: a label of 0 means the columns
    are the wrong way round, and a reader should not guess."""
    label = row.get("label", 1.0)
    if isinstance(label, bool) or not isinstance(label, (int, float)) or label not in (0.5, 1.0):
        raise ValueError(f"{where}: label must be 1 or 0.5 (a tie), got {label!r}")
    return float(label)


def pair_rewards(
    row: dict, where: str, fields: Sequence[tuple[str, str]] = REWARD_FIELDS, required: bool = False
) -> tuple[float, float] | None:
    """The reward scores ``(first, second)`` of a pair row from the first of ``fields`` (pairs of
    column names) the row has, or None when it has none (``required``: a ``ValueError``).

    Raises ``ValueError`` naming the row and column when only one column of a pair is present, or a
    score is null, not a number, NaN or infinite (``scripts/score_dataset.py`` writes NaN for an
    image it could not read): a pair scored on one side only has no reward gap.
    """
    for names in fields:
        if not any(name in row for name in names):
            continue
        scores = []
        for name in names:
            value = row.get(name)
            if name not in row:
                raise ValueError(
                    f"{where}: missing reward score '{name}' (a pair needs '{names[0]}' and '{names[1]}')"
                )
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{where}: reward score '{name}' must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{where}: reward score '{name}' must be finite, got {value}")
            scores.append(float(value))
        return scores[0], scores[1]
    if required:
        wanted = " or ".join(f"'{a}' and '{b}'" for a, b in fields)
        raise ValueError(f"{where}: missing reward scores (needs {wanted})")
    return None


class Parsed(list[R]):
    """A reader's records, with ``skipped``: the malformed rows dropped under ``on_bad_sample=skip``."""

    skipped: int = 0


def parse_rows(
    entries: Iterable[E],
    parse: Callable[[E], R | None],
    on_bad_sample: Literal["error", "skip"],
    source: str | Path,
    what: str,
) -> Parsed[R]:
    """The records ``parse`` makes of ``entries`` (None: a row dropped by rule, such as a tie), with
    the number of malformed rows skipped (``skipped``).

    A ``ValueError`` from ``parse`` (which names the row) propagates (``on_bad_sample="error"``), or
    the row is dropped, the drops counted in one warning naming ``source`` and the first (``"skip"``).

    Raises:
        ValueError: a malformed row (``"error"``); ``on_bad_sample`` not "error" or "skip"; every
            row malformed (``"skip"``: naming ``source`` and the first failure).
    """
    if on_bad_sample not in ("error", "skip"):
        raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
    records: Parsed[R] = Parsed()
    failures, seen = [], 0
    for entry in entries:
        seen += 1
        try:
            record = parse(entry)
        except ValueError as err:
            if on_bad_sample == "error":
                raise
            failures.append(err)
            continue
        if record is not None:
            records.append(record)
    if failures and len(failures) == seen:
        raise ValueError(f"{source}: every row of the {what} is malformed; the first: {failures[0]}")
    if failures:
        warnings.warn(
            f"{source}: skipped {len(failures)} malformed rows of {seen} (on_bad_sample=skip); "
            f"the first: {failures[0]}",
            stacklevel=3,
        )
    records.skipped = len(failures)
    return records


def check_rewards_all_or_none(records: Sequence[Any]) -> None:
    """Raise ``ValueError`` naming the first record (any object with ``rewards`` and ``where``)
    without reward scores when others have them: an objective that uses them cannot skip rows."""
    unscored = [r for r in records if r.rewards is None]
    if unscored and len(unscored) < len(records):
        raise ValueError(
            f"{unscored[0].where}: no reward scores, while other rows have them; give all rows or none"
        )


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
        check_columns(table.column_names, columns, str(path))
        rows = (table.select(list(columns)) if columns else table).to_pylist()
        return [(f"{path}:{i}", row) for i, row in enumerate(rows)]
    if path.suffix in (".jsonl", ".json"):
        return _read_jsonl(path)
    raise ValueError(f"{path}: unsupported {what} format (use .parquet, .jsonl or a dataset folder)")


def check_columns(names: Sequence[str], columns: tuple[str, ...] | None, source: str) -> None:
    """Raise ``ValueError`` naming ``source`` and the first of ``columns`` missing from ``names``."""
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
    check_columns(data.column_names, columns, name)
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
