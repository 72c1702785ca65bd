"""Recipes: one short file per paper, composing data, estimator, objective and the loop.

``get_method(name)`` returns the class registered under ``name``; methods import lazily.
"""

from __future__ import annotations

import difflib
import importlib

METHODS = {
    "diffusion_dpo": "diffalign.methods.diffusion_dpo:DiffusionDPO",
    "text_preference": "diffalign.methods.text_preference:TextPreference",
    "smpo": "diffalign.methods.smpo:SmPO",
    "dro": "diffalign.methods.dro:DiffusionDRO",
    "ddpo": "diffalign.methods.ddpo:DDPO",
    "prefpaint": "diffalign.methods.prefpaint:PrefPaint",
    "ift": "diffalign.methods.ift:IFT",
}


def get_method(name: str) -> type:
    if name not in METHODS:
        close = difflib.get_close_matches(name, list(METHODS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise KeyError(f"unknown method '{name}'{hint} (known: {', '.join(sorted(METHODS))})")
    module, _, attr = METHODS[name].partition(":")
    return getattr(importlib.import_module(module), attr)
