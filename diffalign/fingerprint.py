"""Content fingerprints for cache keys: a cache is valid for what it was computed from, not for
the path that thing happened to live at.

A cache keyed on a path goes stale without a word when the file or model at that path is
replaced (a retrained model saved over the old one, another reward's weights at the same
place). Every cache in diffalign is keyed on these fingerprints instead.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

__all__ = ["file_fingerprint", "fingerprint", "module_fingerprint", "rows_fingerprint"]


def fingerprint(*parts: Any) -> str:
    """A hex digest (16 characters) of JSON-serialisable parts (others by ``repr``)."""
    text = json.dumps(parts, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def rows_fingerprint(rows: Iterable[Any]) -> str:
    """A digest of a sequence of rows (token ids, records, ...), hashed one row at a time so that
    a large dataset never becomes one string."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(repr(row).encode())
        digest.update(b"\n")
    return digest.hexdigest()[:16]


def module_fingerprint(module: torch.nn.Module, skip: Iterable[str] = ()) -> str:
    """A digest of a module's parameters and buffers (names, dtypes, shapes and every byte) and of
    the configs of it and its submodules (transformers' and diffusers' ``config``: a changed
    ``rope_theta`` changes the outputs as surely as a changed weight).

    Names containing any string of ``skip`` are left out (e.g. ``"lora_"``: a reference with its
    adapters disabled does not depend on them), and peft's wrapping (``base_model.model.``,
    ``.base_layer``) is removed from names, so that a model and the same model with LoRA layers
    added have one fingerprint; so are configs' private and bookkeeping entries (``_name_or_path``
    and the like). Costs one pass over the weights (a copy to the CPU for tensors elsewhere):
    about a second per GB.
    """
    skip = tuple(skip)
    digest = hashlib.sha256()
    digest.update(fingerprint(_configs(module)).encode())
    state = module.state_dict()
    named = {
        name.replace("base_model.model.", "").replace(".base_layer", ""): tensor
        for name, tensor in state.items()
        if not any(s in name for s in skip)
    }
    for name in sorted(named):
        tensor = named[name].detach()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def _configs(module: torch.nn.Module) -> list[dict[str, Any]]:
    found = []
    for sub in module.modules():
        config = getattr(sub, "config", None)
        config = config.to_dict() if hasattr(config, "to_dict") else config
        if isinstance(config, dict):
            found.append({k: v for k, v in config.items() if not k.startswith(("_", "diffalign_"))})
    return found


def file_fingerprint(path: str | Path) -> dict[str, Any]:
    """What identifies a file, or every file under a folder, without reading it all: resolved path,
    size and modification time of each."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {
        "path": str(path.resolve()),
        "files": [
            (str(p.relative_to(path)) if p != path else "", p.stat().st_size, p.stat().st_mtime_ns)
            for p in files
        ],
    }
