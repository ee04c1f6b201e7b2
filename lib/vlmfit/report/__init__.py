"""The report stage: run notebooks (``runner``), render them (``render``), index them (``index``).

Notebooks draw with ``report.<figure or table>``: the names of ``figures`` and ``tables``,
imported on first use (a launcher that only checks parameters loads no matplotlib).
"""

from __future__ import annotations

import importlib
from typing import Any

_FROM = {
    "figures": (
        "image_sizes", "visual_tokens", "sequence_lengths", "truncation", "sample_grid",
        "curves", "memory_timeline", "memory_growth", "growth_caption", "GROWTH_SERIES",
    ),
    "tables": (
        "human", "rate", "duration", "count", "metrics", "accuracy_table", "sample_table",
        "dpo_changes", "results_summary", "summary_table", "train_line", "config_table",
    ),
}  # fmt: skip
_MODULE = {name: module for module, names in _FROM.items() for name in names}
__all__ = sorted(_MODULE)


def __getattr__(name: str) -> Any:
    if name not in _MODULE:
        raise AttributeError(f"module 'vlmfit.report' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"vlmfit.report.{_MODULE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODULE))
