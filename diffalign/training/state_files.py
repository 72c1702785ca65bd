"""What a checkpoint keeps beside accelerate's own files (each rank's method state, the EMA), as
safetensors: nothing diffalign writes is a pickle, so nothing it reads can run code.

A state is a nested structure of dicts with string keys, lists, tuples (read back as lists),
tensors, strings, numbers, booleans and None: the tensors go into the file's tensors and the rest
into a JSON skeleton in its metadata, with each tensor's place marked by its key.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

__all__ = ["load_state", "save_state"]

_SKELETON = "diffalign_state"
_TENSOR = "__tensor__"


def save_state(state: Mapping[str, Any], path: Path) -> None:
    """Write ``state`` to ``path`` (a safetensors file).

    Raises:
        TypeError: a value is of another type, or a dict key is not a string (its path is named).
    """
    tensors: dict[str, torch.Tensor] = {}

    def skeleton(value: Any, where: str) -> Any:
        if isinstance(value, torch.Tensor):
            key = str(len(tensors))
            tensors[key] = value.detach().cpu().contiguous().clone()  # clone: no shared storage
            return {_TENSOR: key}
        if isinstance(value, Mapping):
            if not all(isinstance(k, str) for k in value):
                raise TypeError(f"{where}: dict keys must be strings to be saved, got {list(value)[:5]}")
            if _TENSOR in value:
                raise TypeError(f"{where}: {_TENSOR!r} is reserved")
            return {k: skeleton(v, f"{where}.{k}") for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [skeleton(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if value is None or isinstance(value, (str, int, float, bool)):
            return value
        raise TypeError(f"{where}: cannot save a {type(value).__name__} in a checkpoint state")

    layout = skeleton(dict(state), "state")
    save_file(tensors, str(path), metadata={_SKELETON: json.dumps(layout)})


def load_state(path: Path) -> dict[str, Any]:
    """The state :func:`save_state` wrote to ``path``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not such a state (truncated, another format), naming it.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt") as f:
            layout = json.loads(f.metadata()[_SKELETON])
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a readable checkpoint state ({type(err).__name__}: {err})") from err

    def rebuild(value: Any) -> Any:
        if isinstance(value, dict):
            if set(value) == {_TENSOR}:
                return tensors[value[_TENSOR]]
            return {k: rebuild(v) for k, v in value.items()}
        if isinstance(value, list):
            return [rebuild(v) for v in value]
        return value

    return rebuild(layout)
