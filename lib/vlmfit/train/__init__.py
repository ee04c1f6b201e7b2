"""The training stage: SFT and DPO through TRL's trainers, with PEFT adapters, in run folders.

The notebooks call ``train.run(cfg)``; the CLI is ``vlmfit train`` (:mod:`vlmfit.cli.train`).
What vlmfit adds on top of TRL, and the modules: docs/architecture.md. The names below load on
first use, so that ``vlmfit.train.runs`` (read by reports and preprocessing) imports no torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: name -> (module, its name there)
_EXPORTS = {
    "load_training_records": ("data", "load_training_records"),
    "to_dataset": ("data", "to_dataset"),
    "use_preprocessed": ("data", "use_preprocessed"),
    "prepared_folder": ("data", "prepared_folder"),
    "prepare_data": ("data", "prepare_data"),
    "load_prepared": ("data", "load_prepared"),
    "video_collator": ("data", "video_collator"),
    "lora_config": ("model", "lora_config"),
    "build_model": ("model", "build_model"),
    "make_optimizer": ("model", "make_optimizer"),
    "torch_dtype": ("model", "torch_dtype"),
    "_dtype": ("model", "torch_dtype"),  # benchmarks/memory_sweep.py
    "memory_now": ("trainer", "memory_now"),
    "training_args": ("trainer", "training_args"),
    "build_trainer": ("trainer", "build_trainer"),
    "run": ("pipeline", "run"),
    "save_model": ("pipeline", "save_model"),
    "merge_adapter": ("merge", "merge_adapter"),
}

if TYPE_CHECKING:
    from vlmfit.train.data import (
        load_prepared,
        load_training_records,
        prepare_data,
        prepared_folder,
        to_dataset,
        use_preprocessed,
        video_collator,
    )
    from vlmfit.train.merge import merge_adapter
    from vlmfit.train.model import build_model, lora_config, make_optimizer, torch_dtype
    from vlmfit.train.pipeline import run, save_model
    from vlmfit.train.trainer import build_trainer, memory_now, training_args


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    value = getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = [
    "build_model",
    "build_trainer",
    "load_prepared",
    "load_training_records",
    "lora_config",
    "make_optimizer",
    "memory_now",
    "merge_adapter",
    "prepare_data",
    "prepared_folder",
    "run",
    "save_model",
    "to_dataset",
    "torch_dtype",
    "training_args",
    "use_preprocessed",
    "video_collator",
]
