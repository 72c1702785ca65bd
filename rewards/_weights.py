"""Finding and reading reward weights: a local file or folder, or a file of a hub repository.

One message for every reward when weights cannot be found: what was looked for, where, and what
to pass instead (a random model only when ``random_weights=True`` is asked for, in tests).
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

T = TypeVar("T")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


class WeightsError(ValueError):
    """A weights file that cannot be read, or does not fit the model it is meant for."""


def is_hub_id(source: str | Path) -> bool:
    """``owner/name`` that is not a local path: anything else that does not exist is a missing
    local file, not something to look for on the hub."""
    text = str(source)
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text)) and not text.endswith(WEIGHT_SUFFIXES)


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


def require_path(source: object, what: str) -> str | Path:
    """Weights are named by a path or a hub id; anything else (a model object) is refused."""
    if not isinstance(source, (str, Path)):
        raise TypeError(
            f"{what}: expected a file, a folder or a hub id, got a {type(source).__name__} object "
            f"(save it with save_pretrained and pass the folder)"
        )
    return source


def resolve_file(source: str | Path, filenames: str | tuple[str, ...], what: str) -> Path:
    """``source`` is a file, a folder holding one of ``filenames``, or a hub repo id holding one.

    Raises:
        FileNotFoundError: naming the files looked for and, for a hub id that cannot be reached,
            which file to place where.
    """
    names = (filenames,) if isinstance(filenames, str) else filenames
    path = Path(require_path(source, what))
    if path.is_file():
        return path
    if path.is_dir():
        found = [path / name for name in names if (path / name).is_file()]
        if len(found) > 1:
            raise FileNotFoundError(
                f"{what}: {path} holds several weight files ({', '.join(f.name for f in found)}); "
                f"pass the one to use"
            )
        if not found:
            raise FileNotFoundError(f"{what}: {path} has none of {', '.join(names)}")
        return found[0]
    if not is_hub_id(source):
        raise FileNotFoundError(f"{what}: no such file or folder: {source}")
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
    if not is_hub_id(source):
        return None
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(str(source), filename))
    except Exception:
        return None


def from_pretrained(loader: Callable[[str], T], source: str | Path, what: str) -> T:
    """``loader(source)`` (a transformers ``from_pretrained``); a hub id that cannot be reached
    raises the same message as :func:`resolve_file` instead of transformers' generic ``OSError``."""
    path = Path(require_path(source, what))
    if path.is_file():
        raise FileNotFoundError(f"{what}: {source} is a file; pass the transformers folder holding it")
    if not path.exists() and not is_hub_id(source):
        raise FileNotFoundError(f"{what}: no such folder: {source}")
    try:
        return loader(str(source))
    except (OSError, ValueError) as err:
        if path.exists():
            raise WeightsError(f"{what}: {source} is not a transformers folder it can load ({err})") from err
        files = "config.json, the weights (model.safetensors) and the tokenizer and preprocessor files"
        raise FileNotFoundError(offline_hint(source, what, files, err)) from err


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """safetensors, or a pickle read with ``weights_only=True`` (never arbitrary code); a
    ``{"state_dict": ...}`` wrapper and DDP's ``module.`` prefixes are removed.

    Raises:
        WeightsError: naming ``path``: not safetensors or a weights-only pickle of tensors (a
            TorchScript archive, a pickle that carries code, a truncated file, a list).
    """
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise WeightsError(f"{path}: not a readable safetensors file ({err})") from err
    if zipfile.is_zipfile(path) and any(
        n.endswith("constants.pkl") for n in zipfile.ZipFile(path).namelist()
    ):
        raise WeightsError(
            f"{path} is a TorchScript archive (as OpenAI's original CLIP release, e.g. ViT-B-32.pt); "
            f"archives carry code and are not loaded. Use the same weights as a state dict: open_clip's "
            f"copy (weights='openai' with a *-quickgelu model_name) or a transformers CLIP (model=)."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        reason = str(err).splitlines()[0] if str(err) else "empty or truncated"
        raise WeightsError(
            f"{path}: not a weights-only checkpoint ({type(err).__name__}: {reason}); diffalign reads "
            f"pickles with weights_only=True and never runs the code a pickle carries"
        ) from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: expected a dict of tensors (a state dict), got {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], path: Path | str, what: str) -> None:
    """``module.load_state_dict(state)`` (strict), naming the file when the weights do not fit."""
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        raise WeightsError(f"{what}: {path} does not fit {type(module).__name__}: {err}") from err
