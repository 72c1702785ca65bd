"""Finding and reading reward weights: a local file or folder, or a file of a hub repository."""

from __future__ import annotations

from pathlib import Path

import torch


def resolve_file(source: str | Path, filename: str, what: str) -> Path:
    """``source`` is a file, a folder holding ``filename``, or a hub repo id holding ``filename``.

    Offline (or when the hub does not have it) the error says which file to place where.
    """
    path = Path(source)
    if path.is_file():
        return path
    if path.is_dir():
        if (path / filename).is_file():
            return path / filename
        raise FileNotFoundError(f"{what}: {path} has no {filename}")
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(str(source), filename))
    except Exception as err:
        raise FileNotFoundError(
            f"{what}: '{source}' is not a local file or folder, and '{filename}' could not be fetched from "
            f"the hub repo '{source}' ({type(err).__name__}). Without a network, download {filename} from "
            f"that repo elsewhere, place it in a folder DIR, and pass DIR (or the file) instead."
        ) from err


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """safetensors, or a pickle read with ``weights_only=True`` (never arbitrary code)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return {k.removeprefix("module."): v for k, v in state.items()}
