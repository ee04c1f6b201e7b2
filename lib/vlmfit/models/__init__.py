"""Models: the registry of supported models, loading them, and offline builders.

Submodules ``registry`` (torch-free), ``loading``, ``builders``, ``processors``, and
``configs/`` (the published architectures random weights are built from). ``loading``'s
functions are re-exported here, imported on first use so that ``registry`` stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vlmfit.models.loading import (
        load_model,
        lora_targets,
        module_groups,
        qlora_skip_modules,
        quantization_config,
        resolve_source,
        save_random,
        set_trainable,
    )

_LOADING = (
    "load_model",
    "lora_targets",
    "module_groups",
    "qlora_skip_modules",
    "quantization_config",
    "resolve_source",
    "save_random",
    "set_trainable",
)

_SUBMODULES = ("builders", "loading", "processors", "registry")

__all__ = [
    "builders",
    "load_model",
    "loading",
    "lora_targets",
    "module_groups",
    "processors",
    "qlora_skip_modules",
    "quantization_config",
    "registry",
    "resolve_source",
    "save_random",
    "set_trainable",
]


def __getattr__(name: str) -> Any:
    if name in _LOADING:
        return getattr(importlib.import_module("vlmfit.models.loading"), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
