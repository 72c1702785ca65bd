"""Finding and reading reward weights: a local file or folder, or a file of a hub repository.

One message for every reward when weights cannot be found: what was looked for, where, and what
to pass instead (a random model only when ``random_weights=True`` is asked for, in tests).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

T = TypeVar("T")


def offline_hint(source: str | Path, what: str, wanted: str, err: Exception) -> str:
    return (
        f"{what}: '{source}' is not a local file or folder, and {wanted} could not be fetched from the "
        f"hub repo '{source}' ({type(err).__name__}). Without a network, download {wanted} from that "
        f"repo elsewhere, place it in a folder DIR, and pass DIR instead."
    )


def require_weights(source: str | Path | None, what: str, argument: str, example: str) -> str | Path:
    """``source``, or an error naming the argument to pass when it is None."""
    if source is None:
        raise ValueError(
            f"{what}: no weights were given. Pass {argument}= ({example}); a randomly initialised "
            f"model is built only with random_weights=True (for tests)."
        )
    return source


def resolve_file(source: str | Path, filenames: str | tuple[str, ...], what: str) -> Path:
    """``source`` is a file, a folder holding one of ``filenames``, or a hub repo id holding one.

    Raises:
        FileNotFoundError: naming the files looked for and, for a hub id that cannot be reached,
            which file to place where.
    """
    names = (filenames,) if isinstance(filenames, str) else filenames
    path = Path(source)
    if path.is_file():
        return path
    if path.is_dir():
        for name in names:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{what}: {path} has none of {', '.join(names)}")
    from huggingface_hub import hf_hub_download

    errors = []
    for name in names:
        try:
            return Path(hf_hub_download(str(source), name))
        except Exception as err:
            errors.append(err)
    raise FileNotFoundError(offline_hint(source, what, " or ".join(names), errors[0])) from errors[0]


def optional_file(source: str | Path, filename: str) -> Path | None:
    """``filename`` beside ``source`` (a file's folder, a folder, or a hub repo), or None."""
    path = Path(source)
    if path.exists():
        folder = path if path.is_dir() else path.parent
        return folder / filename if (folder / filename).is_file() else None
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(str(source), filename))
    except Exception:
        return None


def from_pretrained(loader: Callable[[str], T], source: str | Path, what: str) -> T:
    """``loader(source)`` (a transformers ``from_pretrained``); a hub id that cannot be reached
    raises the same message as :func:`resolve_file` instead of transformers' generic ``OSError``."""
    try:
        return loader(str(source))
    except OSError as err:
        if Path(source).exists():
            raise
        raise FileNotFoundError(offline_hint(source, what, "the repo's files", err)) from err


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """safetensors, or a pickle read with ``weights_only=True`` (never arbitrary code)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return {k.removeprefix("module."): v for k, v in state.items()}
