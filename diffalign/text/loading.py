"""Loading the causal LM a text recipe starts from: a model folder (or hub id), or a peft adapter
on top of one (the usual SFT output), merged into the base weights.

A preference method's starting point is the SFT model, policy and reference alike. When that is
a LoRA adapter, transformers alone would either attach it as a frozen adapter (and a new LoRA
or a reference with "adapters disabled" then silently drops it) or fail to find a tokenizer in
the adapter folder. Merging it first (``PeftModel.merge_and_unload``) makes base + adapter one
ordinary model, so that everything downstream (a frozen copy, a new LoRA, adapters disabled,
precomputed reference log-probs) sees the SFT model.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["check_model_source", "load_causal_lm", "resolve_adapter"]

ADAPTER_CONFIG = "adapter_config.json"


def resolve_adapter(pretrained: str | Path, adapter: str | Path | None = None) -> tuple[str, str | None]:
    """``(base, adapter)``: ``pretrained`` may itself be a peft adapter folder, whose base is then
    the ``base_model_name_or_path`` of its ``adapter_config.json``. Raises ``FileNotFoundError``
    when ``adapter`` is not a peft adapter folder, ``ValueError`` when both name an adapter or when
    an adapter's config is unreadable."""
    # local paths made absolute: they are recorded in exports (an adapter's base), which must load
    # from anywhere, not only from the folder the run was started in
    pretrained, adapter = (None if p is None else _absolute(str(p)) for p in (pretrained, adapter))
    if adapter is not None and not (Path(adapter) / ADAPTER_CONFIG).is_file():
        why = "does not exist" if not Path(adapter).exists() else f"has no {ADAPTER_CONFIG}"
        raise FileNotFoundError(f"model.adapter: {adapter} {why}: it must be a peft adapter folder")
    if not (Path(pretrained) / ADAPTER_CONFIG).is_file():
        return pretrained, None if adapter is None else str(adapter)
    if adapter is not None:
        raise ValueError(
            f"model.pretrained ({pretrained}) is itself an adapter folder and model.adapter ({adapter}) "
            "names another: set model.pretrained to the base model"
        )
    config_file = Path(pretrained) / ADAPTER_CONFIG
    try:
        base = json.loads(config_file.read_text()).get("base_model_name_or_path")
    except (OSError, ValueError) as err:
        raise ValueError(f"{config_file}: cannot read the adapter's config ({err})") from err
    if not base:
        raise ValueError(
            f"{config_file} names no base_model_name_or_path: set model.pretrained to the base model "
            f"and model.adapter={pretrained}"
        )
    return _absolute(str(base)), pretrained


def _absolute(name_or_path: str) -> str:
    return str(Path(name_or_path).resolve()) if Path(name_or_path).exists() else name_or_path


def check_model_source(source: str | Path, key: str) -> None:
    """Refuse, before any work, a ``source`` that is neither a local folder nor shaped like a hub id
    (``name`` or ``namespace/name``): a path to a folder that does not exist.

    Raises:
        FileNotFoundError: naming ``key`` (the config key that gave ``source``).
    """
    text = str(source)
    looks_local = text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text
    if looks_local and not Path(text).expanduser().is_dir():
        raise FileNotFoundError(f"{key}: {text} is not a folder (and not a hub id)")


def load_causal_lm(  # type: ignore[no-untyped-def]
    pretrained: str | Path, adapter: str | Path | None = None, trust_remote_code: bool = False
):
    """``(model, tokenizer)``: ``AutoModelForCausalLM`` from ``pretrained`` with the peft
    ``adapter`` (if any, or if ``pretrained`` is one) merged into its weights. The tokenizer comes
    from the adapter folder when it holds one, else from the base. ``trust_remote_code`` lets
    transformers run the Python files a model folder or hub repo ships; off unless the user sets it.

    Raises ``FileNotFoundError`` when an adapter's base cannot be loaded (offline, a hub id not
    cached) and ``ValueError`` when the adapter cannot be merged; both name the adapter folder
    and say what to do.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, adapter = resolve_adapter(pretrained, adapter)
    tokenizer_source = adapter if adapter and (Path(adapter) / "tokenizer_config.json").is_file() else base
    remote = {"trust_remote_code": trust_remote_code}
    try:
        model = AutoModelForCausalLM.from_pretrained(base, **remote)
    except OSError as err:
        why = f"({type(err).__name__}: {err})"
        raise FileNotFoundError(
            f"cannot load a causal LM from '{base}': not a local model folder, and not a hub id this "
            f"machine has cached or can reach {why}"
            if adapter is None
            else f"the adapter {adapter} needs its base model '{base}', which could not be loaded {why}. "
            f"Put a copy of it in a local folder and set model.pretrained=FOLDER model.adapter={adapter}"
        ) from err
    if adapter is None:
        return model, AutoTokenizer.from_pretrained(base, **remote)
    return _merged(model, adapter), AutoTokenizer.from_pretrained(tokenizer_source, **remote)


def _merged(model, adapter: str):  # type: ignore[no-untyped-def]
    from peft import PeftModel

    try:
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    except Exception as err:  # peft raises several types for adapters it cannot load or merge
        raise ValueError(
            f"cannot merge the adapter {adapter} into its base model ({type(err).__name__}: {err}). "
            "Merge it yourself and start from the result: `AutoPeftModelForCausalLM.from_pretrained("
            f"'{adapter}').merge_and_unload().save_pretrained(OUT)`, then model.pretrained=OUT"
        ) from err
    merged.config.diffalign_merged_adapter = adapter  # recorded in every saved config.json
    return merged.requires_grad_(True)  # peft froze the base to load the adapter for inference
